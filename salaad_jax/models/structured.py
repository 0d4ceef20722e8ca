"""Structured inference layer: a Dense whose kernel is stored as L + S.

A block X = L + S of shape (m, n) = (in, out) is held as two thin factors
A (m, r) and B (n, r) with L = A B^T, and the nnz entries of S in a compact
sparse format, so

    y = (x A) B^T + x S,      (x S)_c = sum_{k: col_k = c} x_{row_k} v_k,

with the sparse product done by a gather of x at the entries' rows and a
scatter-add into their columns (accumulated in float32); the dense X_hat is
never materialised.  Sparse formats and their parameters:

    coo     sp_values (nnz,), sp_rows (nnz,) int32, sp_cols (nnz,) int32
    csr     sp_values (nnz,), sp_cols (nnz,) int32, sp_row_ptr (m+1,) int32
    bitmap  sp_values (nnz,) in row-major order, sp_bitmap (ceil(m n / 8),)
            uint8 (numpy.packbits, big-endian bits)

with low-rank parameters lr_a (m, r) and lr_b (n, r).  Those are the stored
formats; ``salaad_jax.models.runtime.prepare`` decodes them once at load into
a runtime format, so no index is decoded inside the forward:

    ell     sp_ell_rows (n, w) int32, sp_values (n, w): column c's
            entries (row, value) in its first slots, padded with (0, 0),
            w = the largest column count (``BlockLayout.width``)

    (x S)_c = sum_j x_{rows[c, j]} values[c, j]: a row gather of x^T, no
    scatter.

    flat    sp_flat (nnz,) int32 = row * n + col, sp_values (nnz,): the
            entries' positions in X_hat, 4 index bytes per entry

A block whose layout has ``dense_rows`` > 0 computes a call on at least that
many rows of x (a prefill) with X_hat materialised for the call,
A B^T + S accumulated in float32 and rounded once, and one matmul: the
block is held compact and costs one dense block of memory while it runs;
fewer rows (decoding) take the factored product above.

A part that is empty
(r = 0 or nnz = 0) has no parameters.  Per-block shapes differ, so the layer
reads them from a table keyed by the module path (e.g.
'layers_0/attn/q_proj'); a projection not in the table keeps a dense
``kernel``.  Use ``Llama(config, dense_cls=structured_dense(layouts))``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from salaad_jax.models.llama import dot_general_f32

__all__ = ["BlockLayout", "StructuredDense", "materialise", "structured_dense"]

SPARSE_FORMATS = ("coo", "csr", "bitmap")
RUNTIME_FORMATS = ("ell", "flat")
# Up to this many rows of x the ELL product gathers x's columns directly; above
# it, the rows of x^T (contiguous over tokens), which vectorises.
ELL_DIRECT_ROWS = 16
_ZEROS = nn.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Static shape of one structured block: matrix (m, n), rank, nnz, format
  (and for the runtime format 'ell' its width w, the largest column count);
  ``dense_rows`` > 0: calls on at least that many rows of x run on X_hat
  materialised for the call (module docstring)."""

  m: int
  n: int
  rank: int
  nnz: int
  fmt: str = "coo"
  width: int = 0
  dense_rows: int = 0

  def __post_init__(self):
    if self.fmt not in SPARSE_FORMATS + RUNTIME_FORMATS:
      raise ValueError(f"sparse format must be one of {SPARSE_FORMATS + RUNTIME_FORMATS}, "
                       f"got {self.fmt!r}")
    if (min(self.m, self.n) <= 0 or self.rank < 0 or not 0 <= self.nnz <= self.m * self.n
        or self.dense_rows < 0):
      raise ValueError(f"invalid block layout {self}")
    if self.fmt == "ell" and self.nnz and not self.nnz / self.n <= self.width <= self.m:
      raise ValueError(f"an 'ell' block of {self.nnz} entries over {self.n} columns needs a "
                       f"width in [nnz / n, m], got {self.width}")


