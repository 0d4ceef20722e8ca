"""Which leaves of the params are blocks, and what each block is given: its
hyperparameters, factor rank r and S capacity; blocks grouped by shape (the
unit a round vmaps over)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax

from salaad_jax import block as blk
from salaad_jax import compact
from salaad_jax import structure as st
from salaad_jax.hparams import _block_hparams, _concrete_float
from salaad_jax.options import Options


class Layout(NamedTuple):
  """Per leaf of the flattened params (None where the leaf is no block)."""

  treedef: Any
  paths: list
  infos: list  # st.BlockInfo
  hparams: list  # hparams._BlockHparams
  ranks: list  # the factor rank r (int)
  caps: list  # the entries S may hold (int), or None also for a dense S

  def flatten(self, tree) -> list:
    return self.treedef.flatten_up_to(tree)

  def unflatten(self, leaves):
    return jax.tree_util.tree_unflatten(self.treedef, leaves)

  @property
  def blocks(self) -> list[int]:
    """Leaf indices of the blocks."""
    return [i for i, info in enumerate(self.infos) if info is not None]


def _capacities(sparse, treedef, infos, hps, opts: Options) -> list:
  """The entries each block's S may hold (None: S dense, or no block)."""
  if sparse is not None:  # read off the state's storage: no concrete d* needed
    return [c.values.shape[0] if isinstance(c, compact.CompactSparse) else None
            for c in treedef.flatten_up_to(sparse)]
  return [None if i is None else blk.capacity(opts.sparse_capacity, i, h.density_target,
                                              opts.static)
          for i, h in zip(infos, hps)]


def layout_of(params, opts: Options, sparse=None) -> Layout:
  """The blocks of ``params`` under ``opts``; with ``sparse`` (the state's S)
  the capacities are read off its storage, so an update needs no concrete d*
  (only init sizes S)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [st.path_str(p) for p, _ in leaves_with_path]
  # The default selection may find no block (vectors, scalars): then the
  # transform passes through.  An explicit structure= must select one.
  info_tree = st.select_blocks(params, opts.structure, include_embedding=opts.include_embedding,
                               include_head=opts.include_head, row_axes=opts.row_axes,
                               allow_empty=opts.structure is None)
  infos = treedef.flatten_up_to(info_tree)
  hps = _block_hparams(opts.hparams, treedef, paths, infos)
  if opts.shape_rho:  # the reference's shape-dependent mode: rho_i = 1 / (n_blocks sqrt(m n))
    n_blocks = sum(i is not None for i in infos)
    hps = [None if h is None else h._replace(
        rho=1.0 / (n_blocks * math.sqrt(math.prod(i.matrix_shape))))
           for h, i in zip(hps, infos)]
  ranks = [None if i is None else blk.rank_for(i, opts.static, h.rank_target)
           for i, h in zip(infos, hps)]
  caps = _capacities(sparse, treedef, infos, hps, opts)
  return Layout(treedef, paths, infos, hps, ranks, caps)


def groups(layout: Layout) -> list[list[int]]:
  """Leaf indices of blocks grouped by (matrix shape, factor rank, S capacity)."""
  out: dict[tuple, list[int]] = {}
  for i in layout.blocks:
    key = (layout.infos[i].matrix_shape, layout.ranks[i], layout.caps[i])
    out.setdefault(key, []).append(i)
  return list(out.values())


def work_units(layout: Layout, opts: Options) -> list[tuple[list[int], int]]:
  """Lists of leaf indices (one shape group or a chunk of one) with the
  offset in [0, K) at which each unit runs its round (``spread_rounds``;
  otherwise every group at offset 0)."""
  units = groups(layout)
  if not opts.spread_rounds:
    return [(idx, 0) for idx in units]
  k = int(_concrete_float(opts.every_k))
  chunk = max(1, math.ceil(sum(len(g) for g in units) / k))
  units = [g[a:a + chunk] for g in units for a in range(0, len(g), chunk)]
  return [(u, (n * k) // len(units)) for n, u in enumerate(units)]
