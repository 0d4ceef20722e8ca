"""Exact parameter counts and deployment bytes (SALAAD.md §6).

A deployed block i of matrix shape (m, n) with rank r and nnz sparse entries
stores the two thin factors, (m + n) r values, and its sparse part.  The
parameter count of the model is

    P = P_model - sum_i (m_i n_i - (m_i + n_i) r_i) + sum_i nnz_i,

and its bytes, with b_w bytes per value (2 for bfloat16, 4 for float32) and
b_idx = 4 (int32) per index,

    bytes = b_w P_rest + sum_i [ (m_i + n_i) r_i b_w + sparse_bytes_i ]

    sparse_bytes_i = nnz (b_w + 2 b_idx)                    COO (row, col)
                   = nnz (b_w + b_idx) + (m + 1) b_idx      CSR (col, row ptr)
                   = nnz b_w + ceil(m n / 8)                bitmap + packed values

with sparse_bytes_i = 0 when nnz_i = 0 (no sparse part is stored).  The CSR
row pointer and the bitmap rounding are the storage the artifact really holds;
SALAAD.md's formula omits the O(m) row pointer.  Format ``dense`` stores every
block as a dense X_hat: P = P_model, bytes = b_w P_model.  Every parameter
outside the blocks (P_rest) is stored densely in the same value dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from salaad_jax import structure as st

FORMATS = ("dense", "coo", "csr", "bitmap")
SPARSE_FORMATS = ("coo", "csr", "bitmap")
INDEX_BYTES = 4
_DTYPES = {"bfloat16": 2, "bf16": 2, "float32": 4, "f32": 4, "fp32": 4}


def dtype_name(dtype) -> str:
  """'bfloat16' or 'float32' from a name or a dtype object."""
  key = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype), "name", str(dtype))
  key = str(key).lower()
  if key not in _DTYPES:
    raise ValueError(f"deployment dtype must be 'bfloat16' or 'float32', got {dtype!r}")
  return "bfloat16" if _DTYPES[key] == 2 else "float32"


def value_bytes(dtype) -> int:
  """b_w: bytes per stored value."""
  return _DTYPES[dtype_name(dtype)]


def check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"storage format must be one of {FORMATS}, got {fmt!r}")
  return fmt


def sparse_entry_bytes(fmt: str, b_w: int) -> int:
  """Bytes of one more sparse entry, once the block stores a sparse part."""
  return {"coo": b_w + 2 * INDEX_BYTES, "csr": b_w + INDEX_BYTES, "bitmap": b_w}[fmt]


def sparse_overhead_bytes(fmt: str, m: int, n: int) -> int:
  """Bytes a block's sparse part costs on top of its entries (when nnz > 0)."""
  return {"coo": 0, "csr": (m + 1) * INDEX_BYTES, "bitmap": math.ceil(m * n / 8)}[fmt]


def sparse_bytes(fmt: str, m: int, n: int, nnz: int, b_w: int) -> int:
  if nnz == 0:
    return 0
  return nnz * sparse_entry_bytes(fmt, b_w) + sparse_overhead_bytes(fmt, m, n)


def block_params(m: int, n: int, rank: int, nnz: int) -> int:
  """(m + n) r + nnz."""
  return (m + n) * rank + nnz


def block_bytes(fmt: str, m: int, n: int, rank: int, nnz: int, b_w: int) -> int:
  if fmt == "dense":
    return m * n * b_w
  return (m + n) * rank * b_w + sparse_bytes(fmt, m, n, nnz, b_w)


def _total_params(params, allocation) -> int:
  if params is None:
    return allocation.total_params
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = {st.path_str(p): tuple(np.shape(x)) for p, x in flat}
  for b in allocation.blocks:
    if shapes.get(b.path) != b.shape:
      raise ValueError(f"the allocation's block '{b.path}' with shape {b.shape} is not a "
                       f"parameter of these params (found {shapes.get(b.path)})")
  total = int(sum(math.prod(s) for s in shapes.values()))
  if total != allocation.total_params:
    raise ValueError(f"params have {total} scalars but the allocation was made for a "
                     f"model of {allocation.total_params}")
  return total


def account(params, allocation, fmt: str = "coo", dtype="bfloat16") -> dict[str, Any]:
  """Parameter count and bytes of ``allocation`` stored as ``fmt`` in ``dtype``.

  Args:
    params: the dense parameters (arrays or ShapeDtypeStructs), checked
      against the allocation; None trusts the allocation's own counts.
    allocation: an ``Allocation``.
    fmt: 'dense' | 'coo' | 'csr' | 'bitmap'.
    dtype: value dtype, 'bfloat16' or 'float32'.

  Returns:
    dict with params, bytes, dense_params (P_model), dense_bytes
    (b_w P_model), rest_params, params_fraction, bytes_fraction, fmt, dtype
    and blocks: {path: {rank, nnz, params, bytes}}.
  """
  check_format(fmt)
  b_w = value_bytes(dtype)
  total = _total_params(params, allocation)
  rest = total - sum(b.m * b.n for b in allocation.blocks)
  per_block = {}
  for b in allocation.blocks:
    p = b.m * b.n if fmt == "dense" else block_params(b.m, b.n, b.rank, b.nnz)
    per_block[b.path] = dict(rank=b.rank, nnz=b.nnz, params=p,
                             bytes=block_bytes(fmt, b.m, b.n, b.rank, b.nnz, b_w))
  n_params = rest + sum(v["params"] for v in per_block.values())
  n_bytes = rest * b_w + sum(v["bytes"] for v in per_block.values())
  return dict(params=n_params, bytes=n_bytes, dense_params=total, dense_bytes=total * b_w,
              rest_params=rest, params_fraction=n_params / total,
              bytes_fraction=n_bytes / (total * b_w), fmt=fmt, dtype=dtype_name(dtype),
              blocks=per_block)
