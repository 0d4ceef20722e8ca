"""Which cut of L + S each consolidation step in factors trains.

With ``consolidate_params='factors'`` a step may train a cut of the surrogate
(``consolidate.global_cut``) instead of, or besides, the whole of it:

* global dropout (``consolidate_global_dropout=p``): a random share q ~ U(0, p)
  of the structure's parameters dropped;
* cut budgets (``consolidate_cut_budgets``): one of the listed fractions of the
  model's parameter count drawn uniformly, optionally priced with a fixed cost
  per block's S (``consolidate_cut_overhead``) and moved by U(-j, j)
  (``consolidate_cut_jitter``); with the joint loss (``consolidate_cut_joint``)
  the draw is among the budgets below 1, the whole structure being in every
  step's loss.

The first factor step always trains the whole projection (``whole``).  Draws depend on
the seed and the step count only, so a resumed run draws the same cuts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from salaad_jax import consolidate as cons

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class CutSchedule:
  """The consolidation options that choose each factor step's cut (checked
  by ``options.parse``)."""

  seed: int
  global_dropout: float = 0.0
  budgets: tuple = ()
  overhead: float = 0.0
  jitter: float = 0.0
  joint: float = 0.0

  @property
  def active(self) -> bool:
    """Whether factor steps train cuts at all."""
    return bool(self.global_dropout or self.budgets)

  @property
  def drawn_budgets(self) -> tuple:
    """The budgets a step draws from (with the joint loss, those below 1)."""
    return tuple(b for b in self.budgets if b < 1.0 or not self.joint)

  def _key(self, count):
    return jax.random.fold_in(jax.random.key(self.seed + 2), count)

  def drop(self, count, whole):
    """The share global dropout drops at ``count``: q ~ U(0, p), 0 when
    ``whole`` (the first factor step)."""
    q = jax.random.uniform(self._key(count))
    return jnp.where(whole, 0.0, self.global_dropout * q)

  def keep(self, count, total: int, outside: int, whole):
    """The structure parameters the cut at ``count`` keeps with cut budgets:
    b total - outside for a budget b drawn from the count (``total`` the
    model's parameter count with every leaf at full size, ``outside`` its
    parameters outside the blocks); everything when ``whole``."""
    k_pick, k_jit = jax.random.split(self._key(count))
    drawn = self.drawn_budgets
    b = jnp.asarray(drawn, _F32)[jax.random.randint(k_pick, (), 0, len(drawn))]
    if self.jitter:  # a budget below 1 moves by U(-j, j)
      u = jax.random.uniform(k_jit, minval=-1.0, maxval=1.0)
      b = jnp.where(b < 1.0, b + self.jitter * u, b)
    return jnp.where(whole, jnp.inf, b * total - outside)

  def cuts(self, sigmas: dict, sparse: dict, count, total: int, outside: int, whole):
    """{block: (kept triplets, kept entries)} of ``consolidate.global_cut``
    at the step ``count`` (``sigmas``, ``sparse``: per block; ``whole``: the
    first factor step, which keeps everything); None when no cut is
    trained."""
    if not self.active:
      return None
    keys = sorted(sparse)
    sig, sp = [sigmas[i] for i in keys], [sparse[i] for i in keys]
    if self.budgets:
      kept = cons.global_cut(sig, sp, keep=self.keep(count, total, outside, whole),
                             overhead=self.overhead)
    else:
      kept = cons.global_cut(sig, sp, self.drop(count, whole))
    return dict(zip(keys, kept))
