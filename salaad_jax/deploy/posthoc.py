"""Post-hoc sparse plus low-rank split of a densely trained model (SALAAD.md §8).

The "no training" baseline: every block X_i of a dense model becomes

    L_i = top-k truncated SVD of X_i,           k = rank (or rank * min(m, n))
    S_i = hard_topk(X_i - L_i, density)        the largest residual entries,

the same (Factors, S) form SALAAD trains, so ``spectra`` / ``allocate`` /
``compress`` serve both.  Blocks are selected as in ``salaad_jax.salaad``.
"""

from __future__ import annotations

import math
from typing import Union

import jax

from salaad_jax import prox
from salaad_jax import structure as st
from salaad_jax.deploy.spectra import Decomposition


def _rank(rank: Union[int, float], m: int, n: int) -> int:
  k = min(m, n)
  if isinstance(rank, bool):
    raise ValueError(f"rank must be an int or a fraction, got {rank!r}")
  if isinstance(rank, float):
    if not 0.0 <= rank <= 1.0:
      raise ValueError(f"a fractional rank must lie in [0, 1], got {rank}")
    return min(k, math.ceil(rank * k - 1e-9))
  if rank < 0:
    raise ValueError(f"rank must be >= 0, got {rank}")
  return min(k, int(rank))


def posthoc_factors(params, structure: st.Structure = None, *, include_embedding: bool = False,
                    include_head: bool = False, row_axes: st.RowAxes = None,
                    rank: Union[int, float] = 0.25, density: float = 0.05) -> Decomposition:
  """Truncated SVD plus magnitude pruning of the residual, per block.

  Args:
    params: dense parameters.
    structure, include_embedding, include_head, row_axes: block selection
      and matrix views, as for ``salaad_jax.salaad``.
    rank: kept singular triplets per block, an int or a fraction of
      min(m, n) (rounded up).
    density: share of each block's residual entries kept in S.

  Returns:
    Decomposition({path: Factors}, {path: S in the parameter's shape}).
  """
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must lie in [0, 1], got {density}")
  infos = st.block_list(st.select_blocks(params, structure, include_embedding=include_embedding,
                                         include_head=include_head, row_axes=row_axes))
  leaves = {st.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  factors, sparse = {}, {}
  for info in infos:
    x = st.as_matrix(leaves[info.path], info)
    m, n = info.matrix_shape
    f = prox.svd_exact(x, _rank(rank, m, n))
    residual = x.astype(f.s.dtype) - prox.dense(f)
    factors[info.path] = f
    sparse[info.path] = st.from_matrix(prox.hard_topk(residual, density), info)
  return Decomposition(factors, sparse)

