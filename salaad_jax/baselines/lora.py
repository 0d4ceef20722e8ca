"""LoRA on a frozen dense base, as pure functions on params pytrees.

For a target kernel W (m, n) (y = x W) an adapter is A (m, r), B (r, n):

    W_eff = W + (alpha / r) A B          [ + mask:  W + M * (alpha / r) A B ]

with B = 0 at init (W_eff = W) and A ~ U(-1/sqrt(m), 1/sqrt(m)) (Kaiming
uniform, a = sqrt(5), as PyTorch LoRA).  In the PyTorch (out, in) layout this
is the usual W + (alpha / r) B A.

Adapters are a nested dict mirroring the params, holding a `LoraPair` at each
target kernel's path and nothing elsewhere.  Training uses one tree
{'base': params, 'adapters': adapters}: `effective_params(tree, alpha)` is
what the unmodified model applies, and `freeze(tx)` makes every part except
the adapters untouched by the optimiser (optax.multi_transform with
set_to_zero); the base is also behind stop_gradient so no work is spent on
its gradient.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from salaad_jax import structure
from salaad_jax.baselines._projection import symmetric_uniform


class LoraPair(NamedTuple):
  """Low-rank factors of one kernel: delta W = scale a @ b."""

  a: jax.Array  # (m, r)
  b: jax.Array  # (r, n)


def flat(tree: Mapping) -> dict[str, Any]:
  """'/'-joined path -> leaf of a nested dict (LoraPair counts as a leaf)."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def nest(flat_tree: Mapping[str, Any]) -> dict:
  """Inverse of `flat`."""
  return traverse_util.unflatten_dict(dict(flat_tree), sep="/")


def target_paths(params: Mapping,
                 targets: structure.Structure = None) -> list[str]:
  """Paths of the kernels that get adapters (default: SALAAD's blocks, every
  2-D kernel except the head; or a regex / predicate on the path)."""
  pred = structure.make_predicate(targets)
  return [p for p, leaf in flat(params).items() if pred(p, leaf)]


def init(params: Mapping, rank: int | Mapping[str, int], key: jax.Array, *,
         targets: structure.Structure = None,
         dtype: Any = jnp.float32) -> dict:
  """Adapters with B = 0 for every target kernel; `rank` is one int or a
  path -> rank mapping (paths missing from it get no adapter)."""
  leaves = flat(params)
  out = {}
  for i, path in enumerate(target_paths(params, targets)):
    r = rank if isinstance(rank, int) else rank.get(path)
    if r is None:
      continue
    m, n = leaves[path].shape
    a = symmetric_uniform(1.0 / m ** 0.5)(jax.random.fold_in(key, i), (m, r),
                                          dtype)
    out[path] = LoraPair(a, jnp.zeros((r, n), dtype))
  return nest(out)


def delta(pair: LoraPair, alpha: float) -> jax.Array:
  """(alpha / r) A B in float32."""
  r = pair.a.shape[1]
  a = jnp.asarray(pair.a, jnp.float32)
  return (alpha / r) * (a @ jnp.asarray(pair.b, jnp.float32))


def merge(params: Mapping, adapters: Mapping, alpha: float,
          masks: Mapping | None = None) -> dict:
  """params with every adapted kernel W replaced by W + [M *] (alpha/r) A B
  (in W's dtype).  `masks` (same nesting as adapters, boolean) restricts the
  update to the kept entries, so a sparse W stays exactly as sparse."""
  leaves = flat(params)
  mask_leaves = flat(masks) if masks is not None else {}
  for path, pair in flat(adapters).items():
    w = leaves[path]
    d = delta(pair, alpha)
    if path in mask_leaves:
      d = jnp.where(mask_leaves[path], d, 0.0)
    leaves[path] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
  return nest(leaves)


def effective_params(tree: Mapping, alpha: float,
                     masks: Mapping | None = None) -> dict:
  """The params the model applies for a training tree {'base', 'adapters'}:
  merge(stop_gradient(base), adapters, alpha, masks)."""
  base = jax.lax.stop_gradient(tree["base"])
  return merge(base, tree["adapters"], alpha, masks)


def freeze(tx: optax.GradientTransformation,
           trainable: Sequence[str] = ("adapters",)
           ) -> optax.GradientTransformation:
  """`tx` on the top-level parts named in `trainable`, zero updates (and no
  optimiser state) for every other part of the training tree."""
  trainable = tuple(trainable)

  def labels(tree):
    return {k: jax.tree.map(lambda _, k=k: "train" if k in trainable
                            else "frozen", v) for k, v in tree.items()}

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               labels)
