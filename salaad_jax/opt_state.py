"""SALAAD's optimizer state: the pytree ``salaad`` / ``salaad_decoupled`` keep
(``SalaadState``) and the per-block fields it mirrors over the params.  Read
it through ``salaad_jax.stats`` (``find_state``, ``low_rank_factors``,
``sparse_parts``, ``block_metrics``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from salaad_jax import compact
from salaad_jax import prox
from salaad_jax import structure as st

_F32 = jnp.float32


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


# --------------------------------------------------------------------------
# The per-block fields of a group of blocks, stacked.
# --------------------------------------------------------------------------


class Blocks(NamedTuple):
  """The per-block fields of a group of g blocks of one matrix shape (m, n),
  stacked and in float32 matrix views: what a phase's step vmaps over.

  Attributes:
    factors: L = u diag(s) v^T, ``prox.Factors`` of (g, m, r), (g, r), (g, n, r).
    sparse: S, (g, m, n) as :func:`gather` gives it; to :func:`scatter`, S as
      it is to be stored: a ``compact.CompactSparse`` of (g, c) arrays when
      the blocks have a capacity c, (g, m, n) otherwise.
    dual: the scaled dual U, (g, m, n).
    alpha, beta, rank_rate, density: (g,).
  """
  factors: prox.Factors
  sparse: Any
  dual: jax.Array
  alpha: jax.Array
  beta: jax.Array
  rank_rate: jax.Array
  density: jax.Array


def fields_of(state: SalaadState, treedef) -> dict[str, list]:
  """The per-block fields of ``state`` as lists over the params' leaves."""
  return {f: list(treedef.flatten_up_to(getattr(state, f))) for f in PER_BLOCK_FIELDS}


def select(fields: dict[str, list], idx: list[int]) -> dict[str, list]:
  """The fields of the blocks ``idx`` only (numbered 0, 1, ... in that order)."""
  return {f: [v[i] for i in idx] for f, v in fields.items()}


def put(fields: dict[str, list], idx: list[int], sub: dict[str, list]) -> dict[str, list]:
  """``fields`` with the blocks ``idx`` replaced by ``sub`` (as :func:`select` gives)."""
  out = {f: list(v) for f, v in fields.items()}
  for f, v in sub.items():
    for j, i in enumerate(idx):
      out[f][i] = v[j]
  return out


def gather(fields: dict[str, list], idx: list[int], infos: list) -> Blocks:
  """The blocks ``idx`` (``infos``: their ``BlockInfo``) of ``fields``, stacked."""
  stack = lambda name: jnp.stack([jnp.asarray(fields[name][i], _F32) for i in idx])
  return Blocks(
      prox.Factors(stack("lr_u"), stack("lr_s"), stack("lr_v")),
      jnp.stack([compact.as_dense(fields["sparse"][i], inf.matrix_shape)
                 for i, inf in zip(idx, infos)]),
      jnp.stack([st.as_matrix(jnp.asarray(fields["dual"][i], _F32), inf)
                 for i, inf in zip(idx, infos)]),
      stack("alpha"), stack("beta"), stack("rank_rate"), stack("density"))


def store_sparse(s, info, old):
  """S_i as stored: compact (``s`` already a ``CompactSparse``) or dense in
  the param's shape, in the storage dtype of ``old``."""
  if isinstance(old, compact.CompactSparse):
    return compact.CompactSparse(s.values.astype(old.values.dtype), s.index)
  return st.from_matrix(s, info).astype(old.dtype)


def scatter(fields: dict[str, list], idx: list[int], infos: list,
            blocks: Blocks) -> dict[str, list]:
  """``fields`` with the blocks ``idx`` replaced by ``blocks``, each in its
  storage (S compact or in the param's shape, U in the param's shape, both
  in the dtypes they had)."""
  out = {k: list(v) for k, v in fields.items()}
  for j, (i, inf) in enumerate(zip(idx, infos)):
    at = lambda tree, j=j: jax.tree.map(lambda a: a[j], tree)
    out["lr_u"][i], out["lr_s"][i], out["lr_v"][i] = at(tuple(blocks.factors))
    out["sparse"][i] = store_sparse(at(blocks.sparse), inf, fields["sparse"][i])
    out["dual"][i] = st.from_matrix(blocks.dual[j], inf).astype(fields["dual"][i].dtype)
    out["alpha"][i], out["beta"][i] = blocks.alpha[j], blocks.beta[j]
    out["rank_rate"][i], out["density"][i] = blocks.rank_rate[j], blocks.density[j]
  return out


def advance(state: SalaadState, treedef, fields: dict[str, list], inner_state,
            every_k) -> SalaadState:
  """``state`` one step on: the count, n = count // K, ``fields`` and the
  inner optimiser's state."""
  count = optax.safe_increment(state.count)
  trees = {f: jax.tree_util.tree_unflatten(treedef, v) for f, v in fields.items()}
  return state._replace(count=count, num_rounds=count // jnp.asarray(every_k, jnp.int32),
                        inner_state=inner_state, **trees)


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
