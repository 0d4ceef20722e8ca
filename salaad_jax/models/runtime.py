"""The runtime form of a structured model: indices decoded once, at load.

A deployed artifact stores each block X_hat = A B^T + S with S in a compact
format (``coo``, ``csr``, ``bitmap``: ``salaad_jax.models.structured``).
``prepare`` turns those parameters into what the forward reads, once,
outside any jitted function, so the forward never decodes an index
(no ``unpackbits``, ``nonzero`` or ``searchsorted``):

    product 'coo'    S as (row, col, value) triples: gather x at the rows,
                     scatter-add into the columns (the stored layer's product)
    product 'ell'    S by column, padded to the widest column (BlockLayout
                     ``width`` w): a row gather of x^T and a sum over w slots,
                     no scatter; n w (b_w + 4) bytes held at runtime
    product 'dense'  X_hat itself, (m, n): one matmul, m n b_w bytes held at
                     runtime (the stored bytes stay compact)
    product 'auto'   per block, whichever of 'ell' and 'dense' runs the
                     block faster on this device at ``auto_rows`` rows of x
                     (median of a few timed calls, ``models.timing``)
    product 'adaptive'  S as its entries' flat positions (4 + b_w bytes an
                     entry at runtime); a call on few rows of x (decoding)
                     takes the factored product (a gather of x and a
                     scatter-add), a call on at least the block's
                     ``dense_rows`` rows (prefill) materialises X_hat for the
                     call and runs one matmul.  ``dense_rows`` is where the
                     materialised product starts to run faster on this device:
                     timed on one block of each shape class at the row
                     counts ``ladder`` (0: never), once per process

The low-rank part stays two thin matmuls, (x A) B^T, in every product but
'dense' (and 'adaptive' above its ``dense_rows``).  The runtime bytes of the result (``tree_bytes``) are what the
device holds; the artifact's stored bytes are unchanged by the choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax.models import timing
from salaad_jax.models.structured import BlockLayout, StructuredDense

__all__ = ["PRODUCTS", "decoded_entries", "dense_rows", "ell_arrays", "prepare", "tree_bytes"]

PRODUCTS = ("coo", "ell", "dense", "auto", "adaptive")
LADDER = (16, 64, 256, 1024)
# 'adaptive': (device kind, dtype, ladder, m, n, has L, has S) -> dense_rows,
# timed once per process (a spectrum prepares many budgets of one model).
_CROSSOVER: dict[tuple, int] = {}


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of ``tree`` (what the device holds)."""
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def decoded_entries(layout: BlockLayout, node: Mapping[str, Any]):
  """(rows, cols, values) of a block's stored sparse part, as numpy arrays in
  row-major order, decoded from its format (empty when nnz = 0)."""
  if layout.nnz == 0:
    return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
  values = np.asarray(node["sp_values"])
  if layout.fmt == "coo":
    rows, cols = np.asarray(node["sp_rows"]), np.asarray(node["sp_cols"])
  elif layout.fmt == "csr":
    ptr = np.asarray(node["sp_row_ptr"])
    rows, cols = np.repeat(np.arange(layout.m), np.diff(ptr)), np.asarray(node["sp_cols"])
  elif layout.fmt == "bitmap":
    bits = np.unpackbits(np.asarray(node["sp_bitmap"]), count=layout.m * layout.n)
    flat = np.flatnonzero(bits)
    rows, cols = flat // layout.n, flat % layout.n
  else:
    raise ValueError(f"block stored as {layout.fmt!r} is already in a runtime format")
  if len(rows) != layout.nnz:
    raise ValueError(f"a {layout.fmt} block of {layout.nnz} entries decodes to {len(rows)}")
  order = np.lexsort((cols, rows))
  return rows[order].astype(np.int32), cols[order].astype(np.int32), values[order]


def ell_arrays(rows, cols, values, n: int):
  """S by column: (ell_rows (n, w) int32, ell_values (n, w)), column c's
  entries first in its row, padded with row 0 / value 0; w >= 1."""
  counts = np.bincount(cols, minlength=n)
  width = max(1, int(counts.max(initial=0)))
  order = np.argsort(cols, kind="stable")
  c = cols[order]
  slot = np.arange(len(c)) - np.concatenate([[0], np.cumsum(counts)])[c]
  ell_rows = np.zeros((n, width), np.int32)
  ell_values = np.zeros((n, width), values.dtype)
  ell_rows[c, slot] = rows[order]
  ell_values[c, slot] = values[order]
  return ell_rows, ell_values


def _dense_kernel(layout: BlockLayout, node, rows, cols, values, dtype):
  x = np.zeros((layout.m, layout.n), np.float32)
  if layout.rank:
    x += np.asarray(node["lr_a"], np.float32) @ np.asarray(node["lr_b"], np.float32).T
  np.add.at(x, (rows, cols), np.asarray(values, np.float32))
  return jnp.asarray(x, dtype)


def _low_rank(node) -> dict:
  return {k: node[k] for k in ("lr_a", "lr_b") if k in node}


