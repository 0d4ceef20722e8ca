"""Proximal operators and spectrum measures used by SALAAD (SALAAD.md §3).

Every function is pure and jit/vmap friendly.  The arithmetic runs in float32
whatever the input dtype; results come back in the input dtype unless stated.

Notation: a block is a matrix Z of shape (m, n); its thin SVD is
Z = U diag(sigma) V^T.  Low-rank factors are kept as a ``Factors`` triple
(u: (m, r), s: (r,), v: (n, r)) meaning L = u diag(s) v^T.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


class Factors(NamedTuple):
  """L = u @ diag(s) @ v.T, with s sorted non-increasing and s >= 0."""

  u: jax.Array  # (m, r)
  s: jax.Array  # (r,)
  v: jax.Array  # (n, r)


def dense(factors: Factors) -> jax.Array:
  """Reconstructs the dense (m, n) matrix u diag(s) v^T (float32)."""
  u, s, v = (jnp.asarray(a, _F32) for a in factors)
  return (u * s) @ v.T


# --------------------------------------------------------------------------
# Sparse operators.
# --------------------------------------------------------------------------


def soft_threshold(z: jax.Array, tau) -> jax.Array:
  """soft_tau(z) = sign(z) max(|z| - tau, 0), entrywise."""
  zf = jnp.asarray(z, _F32)
  out = jnp.sign(zf) * jnp.maximum(jnp.abs(zf) - jnp.asarray(tau, _F32), 0.0)
  return out.astype(jnp.asarray(z).dtype)


def num_kept(size: int, fraction) -> jax.Array:
  """k = ceil(fraction * size) clipped to [0, size] (traceable in fraction)."""
  k = jnp.ceil(jnp.asarray(fraction, _F32) * size - 1e-6)
  return jnp.clip(k, 0, size).astype(jnp.int32)


def topk_threshold(z: jax.Array, fraction) -> jax.Array:
  """The magnitude of the k-th largest |z| entry, k = ceil(fraction * size).

  This is the |.|-quantile that keeps a ``fraction`` of the entries; returns
  +inf when k == 0.
  """
  a = jnp.abs(jnp.asarray(z, _F32)).reshape(-1)
  k = num_kept(a.size, fraction)
  desc = -jnp.sort(-a)
  kth = desc[jnp.clip(k - 1, 0, a.size - 1)]
  return jnp.where(k > 0, kth, jnp.inf)


def hard_topk(z: jax.Array, fraction) -> jax.Array:
  """Keeps the ceil(fraction * size) entries of largest magnitude, zeros the rest.

  Ties at the threshold are broken by position so exactly k entries survive.
  """
  zf = jnp.asarray(z, _F32)
  flat = jnp.abs(zf).reshape(-1)
  k = num_kept(flat.size, fraction)
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size))
  keep = (ranks < k).reshape(zf.shape)
  return jnp.where(keep, zf, 0.0).astype(jnp.asarray(z).dtype)


def group_soft_threshold(z: jax.Array, tau, axis: int) -> jax.Array:
  """Group soft-threshold (prox of tau * sum_g ||z_g||_2).

  Groups are the slices along ``axis`` reduced over the other axis of a
  matrix: axis=1 groups rows (each row is shrunk by max(0, 1 - tau/||row||)),
  axis=0 groups columns.
  """
  zf = jnp.asarray(z, _F32)
  norms = jnp.sqrt(jnp.sum(zf * zf, axis=axis, keepdims=True))
  scale = jnp.maximum(1.0 - jnp.asarray(tau, _F32) / jnp.maximum(norms, 1e-30), 0.0)
  return (zf * scale).astype(jnp.asarray(z).dtype)


def n_m_mask(z: jax.Array, n: int, m: int, axis: int = 0) -> jax.Array:
  """Boolean N:M mask: in each run of ``m`` consecutive entries along ``axis``
  keep the ``n`` of largest magnitude (ties broken by position)."""
  if not 0 < n <= m:
    raise ValueError(f"N:M sparsity needs 0 < N <= M, got {n}:{m}.")
  zf = jnp.moveaxis(jnp.abs(jnp.asarray(z, _F32)), axis, -1)
  length = zf.shape[-1]
  if length % m:
    raise ValueError(
        f"N:M sparsity with M={m} needs the axis length ({length}) to be a "
        "multiple of M.")
  g = zf.reshape(zf.shape[:-1] + (length // m, m))
  order = jnp.argsort(-g, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  keep = (ranks < n).reshape(zf.shape)
  return jnp.moveaxis(keep, -1, axis)


def density(s: jax.Array) -> jax.Array:
  """nnz(s) / size(s) as float32."""
  return jnp.mean((jnp.asarray(s) != 0).astype(_F32))


# --------------------------------------------------------------------------
# Spectrum measures.
# --------------------------------------------------------------------------


def effective_rank(sigma: jax.Array, energy=0.999) -> jax.Array:
  """Smallest k with sum_{j<=k} sigma_j^2 >= energy * sum_j sigma_j^2.

  ``sigma`` must be sorted non-increasing.  Returns 0 for an all-zero
  spectrum.  int32.
  """
  s2 = jnp.square(jnp.asarray(sigma, _F32))
  total = jnp.sum(s2)
  csum = jnp.cumsum(s2)
  # A relative slack of a few ulps keeps energy=1.0 from demanding the exact
  # float sum.
  short = csum < energy * total * (1.0 - 4 * jnp.finfo(_F32).eps)
  # The running sum can end more than that below ``jnp.sum``'s total (they
  # round differently); all of the spectrum always holds its energy.
  k = jnp.minimum(jnp.sum(short.astype(jnp.int32)) + 1, s2.shape[-1])
  return jnp.where(total > 0, k, 0).astype(jnp.int32)


# --------------------------------------------------------------------------
# Singular value thresholding.
# --------------------------------------------------------------------------


def _svt_from_svd(u, s, v, tau, max_rank):
  r = s.shape[0] if max_rank is None else min(max_rank, s.shape[0])
  s_new = jnp.maximum(s[:r] - jnp.asarray(tau, _F32), 0.0)
  return Factors(u[:, :r], s_new, v[:, :r])


def svd_exact(z: jax.Array, max_rank: int | None = None) -> Factors:
  """Exact thin SVD of z (float32) truncated to ``max_rank`` triplets."""
  zf = jnp.asarray(z, _F32)
  u, s, vt = jnp.linalg.svd(zf, full_matrices=False)
  r = s.shape[0] if max_rank is None else min(max_rank, s.shape[0])
  return Factors(u[:, :r], s[:r], vt[:r].T)


def svt_exact(z: jax.Array, tau, max_rank: int | None = None) -> Factors:
  """SVT_tau(z) = U diag(max(sigma - tau, 0)) V^T from a full SVD.

  The result keeps at most ``max_rank`` triplets (all when None).  U and V
  hold the full leading singular basis, including directions whose
  thresholded value is zero, so they can warm-start the next fast round.
  """
  u, s, vt = jnp.linalg.svd(jnp.asarray(z, _F32), full_matrices=False)
  return _svt_from_svd(u, s, vt.T, tau, max_rank)


def orthonormalize(y: jax.Array) -> jax.Array:
  """Orthonormal basis of the columns of y (p, r), by two passes of
  Gram-eigendecomposition orthogonalisation.

  Each pass forms the small Gram G = a^T a = W diag(lam) W^T (``eigh`` of an
  r x r matrix) and returns a W diag(lam + shift)^{-1/2}: only matmuls and a
  small symmetric eigensolver, no QR or triangular solves, which are latency
  traps when batched on accelerators (and slow on CPU).  Like CholeskyQR it
  squares the condition number, so it runs twice; the small diagonal shift
  keeps directions of a (nearly) rank-deficient y finite instead of
  amplifying noise.
  """

  def one_pass(a, shift_scale):
    g = a.T @ a
    lam, w = jnp.linalg.eigh(g)
    shift = shift_scale * (jnp.max(lam) + 1e-30)
    return (a @ w) * jax.lax.rsqrt(jnp.maximum(lam, 0.0) + shift)

  a = jnp.asarray(y, _F32)
  eps = float(jnp.finfo(_F32).eps)
  q = one_pass(a, 1e2 * eps)
  return one_pass(q, 10 * eps)


def subspace_svd(
    z: jax.Array, v0: jax.Array, num_iters: int = 1) -> Factors:
  """Rank-r SVD of z (m, n) by warm-started subspace (orthogonal) iteration.

  Starting from an n x r basis ``v0`` (the previous right factor), each
  iteration does Q = orth(Z V), V = orth(Z^T Q).  A Rayleigh-Ritz step on the
  small r x r Gram of B = Q^T Z gives the singular values via ``eigh``:
  B B^T = W diag(sigma^2) W^T, U = Q W, V = B^T W / sigma.
  Cost: O(num_iters * m n r) matmul work plus O(r^3).
  """
  zf = jnp.asarray(z, _F32)
  v = jnp.asarray(v0, _F32)
  q = orthonormalize(zf @ v)
  for _ in range(num_iters - 1):
    v = orthonormalize(zf.T @ q)
    q = orthonormalize(zf @ v)
  b = q.T @ zf  # (r, n)
  evals, w = jnp.linalg.eigh(b @ b.T)
  evals, w = evals[::-1], w[:, ::-1]
  sigma = jnp.sqrt(jnp.maximum(evals, 0.0))
  u = q @ w
  bt_w = b.T @ w
  # Directions with (numerically) zero sigma keep a unit-norm basis vector so
  # the factor stays usable as the next warm start.
  tiny = sigma <= jnp.finfo(_F32).eps * jnp.maximum(sigma[0], 1e-30) * 10
  v_new = bt_w / jnp.where(tiny, 1.0, sigma)
  v_new = jnp.where(tiny[None, :], jnp.asarray(v0, _F32) @ w, v_new)
  return Factors(u, sigma, v_new)


def svt_subspace(z: jax.Array, tau, v0: jax.Array, num_iters: int = 1) -> Factors:
  """Fast SVT at rank r = v0.shape[1]: SVT_tau restricted to the top-r
  subspace found by ``subspace_svd`` warm-started from ``v0``."""
  f = subspace_svd(z, v0, num_iters)
  return Factors(f.u, jnp.maximum(f.s - jnp.asarray(tau, _F32), 0.0), f.v)


def random_basis(key: jax.Array, n: int, r: int) -> jax.Array:
  """An orthonormal n x r basis from a Gaussian sketch (randomized range finder)."""
  return orthonormalize(jax.random.normal(key, (n, r), _F32))


def default_max_rank(m: int, n: int, rank_target: float) -> int:
  """A bounded factor rank for the fast SVT: twice the target rank plus a
  margin of 8, capped at min(m, n)."""
  k = min(m, n)
  return int(min(k, max(1, math.ceil(2 * rank_target * k) + 8)))
