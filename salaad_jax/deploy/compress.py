"""Truncating every block to its allocation: dense X_hat or compact storage.

For block i with allocation (r_i, nnz_i) and canonical spectrum
L_i = U diag(sigma~) V^T (``spectra.BlockSpectrum``):

    L_i,r  = U[:, :r] diag(sigma~[:r]) V[:, :r]^T
    S_i,nnz = the nnz entries of S_i of largest (weighted) magnitude
    X_hat_i = L_i,r + S_i,nnz.

``dense_reconstruction`` writes X_hat_i back into the parameter tree (the
reference path: the plain model evaluates it).  ``compress`` stores the
same block as A = U_r diag(sqrt sigma~_r), B = V_r diag(sqrt sigma~_r)
(L_i,r = A B^T, (m + n) r values) and S_i,nnz in a sparse format, giving the
parameter tree of ``Llama(config, dense_cls=structured_dense(layouts))``;
every other leaf is kept, cast to the deployment dtype.  A block kept at
rank 0 with no sparse entry stores nothing (it applies as an all-zero
matrix), and its module is left out of the tree altogether, as Flax leaves
out a module without parameters: the tree holds no empty dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax import structure as st
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy.allocation import Allocation
from salaad_jax.deploy.spectra import BlockSpectrum, Blocks, spectra
from salaad_jax.models.structured import BlockLayout


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
  """A compressed model.

  Attributes:
    params: nested dict of arrays; each block's leaf is replaced by lr_a,
      lr_b, sp_values and the format's index arrays in its parent dict (for
      fmt 'dense' by X_hat itself).  It holds no empty dict: a block kept
      at rank 0 with nnz 0 has no entry, nor has a module left empty.
    layouts: {module path: BlockLayout} of the structured blocks (empty for
      'dense').
    allocation: the allocation it realises.
    fmt: 'dense' | 'coo' | 'csr' | 'bitmap'.
    dtype: 'bfloat16' | 'float32', the dtype of every stored value.
  """

  params: dict
  layouts: dict[str, BlockLayout]
  allocation: Allocation
  fmt: str
  dtype: str


def as_blocks(params, source, allocation: Allocation) -> Blocks:
  """``source`` as ``Blocks`` matching ``allocation``.

  ``source`` is the ``Blocks`` the allocation was made from, or an optimizer
  state / ``Decomposition`` (spectra are then recomputed without weights).
  """
  if isinstance(source, Blocks):
    blocks = source
  else:
    if allocation.weighted:
      raise ValueError("this allocation was made with calibration weights; pass the "
                       "weighted Blocks it was computed from instead of the optimizer state")
    blocks = spectra(params, source)
  if blocks.weighted != allocation.weighted:
    raise ValueError("the Blocks and the allocation disagree on calibration weighting")
  have = {b.path: b for b in blocks.blocks}
  if set(have) != {b.path for b in allocation.blocks}:
    raise ValueError(f"the allocation covers blocks {sorted(allocation.ranks)} but the source "
                     f"holds {sorted(have)}")
  for a in allocation.blocks:
    b = have[a.path]
    if b.shape != a.shape or a.rank > b.max_rank or a.nnz > b.max_nnz:
      raise ValueError(f"block '{a.path}': allocation rank {a.rank} / nnz {a.nnz} at shape "
                       f"{a.shape} exceeds what the source holds (rank {b.max_rank}, "
                       f"nnz {b.max_nnz}, shape {b.shape})")
  return blocks


def kept_entries(block: BlockSpectrum, nnz: int) -> np.ndarray:
  """Flat row-major indices of the nnz kept entries of S, ascending."""
  return np.sort(block.sparse_order[:nnz])


def truncated(block: BlockSpectrum, rank: int, nnz: int) -> np.ndarray:
  """X_hat = L_r + S_nnz as an (m, n) float64 matrix."""
  x = (block.u[:, :rank] * block.sigma[:rank]) @ block.v[:, :rank].T
  idx = kept_entries(block, nnz)
  x.reshape(-1)[idx] += block.sparse.reshape(-1)[idx]
  return x


def _nested(params) -> dict:
  if isinstance(params, Mapping):
    return {k: _nested(v) for k, v in params.items()}
  return params


def drop_empty(tree):
  """``tree`` (nested dicts) without its empty dicts, at any depth: a dict
  left empty once its empty children are gone is dropped too."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for k, v in tree.items():
    v = drop_empty(v)
    if not (isinstance(v, Mapping) and not v):
      out[k] = v
  return out