def _as_product(product: str, layout: BlockLayout, node, entries, dtype):
  """(runtime params of the block, its runtime layout or None for dense)."""
  rows, cols, values = entries
  if product == "dense":
    return {"kernel": _dense_kernel(layout, node, rows, cols, values, dtype)}, None
  out = _low_rank(node)
  if not layout.nnz:
    return out, BlockLayout(layout.m, layout.n, layout.rank, 0,
                            "flat" if product == "adaptive" else "coo")
  if product == "coo":
    out.update(sp_values=jnp.asarray(values, dtype), sp_rows=jnp.asarray(rows),
               sp_cols=jnp.asarray(cols))
    return out, BlockLayout(layout.m, layout.n, layout.rank, layout.nnz, "coo")
  if product == "adaptive":
    flat = rows.astype(np.int64) * layout.n + cols
    if flat.size and flat.max() >= 2 ** 31:
      raise ValueError(f"a ({layout.m}, {layout.n}) block has more positions than int32 holds")
    out.update(sp_values=jnp.asarray(values, dtype), sp_flat=jnp.asarray(flat, jnp.int32))
    return out, BlockLayout(layout.m, layout.n, layout.rank, layout.nnz, "flat")
  ell_rows, ell_values = ell_arrays(rows, cols, values, layout.n)
  out.update(sp_values=jnp.asarray(ell_values, dtype), sp_ell_rows=jnp.asarray(ell_rows))
  return out, BlockLayout(layout.m, layout.n, layout.rank, layout.nnz, "ell", ell_rows.shape[1])


def _block_call(params, layout, rows: int, dtype):
  """A call of the block's forward on ``rows`` rows of x, without arguments."""
  layouts = () if layout is None else (("", layout),)
  n = layout.n if layout is not None else params["kernel"].shape[1]
  m = layout.m if layout is not None else params["kernel"].shape[0]
  layer = StructuredDense(n, layouts=layouts, dtype=dtype, param_dtype=dtype)
  x = jnp.ones((rows, m), dtype)
  fn = jax.jit(layer.apply)
  return lambda: fn({"params": params}, x)


def _block_ms(params, layout, rows: int, dtype, repeats: int) -> float:
  call = _block_call(params, layout, rows, dtype)
  return timing.median_ms(timing.time_rounds([call], repeats)[0])


def dense_rows(params, layout: BlockLayout, dtype, ladder=LADDER, repeats: int = 5) -> int:
  """The fewest rows of x from ``ladder`` from which on (at every larger
  count of the ladder too) the block runs faster materialised than
  factored on this device, timed (interleaved) at each count; 0 when the
  materialised product is not faster at the largest count."""
  rows_from = 0
  for rows in sorted(ladder, reverse=True):
    calls = [_block_call(params, dataclasses.replace(layout, dense_rows=d), rows, dtype)
             for d in (0, 1)]
    factored, whole = (timing.median_ms(t) for t in timing.time_rounds(calls, repeats))
    if whole > factored:
      break
    rows_from = rows
  return rows_from


def _node(tree, module: str):
  node = tree
  for k in module.split("/") if module else []:
    if not isinstance(node, Mapping) or k not in node:
      return None
    node = node[k]
  return node


def _nested_copy(tree):
  return {k: _nested_copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def prepare(params, layouts: Mapping[str, BlockLayout], product: str = "ell", *,
            auto_rows: int = 2048, auto_repeats: int = 5, ladder=LADDER):
  """(runtime params, runtime layouts) of a structured model, for
  ``Llama(config, dense_cls=structured_dense(runtime layouts))``.

  Args:
    params: the artifact's parameters (a nested dict; blocks in a stored
      format).
    layouts: {module path: BlockLayout} of its structured blocks.
    product: 'coo' | 'ell' | 'dense' | 'auto' (module docstring).
    auto_rows, auto_repeats: rows of x and timed calls per candidate for
      'auto' (and the timed calls per row count for 'adaptive').
    ladder: the row counts at which 'adaptive' times its blocks.

  Returns:
    The parameters with every block in its runtime form (a block turned
    dense holds ``kernel`` and leaves the layouts) and the layouts of the
    blocks still structured.  A block with no stored part stays empty.
  """
  if product not in PRODUCTS:
    raise ValueError(f"structured product must be one of {PRODUCTS}, got {product!r}")
  tree = _nested_copy(params)
  out_layouts = {}
  for module, layout in sorted(layouts.items()):
    node = _node(tree, module)
    if node is None:  # rank 0 and no sparse entry: an all-zero block, no parameters
      out_layouts[module] = layout
      continue
    stored = [v for k, v in node.items() if k in ("lr_a", "sp_values")]
    dtype = stored[0].dtype
    entries = decoded_entries(layout, node)
    if product == "auto":
      candidates = [_as_product(p, layout, node, entries, dtype) for p in ("ell", "dense")]
      times = [_block_ms(p, lay, auto_rows, dtype, auto_repeats) for p, lay in candidates]
      new, new_layout = candidates[int(np.argmin(times))]
    else:
      new, new_layout = _as_product(product, layout, node, entries, dtype)
    if product == "adaptive":
      key = (jax.devices()[0].device_kind, jnp.dtype(dtype).name, tuple(ladder), layout.m,
             layout.n, layout.rank > 0, layout.nnz > 0)
      if key not in _CROSSOVER:  # timed once per process, device and shape class
        _CROSSOVER[key] = dense_rows(new, new_layout, dtype, ladder, auto_repeats)
      new_layout = dataclasses.replace(new_layout, dense_rows=_CROSSOVER[key])
    node.clear()
    node.update(new)
    if new_layout is not None:
      out_layouts[module] = new_layout
  return tree, out_layouts
