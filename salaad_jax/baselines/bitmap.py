"""Bitmap-plus-values storage of a sparse matrix (host side, NumPy).

A sparse (m, n) matrix W with support M = (W != 0) is stored as

    bits   = packbits(M.ravel())        ceil(m n / 8) bytes (uint8)
    values = W[M]  in row-major order   nnz * itemsize bytes

so bytes = ceil(m n / 8) + nnz b_w (SALAAD.md §6, bitmap format).  Unpacking
reads the first m n bits and scatters the values back.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class BitmapSparse(NamedTuple):
  """A packed sparse matrix: bitmap of the support and its values."""

  bits: np.ndarray    # uint8, (ceil(m n / 8),)
  values: np.ndarray  # (nnz,), row-major order of the support
  shape: tuple[int, int]

  @property
  def nbytes(self) -> int:
    """Stored bytes: bitmap plus values."""
    return int(self.bits.nbytes + self.values.nbytes)


def pack(w, mask=None, value_dtype=None) -> BitmapSparse:
  """Packs w (2-D) keeping the entries where `mask` (default: w != 0).

  Values are cast to `value_dtype` (default: w's dtype, a lossless round
  trip).
  """
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"bitmap packing needs a matrix, got shape {w.shape}.")
  mask = w != 0 if mask is None else np.asarray(mask, bool)
  if mask.shape != w.shape:
    raise ValueError(f"mask shape {mask.shape} differs from {w.shape}.")
  values = w[mask]
  if value_dtype is not None:
    values = values.astype(value_dtype)
  return BitmapSparse(np.packbits(mask.ravel()), values,
                      (int(w.shape[0]), int(w.shape[1])))


def unpack_mask(packed: BitmapSparse) -> np.ndarray:
  """The boolean support M of a packed matrix."""
  m, n = packed.shape
  return np.unpackbits(packed.bits, count=m * n).astype(bool).reshape(m, n)


def unpack(packed: BitmapSparse) -> np.ndarray:
  """The dense matrix: values at the support, zeros elsewhere."""
  mask = unpack_mask(packed)
  out = np.zeros(packed.shape, packed.values.dtype)
  out[mask] = packed.values
  return out