def _split(path: str) -> tuple[list[str], str]:
  parts = path.split("/")
  return parts[:-1], parts[-1]


def _parent(tree: dict, keys: list[str], path: str) -> dict:
  node = tree
  for k in keys:
    if not isinstance(node, dict) or k not in node:
      raise ValueError(f"block '{path}' is not a leaf of a nested dict of parameters")
    node = node[k]
  return node


def dense_reconstruction(params, source, allocation: Allocation):
  """``params`` with every block replaced by X_hat_i (in the leaf's dtype).

  ``source``: the ``Blocks`` the allocation came from, or the optimizer state
  (or ``Decomposition``) when it was made without calibration weights.
  """
  blocks = as_blocks(params, source, allocation)
  hats = {a.path: truncated(blocks[a.path], a.rank, a.nnz) for a in allocation.blocks}

  def swap(path, x):
    h = hats.get(st.path_str(path))
    return x if h is None else jnp.asarray(h.reshape(np.shape(x)), x.dtype)

  return jax.tree_util.tree_map_with_path(swap, params)


def _sparse_arrays(block: BlockSpectrum, nnz: int, fmt: str, dtype) -> dict[str, Any]:
  if nnz == 0:
    return {}
  m, n = block.m, block.n
  idx = kept_entries(block, nnz)
  out = {"sp_values": jnp.asarray(block.sparse.reshape(-1)[idx], dtype)}
  rows, cols = (idx // n).astype(np.int32), (idx % n).astype(np.int32)
  if fmt == "coo":
    out["sp_rows"], out["sp_cols"] = jnp.asarray(rows), jnp.asarray(cols)
  elif fmt == "csr":
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))]).astype(np.int32)
    out["sp_cols"], out["sp_row_ptr"] = jnp.asarray(cols), jnp.asarray(ptr)
  else:
    mask = np.zeros(m * n, np.uint8)
    mask[idx] = 1
    out["sp_bitmap"] = jnp.asarray(np.packbits(mask))
  return out


def _structured_arrays(block: BlockSpectrum, rank: int, nnz: int, fmt: str, dtype):
  out = {}
  if rank:
    root = np.sqrt(block.sigma[:rank])
    out["lr_a"] = jnp.asarray(block.u[:, :rank] * root, dtype)
    out["lr_b"] = jnp.asarray(block.v[:, :rank] * root, dtype)
  out.update(_sparse_arrays(block, nnz, fmt, dtype))
  return out


def compress(params, source, allocation: Allocation, fmt: str = "coo",
             dtype="bfloat16") -> Artifact:
  """The compact artifact of ``allocation`` (see the module docstring).

  Args:
    params: the trained parameters, a nested dict.
    source: the ``Blocks`` the allocation came from, or the optimizer state
      / ``Decomposition`` (unweighted allocations only).
    allocation: per-block (rank, nnz).
    fmt: 'dense' | 'coo' | 'csr' | 'bitmap'.
    dtype: stored value dtype, 'bfloat16' or 'float32'.

  Raises:
    ValueError: bad format/dtype, mismatched source and allocation, or two
      blocks sharing one parent module.
  """
  acc.check_format(fmt)
  name = acc.dtype_name(dtype)
  dt = jnp.dtype(name)
  blocks = as_blocks(params, source, allocation)
  if fmt == "dense":
    hat = dense_reconstruction(params, blocks, allocation)
    tree = jax.tree.map(lambda x: jnp.asarray(x, dt), _nested(hat))
    return Artifact(tree, {}, allocation, fmt, name)
  tree = jax.tree.map(lambda x: jnp.asarray(x, dt), _nested(params))
  layouts = {}
  for a in allocation.blocks:
    keys, leaf = _split(a.path)
    module = "/".join(keys)
    if module in layouts:
      raise ValueError(f"blocks '{a.path}' and another leaf of module '{module}' cannot "
                       "both be stored structured")
    parent = _parent(tree, keys, a.path)
    del parent[leaf]
    parent.update(_structured_arrays(blocks[a.path], a.rank, a.nnz, fmt, dt))
    layouts[module] = BlockLayout(a.m, a.n, a.rank, a.nnz, fmt)
  return Artifact(drop_empty(tree), layouts, allocation, fmt, name)
