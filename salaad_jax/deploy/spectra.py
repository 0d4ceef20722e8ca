"""Per-block spectra: what a deployment allocation chooses from (SALAAD.md §6).

After training, block i (matrix view of shape (m_i, n_i)) has a low-rank part
L_i = U_i diag(sigma~_i) V_i^T and a sparse part S_i.  Deploying it at a
budget keeps the top r_i singular triplets of L_i and the nnz_i entries of
S_i of largest magnitude:

    X_hat_i(r_i, nnz_i) = sum_{j <= r_i} sigma~_ij u_ij v_ij^T + top_{nnz_i}(S_i).

Dropping triplet j costs sigma~_ij^2 of squared Frobenius error and saves
(m_i + n_i) parameters; dropping entry s costs s^2 and saves one parameter
(the separable error model: ||L_i - L_i,r||_F^2 + ||S_i - S_i,nnz||_F^2).

Optional calibration weights d_i (length m_i, d_i = sqrt(E[x^2]) of the
block's input features, see ``calibration.activation_weights``) measure the
error as ||diag(d_i) (X - X_hat)||_F^2, the diagonal approximation of the
output error E||x (X - X_hat)||^2 for a kernel of shape (in, out).  The best
rank-r approximation in that metric truncates the SVD of diag(d_i) L_i, so
with weights sigma~ are the singular values of diag(d_i) L_i and an entry's
gain is (d_i,row s)^2.

``Blocks`` holds every block in this canonical form, computed once; both
allocation methods and the compression read from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from salaad_jax import prox
from salaad_jax import stats
from salaad_jax import structure as st


class Decomposition(NamedTuple):
  """L_i and S_i of every block, keyed by the '/'-joined parameter path.

  Attributes:
    factors: L_i as Factors(u (m, r), s (r,), v (n, r)) of the matrix view.
    sparse: S_i in the parameter's shape.
  """

  factors: dict[str, prox.Factors]
  sparse: dict[str, Any]


def decomposition(source) -> Decomposition:
  """A ``Decomposition`` from itself or from an optimizer state holding a
  SALAAD state (raises ValueError when it holds none)."""
  if isinstance(source, Decomposition):
    return source
  state = stats.find_state(source)
  return Decomposition(stats.low_rank_factors(state), stats.sparse_parts(state))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSpectrum:
  """One block in canonical form (float64, numpy).

  L = u diag(sigma) v^T with sigma > 0 non-increasing; with row weights d,
  (d * u) and v are orthonormal, otherwise u and v are.  ``sparse_order``
  lists the flat (row-major) indices of the nonzero entries of S by
  decreasing gain (ties by position), ``sparse_gain`` their gains
  (d_row s)^2.
  """

  path: str
  shape: tuple[int, ...]
  u: np.ndarray
  sigma: np.ndarray
  v: np.ndarray
  sparse: np.ndarray
  row_weights: Optional[np.ndarray]
  sparse_order: np.ndarray
  sparse_gain: np.ndarray

  @property
  def m(self) -> int:
    return self.sparse.shape[0]

  @property
  def n(self) -> int:
    return self.sparse.shape[1]

  @property
  def triplet_gain(self) -> np.ndarray:
    """sigma_j^2: squared error removed by keeping triplet j."""
    return np.square(self.sigma)

  @property
  def max_rank(self) -> int:
    return int(self.sigma.shape[0])

  @property
  def max_nnz(self) -> int:
    return int(self.sparse_order.shape[0])

  @property
  def energy(self) -> float:
    """sum_j sigma_j^2 + sum s^2 (weighted): the error of keeping nothing."""
    return float(np.sum(self.triplet_gain) + np.sum(self.sparse_gain))


@dataclasses.dataclass(frozen=True, eq=False)
class Blocks:
  """All blocks of a model plus the parameter counts around them.

  Attributes:
    blocks: the blocks, in parameter-tree order.
    total_params: P_model, every scalar of the dense model.
    weighted: whether calibration row weights define the error metric.
  """

  blocks: tuple[BlockSpectrum, ...]
  total_params: int
  weighted: bool

  @property
  def rest_params(self) -> int:
    """P_rest: parameters outside the blocks (kept dense)."""
    return self.total_params - sum(b.m * b.n for b in self.blocks)

  @property
  def paths(self) -> list[str]:
    return [b.path for b in self.blocks]

  def __getitem__(self, path: str) -> BlockSpectrum:
    for b in self.blocks:
      if b.path == path:
        return b
    raise KeyError(path)


def canonical_svd(factors: prox.Factors, row_weights=None):
  """Exact thin SVD of L = u diag(s) v^T (or of diag(d) L) from its factors.

  With A = d * (u diag(s)) = Q_a R_a and v = Q_b R_b (thin QR), the core
  R_a R_b^T = P Sigma W^T gives diag(d) L = (Q_a P) Sigma (Q_b W)^T.  Returns
  (u', sigma, v') with L = u' diag(sigma) v'^T, u' = diag(d)^{-1} Q_a P,
  dropping numerically zero sigma.  Cost O((m + n) r^2).
  """
  u = np.asarray(factors.u, np.float64)
  s = np.asarray(factors.s, np.float64)
  v = np.asarray(factors.v, np.float64)
  keep = s > 0
  m, n = u.shape[0], v.shape[0]
  if not keep.any():
    return np.zeros((m, 0)), np.zeros((0,)), np.zeros((n, 0))
  a = u[:, keep] * s[keep]
  if row_weights is not None:
    a = a * row_weights[:, None]
  qa, ra = np.linalg.qr(a)
  qb, rb = np.linalg.qr(v[:, keep])
  p, sigma, wt = np.linalg.svd(ra @ rb.T)
  tol = sigma[0] * max(m, n) * np.finfo(np.float64).eps if sigma.size else 0.0
  r = int(np.sum(sigma > tol))
  u_new = qa @ p[:, :r]
  if row_weights is not None:
    u_new = u_new / row_weights[:, None]
  return u_new, sigma[:r], qb @ wt[:r].T


def _sparse_ranking(s_mat: np.ndarray, row_weights):
  weighted = s_mat if row_weights is None else s_mat * row_weights[:, None]
  flat = weighted.reshape(-1)
  nz = np.flatnonzero(flat)
  gain = np.square(flat[nz].astype(np.float64))
  order = np.argsort(-gain, kind="stable")
  return nz[order], gain[order]


def _check_weights(path: str, d, m: int) -> np.ndarray:
  d = np.asarray(d, np.float64).reshape(-1)
  if d.shape != (m,):
    raise ValueError(f"row weights for block '{path}' have {d.shape[0]} entries; "
                     f"the block's matrix view has {m} rows")
  if not (np.all(np.isfinite(d)) and np.all(d > 0)):
    raise ValueError(f"row weights for block '{path}' must be finite and > 0")
  return d


def block_spectrum(path: str, shape, factors: prox.Factors, sparse,
                   row_weights=None) -> BlockSpectrum:
  """The canonical form of one block (see ``BlockSpectrum``)."""
  shape = tuple(int(x) for x in shape)
  m, n = int(np.shape(factors.u)[0]), int(np.shape(factors.v)[0])
  if m * n != math.prod(shape):
    raise ValueError(f"block '{path}': factors of a ({m}, {n}) matrix do not fit the "
                     f"parameter shape {shape}")
  s_mat = np.asarray(sparse, np.float32).reshape(m, n)
  d = None if row_weights is None else _check_weights(path, row_weights, m)
  u, sigma, v = canonical_svd(factors, d)
  order, gain = _sparse_ranking(s_mat, d)
  return BlockSpectrum(path, shape, u, sigma, v, s_mat, d, order, gain)


def _param_shapes(params) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {st.path_str(p): tuple(np.shape(x)) for p, x in flat}


def spectra(params, source, *, row_weights: Optional[Mapping[str, Any]] = None) -> Blocks:
  """Canonical spectra of every block.

  Args:
    params: the trained parameters (arrays or ShapeDtypeStructs); give the
      dense parameter count P_model and the block shapes.
    source: an optimizer state containing a SALAAD state, or a
      ``Decomposition`` (e.g. from ``posthoc_factors``).
    row_weights: optional {block path: d (m,)}, d = sqrt(E[x^2]) per input
      row; must cover every block.

  Raises:
    ValueError: no SALAAD state in ``source``, a block that is not a
      parameter of ``params`` (or has another shape), missing or bad weights.
  """
  dec = decomposition(source)
  shapes = _param_shapes(params)
  total = int(sum(math.prod(s) for s in shapes.values()))
  if not dec.factors:
    raise ValueError("the source holds no SALAAD blocks")
  if row_weights is not None:
    missing = sorted(set(dec.factors) - set(row_weights))
    if missing:
      raise ValueError(f"row_weights cover no entry for the blocks {missing}")
  blocks = []
  for path, f in dec.factors.items():
    if path not in shapes:
      raise ValueError(f"block '{path}' of the optimizer state is not a parameter of "
                       f"params; parameter paths look like {list(shapes)[:6]}")
    s_shape = tuple(np.shape(dec.sparse[path]))
    if s_shape != shapes[path]:
      raise ValueError(f"block '{path}' has shape {s_shape} in the optimizer state but "
                       f"{shapes[path]} in params")
    d = None if row_weights is None else row_weights[path]
    blocks.append(block_spectrum(path, shapes[path], f, dec.sparse[path], d))
  return Blocks(tuple(blocks), total, row_weights is not None)