def sparse_rows_cols(layout: BlockLayout, idx: Mapping[str, jax.Array]):
  """(rows, cols) int32 of the nnz stored entries, from the format's indices."""
  k = layout.nnz
  if layout.fmt == "coo":
    return idx["sp_rows"], idx["sp_cols"]
  if layout.fmt == "flat":
    flat = idx["sp_flat"]
    return flat // layout.n, flat % layout.n
  if layout.fmt == "csr":
    rows = jnp.searchsorted(idx["sp_row_ptr"], jnp.arange(k, dtype=jnp.int32),
                            side="right") - 1
    return rows.astype(jnp.int32), idx["sp_cols"]
  bits = jnp.unpackbits(idx["sp_bitmap"], count=layout.m * layout.n)
  flat = jnp.nonzero(bits, size=k)[0].astype(jnp.int32)
  return flat // layout.n, flat % layout.n


_INDEX_PARAMS = {"coo": (("sp_rows", "nnz"), ("sp_cols", "nnz")),
                 "csr": (("sp_cols", "nnz"), ("sp_row_ptr", "m+1")),
                 "bitmap": (("sp_bitmap", "bits"),),
                 "ell": (("sp_ell_rows", "n,w"),),
                 "flat": (("sp_flat", "nnz"),)}


def index_shapes(layout: BlockLayout) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{name: (shape, dtype)} of the index arrays of a block's sparse part."""
  if layout.nnz == 0:
    return {}
  sizes = {"nnz": (layout.nnz,), "m+1": (layout.m + 1,),
           "bits": (-(-layout.m * layout.n // 8),), "n,w": (layout.n, layout.width)}
  return {name: (sizes[size], jnp.uint8 if name == "sp_bitmap" else jnp.int32)
          for name, size in _INDEX_PARAMS[layout.fmt]}


def values_shape(layout: BlockLayout) -> tuple[int, ...]:
  """Shape of a block's stored sparse values."""
  return (layout.n, layout.width) if layout.fmt == "ell" else (layout.nnz,)


def ell_product(xs: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  """x S (float32, (T, n)) for S in ELL form: rows, values (n, w).

  Few rows of x (decoding): gather x[:, rows] (T, n, w) and contract w.
  Many (prefill): accumulate over the w slots the rows of x^T gathered at
  rows[:, j] (each a contiguous run of T values) times values[:, j], then
  transpose once.  The accumulation sits in a ``lax.cond`` so that XLA
  keeps its (n, T) layout instead of folding the final transpose into the
  gather (which makes the gather strided and ~10x slower on CPU).
  """
  f32 = jnp.float32
  if xs.shape[0] <= ELL_DIRECT_ROWS:
    g = jnp.take(xs, rows, axis=1, mode="clip").astype(f32)
    return jnp.einsum("tnw,nw->tn", g, values.astype(f32))

  def accumulate(xt, rows, values):
    acc = jnp.zeros((rows.shape[0], xt.shape[1]), f32)
    for j in range(rows.shape[1]):
      acc = acc + (jnp.take(xt, rows[:, j], axis=0, mode="clip").astype(f32)
                   * values[:, j, None].astype(f32))
    return acc

  always = rows[0, 0] >= 0  # data-dependent, so XLA keeps the conditional
  acc = jax.lax.cond(always, accumulate, lambda xt, r, v: jnp.zeros(
      (r.shape[0], xt.shape[1]), f32), xs.T, rows, values)
  return acc.T


class StructuredDense(nn.Module):
  """Drop-in for ``nn.Dense`` computing x (A B^T + S) from compact storage.

  Attributes:
    features: n, the output width.
    layouts: ((module path, BlockLayout), ...): the structured blocks.
    use_bias, dtype, param_dtype, kernel_init, bias_init: as ``nn.Dense``
      (``kernel_init`` is used only by projections outside ``layouts``).
  """

  features: int
  layouts: tuple[tuple[str, BlockLayout], ...] = ()
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    key = "/".join(self.path)
    layout = dict(self.layouts).get(key)
    if layout is None:
      kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                          self.param_dtype)
      x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
      y = dot_general_f32(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    else:
      if (x.shape[-1], self.features) != (layout.m, layout.n):
        raise ValueError(
            f"structured block '{key}' stores a ({layout.m}, {layout.n}) matrix but the "
            f"layer maps {x.shape[-1]} to {self.features} features")
      y = self._structured(x, layout)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    return y

  def _structured(self, x: jax.Array, layout: BlockLayout) -> jax.Array:
    dtype = self.dtype or x.dtype
    lead = x.shape[:-1]
    xs = jnp.asarray(x, dtype).reshape(-1, layout.m)
    a = b = values = None
    if layout.rank:
      a = jnp.asarray(self.param("lr_a", _ZEROS, (layout.m, layout.rank), self.param_dtype), dtype)
      b = jnp.asarray(self.param("lr_b", _ZEROS, (layout.n, layout.rank), self.param_dtype), dtype)
    if layout.nnz:
      values = self.param("sp_values", _ZEROS, values_shape(layout), self.param_dtype)
      idx = {name: self.param(name, _ZEROS, shape, dt)
             for name, (shape, dt) in index_shapes(layout).items()}
    if layout.dense_rows and xs.shape[0] >= layout.dense_rows:
      # X_hat must wait for x, or XLA builds every layer's X_hat up front and
      # holds them all: tie the factors to x by an exact zero (0 * [x_00 is
      # NaN], finite whatever x holds).
      tie = (xs[0, 0] != xs[0, 0]).astype(dtype) * jnp.zeros((), dtype)
      if layout.rank:
        a = a + tie
      elif layout.nnz:
        values = values + tie.astype(values.dtype)
      kernel = materialise(layout, a, b, values, idx if layout.nnz else {})
      out = jnp.dot(xs, kernel.astype(dtype), preferred_element_type=jnp.float32)
      return out.astype(dtype).reshape(lead + (layout.n,))
    out = jnp.zeros((xs.shape[0], layout.n), jnp.float32)
    if layout.rank:
      t = jnp.dot(xs, a, preferred_element_type=jnp.float32)
      out = out + jnp.dot(t.astype(dtype), b.T, preferred_element_type=jnp.float32)
    if layout.nnz:
      if layout.fmt == "ell":
        out = out + ell_product(xs, idx["sp_ell_rows"], values)
      else:
        rows, cols = sparse_rows_cols(layout, idx)
        contrib = xs[:, rows].astype(jnp.float32) * values.astype(jnp.float32)
        out = out.at[:, cols].add(contrib)
    return out.astype(dtype).reshape(lead + (layout.n,))


def materialise(layout: BlockLayout, a, b, values, idx: Mapping[str, jax.Array]) -> jax.Array:
  """X_hat = A B^T + S (float32, (m, n)) of a block from its parameters
  (a, b None when rank 0; values None when nnz 0)."""
  if layout.rank:
    kernel = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  else:
    kernel = jnp.zeros((layout.m, layout.n), jnp.float32)
  if not layout.nnz:
    return kernel
  v = values.astype(jnp.float32)
  if layout.fmt == "ell":
    cols = jnp.broadcast_to(jnp.arange(layout.n, dtype=jnp.int32)[:, None], v.shape)
    return kernel.at[idx["sp_ell_rows"], cols].add(v)  # padding adds 0 at row 0
  if layout.fmt == "flat":
    return kernel.reshape(-1).at[idx["sp_flat"]].add(v).reshape(layout.m, layout.n)
  rows, cols = sparse_rows_cols(layout, idx)
  return kernel.at[rows, cols].add(v)


def structured_dense(layouts: Mapping[str, BlockLayout]) -> Callable[..., nn.Module]:
  """A ``dense_cls`` for ``Llama`` building ``StructuredDense`` layers that
  read their shapes from ``layouts`` ({module path: BlockLayout})."""
  for path, lay in layouts.items():
    if not isinstance(lay, BlockLayout):
      raise TypeError(f"layouts['{path}'] must be a BlockLayout, got {type(lay).__name__}")
  return functools.partial(StructuredDense, layouts=tuple(sorted(layouts.items())))
