"""Compact storage of the sparse part S_i at a bounded capacity.

S_i is about d* dense (SALAAD.md §2), so storing it in the parameter's shape
wastes most of its bytes.  With a capacity c = ceil(kappa m n) (``kappa``:
the fraction of the block's entries S_i may hold) it is kept as

    values (c,)  in S's storage dtype,   index (c,)  int32

with S_i.flat[index[j]] = values[j]: flat, row-major indices into the block
(the same in the parameter's shape and in its matrix view, which is a
reshape).  Unused slots hold value 0 at a valid index, so scattering them
adds nothing.

``compactify`` is the projection onto {nnz(S) <= c}: it keeps the c entries
of largest |S| (ties: the lower flat index), which is S itself, exactly,
when nnz(S) <= c.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32

# sparse_capacity='auto': kappa = min(1, AUTO_FACTOR d*).  The controller holds
# d_S near d* on average, but single blocks spike above it in some rounds; 3 d*
# is the factor measured without a quality cost (benchmarks/RESULTS.md, "What
# the compact S costs").
AUTO_FACTOR = 3.0


class CompactSparse(NamedTuple):
  """S_i as ``values`` at flat ``index`` (both (capacity,)); the rest is 0."""

  values: jax.Array
  index: jax.Array


def capacity(size: int, fraction: float) -> int:
  """c = ceil(fraction * size) entries, within [1, size]."""
  return int(min(size, max(1, math.ceil(fraction * size - 1e-9))))


def empty(cap: int, dtype) -> CompactSparse:
  """S = 0 at capacity ``cap`` (the slots at indices 0 .. cap - 1, as
  ``compactify`` of zeros gives them)."""
  return CompactSparse(jnp.zeros((cap,), dtype), jnp.arange(cap, dtype=jnp.int32))


def compactify(s: jax.Array, cap: int) -> CompactSparse:
  """The ``cap`` entries of largest |s| (any shape) with their flat indices.

  ``lax.top_k`` over |s| on the flattened block: one selection whether or not
  the capacity binds, so it vmaps without running two branches, and it is
  O(size log cap) work on CPU and a (segmented) sort on GPU, the same order
  as the sort in ``prox.topk_threshold`` that the hard-cut S-step already
  pays every round.  A threshold followed by ``jnp.nonzero(size=cap)`` would
  need that sort too once nnz > cap.  Ties go to the lower index, and when
  nnz(s) <= cap every nonzero is kept (slots beyond it hold zeros).
  """
  flat = jnp.asarray(s).reshape(-1)
  _, index = jax.lax.top_k(jnp.abs(flat.astype(_F32)), cap)
  return CompactSparse(flat[index], index.astype(jnp.int32))


def densify(c: CompactSparse, shape, dtype=_F32) -> jax.Array:
  """S in ``shape``: zeros with ``values`` scattered-added at ``index``
  (adding, so a padding slot that repeats an index changes nothing)."""
  size = math.prod(shape)
  out = jnp.zeros((size,), dtype).at[c.index].add(jnp.asarray(c.values, dtype))
  return out.reshape(shape)


def project(s: jax.Array, cap: int) -> tuple[CompactSparse, jax.Array]:
  """S projected onto the capacity: (its compact storage, the same S dense in
  ``s``'s shape)."""
  stored = compactify(s, cap)
  return stored, densify(stored, s.shape, s.dtype)


def as_dense(stored, shape, dtype=_F32) -> jax.Array:
  """S in ``shape`` from either storage: ``CompactSparse`` or a dense array."""
  if isinstance(stored, CompactSparse):
    return densify(stored, shape, dtype)
  return jnp.asarray(stored, dtype).reshape(shape)

