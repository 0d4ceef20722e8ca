"""SALAAD's optimizer state: the pytree ``salaad`` / ``salaad_decoupled`` keep
(``SalaadState``) and the per-block fields it mirrors over the params.  Read
it through ``salaad_jax.stats`` (``find_state``, ``low_rank_factors``,
``sparse_parts``, ``block_metrics``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SalaadState(NamedTuple):
  """Optimizer state.  Every field but the counters and ``inner_state`` is a
  pytree mirroring the params (a compact S holds a (values, index) pair at
  each block's place); non-block leaves hold a (0,)-shaped float32
  placeholder.

  Attributes:
    count: optimisation steps taken (int32).
    num_rounds: ADMM rounds / controller updates taken, n (int32).
    inner_state: the base optimiser's state (EmptyState when decoupled).
    lr_u, lr_s, lr_v: L_i = lr_u diag(lr_s) lr_v^T, shapes (m, r), (r,),
      (n, r), float32; lr_s is already thresholded (zeros beyond the rank).
    sparse: S_i, either ``compact.CompactSparse(values, index)`` at the
      block's capacity (values in ``state_dtype``, int32 flat indices; the
      default) or, with ``sparse_capacity=None``, dense in the param's shape.
    dual: the scaled dual U_i = Y_i / rho_i in the param's shape (``dual_dtype``).
    alpha, beta: the penalty weights (float32 scalars).
    rank_rate, density: gamma_L and d_S measured at the last round.
    factored: with consolidation in factors (``consolidate_params='factors'``)
      a :class:`FactorState`; otherwise ``()``.
  """

  count: jax.Array
  num_rounds: jax.Array
  inner_state: Any
  lr_u: Any
  lr_s: Any
  lr_v: Any
  sparse: Any
  dual: Any
  alpha: Any
  beta: Any
  rank_rate: Any
  density: Any
  factored: Any = ()


class FactorState(NamedTuple):
  """The trained factors of consolidation in factors, and their optimiser.

  Attributes:
    factors: a pytree mirroring the params: ``(B, A)`` at each block
      (L_i = B A^T, B (m, w), A (n, w), w the consolidated rank), the
      placeholder elsewhere; zero until consolidation starts.
    inner_state: the inner optimiser's state for ``factors``.  It steps on
      zero gradients before consolidation, so its step counts (and with them
      its learning-rate schedule) match the main inner state's.
  """
  factors: Any
  inner_state: Any


PER_BLOCK_FIELDS = ("lr_u", "lr_s", "lr_v", "sparse", "dual", "alpha", "beta",
                     "rank_rate", "density")


def placeholder():
  """The (0,)-shaped float32 leaf a per-block field holds at a non-block param."""
  return jnp.zeros((0,), jnp.float32)


def is_placeholder(x) -> bool:
  """Whether ``x`` is a :func:`placeholder`."""
  return getattr(x, "shape", None) == (0,)


# The state as checkpoints written before ``factored`` existed hold it.
_SalaadStateV1 = NamedTuple("SalaadState", [(f, Any) for f in SalaadState._fields
                                            if f != "factored"])


def as_v1(tree):
  """``tree`` with every SalaadState whose ``factored`` is empty in the
  field layout of earlier checkpoints (no ``factored``), for restoring them."""
  is_state = lambda x: isinstance(x, SalaadState)
  return jax.tree.map(lambda x: _SalaadStateV1(*x[:-1]) if is_state(x) and x.factored == ()
                      else x, tree, is_leaf=is_state)


def from_v1(tree):
  """The inverse of :func:`as_v1`."""
  is_old = lambda x: isinstance(x, _SalaadStateV1)
  return jax.tree.map(lambda x: SalaadState(*x) if is_old(x) else x, tree, is_leaf=is_old)
