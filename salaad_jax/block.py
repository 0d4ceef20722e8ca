"""One block of SALAAD: the static configuration, the factor rank and S
capacity of a block, its initialisation and one ADMM round (SALAAD.md §2,
§5).  Pure functions of one matrix-view block (float32), vmapped over the
blocks of one shape by ``salaad_jax.transform``."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from salaad_jax import compact
from salaad_jax import controller as ctl
from salaad_jax import prox
from salaad_jax import structure as st
from salaad_jax.hparams import _BlockHparams, _concrete_float

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """The static (hashable) part of the configuration."""

  mode: str
  sparse_mode: str
  n_m: Optional[tuple[int, int]]
  svt: str
  svt_iters: int
  init_iters: int
  energy: float
  alpha_init: Any
  max_rank: Optional[int]


def rank_for(info: st.BlockInfo, cfg: Static, rank_target) -> int:
  m, n = info.matrix_shape
  k = min(m, n)
  if cfg.max_rank is not None:
    return max(1, min(k, int(cfg.max_rank)))
  if cfg.svt == "exact":
    return k
  r = _concrete_float(rank_target)
  return k if r is None else prox.default_max_rank(m, n, r)


def init_block(x, key, rank_target, rho, r: int, cfg: Static):
  """L_0 = truncated SVD of X_0 at rank floor(r* min(m, n)) (§5)."""
  m, n = x.shape
  k = min(m, n)
  if cfg.svt == "exact":
    f = prox.svd_exact(x, r)
  else:
    f = prox.subspace_svd(x, prox.random_basis(key, n, r), cfg.init_iters)
  keep = jnp.floor(jnp.asarray(rank_target, _F32) * k + 1e-6).astype(jnp.int32)
  s0 = jnp.where(jnp.arange(r) < keep, f.s, 0.0)
  if not isinstance(cfg.alpha_init, str):
    alpha0 = jnp.asarray(cfg.alpha_init, _F32)
  elif cfg.alpha_init == "sigma_k":
    idx = jnp.clip(jnp.ceil(jnp.asarray(rank_target, _F32) * k - 1e-6).astype(jnp.int32) - 1, 0, r - 1)
    alpha0 = jnp.asarray(rho, _F32) * f.s[idx]
  else:
    alpha0 = jnp.zeros((), _F32)
  rate0 = prox.effective_rank(s0, cfg.energy).astype(_F32) / k
  return prox.Factors(f.u, s0, f.v), alpha0, rate0


def sparse_step(z, beta, hp: _BlockHparams, cfg: Static):
  """S = prox of (beta/rho) * sparse penalty at z; returns (S, beta')."""
  rho = jnp.asarray(hp.rho, _F32)
  if cfg.mode == "hard_cut" or cfg.sparse_mode == "topk":
    tau = prox.topk_threshold(z, hp.density_target)
    tau = jnp.where(jnp.isfinite(tau), tau, 0.0)
    if cfg.sparse_mode == "topk":
      s = prox.hard_topk(z, hp.density_target)
    else:
      s = prox.soft_threshold(z, tau)
    return s, rho * tau
  tau = beta / rho
  if cfg.sparse_mode == "soft":
    s = prox.soft_threshold(z, tau)
  elif cfg.sparse_mode == "rows":
    s = prox.group_soft_threshold(z, tau, axis=1)
  elif cfg.sparse_mode == "cols":
    s = prox.group_soft_threshold(z, tau, axis=0)
  else:  # N:M along the input dimension (the rows of the matrix view)
    n_keep, m_group = cfg.n_m
    s = jnp.where(prox.n_m_mask(z, n_keep, m_group, axis=0),
                  prox.soft_threshold(z, tau), 0.0)
  return s, None


def round_block(x, f: prox.Factors, s, dual, alpha, beta, rank_prev, dens_prev,
                 num_rounds, hp: _BlockHparams, deriv_start, cfg: Static, dual_scale=1.0,
                 cap: Optional[int] = None):
  """One ADMM round for one block (matrix view, float32), SALAAD.md §2.

  ``dual_scale`` = rho_now / rho_next rescales U in the dual step when rho
  moves (U <- U rho_now / rho_next + X - L - S, so Y = rho U is continuous).
  With a capacity ``cap`` the S-step's result is projected onto
  {nnz(S) <= cap} (``compact.compactify``: the cap largest |entries|; S
  itself when nnz <= cap) and returned compact; the dual step and the next
  round use that projected S.  The density d_S that drives the controller
  (and is stored) is the prox result's, so d_S > cap / (m n) marks a round
  whose S overflowed the capacity.
  """
  m, n = x.shape
  rho = jnp.asarray(hp.rho, _F32)
  # 1. L <- SVT_{alpha/rho}(X - S + U)
  z = x - s + dual
  if cfg.svt == "exact":
    f = prox.svt_exact(z, alpha / rho, f.s.shape[0])
  else:
    f = prox.svt_subspace(z, alpha / rho, f.v, cfg.svt_iters)
  l_dense = prox.dense(f)
  # 2. controller on alpha
  rank_rate = prox.effective_rank(f.s, cfg.energy).astype(_F32) / min(m, n)
  alpha = ctl.next_weight(cfg.mode, alpha, rank_rate, rank_prev, hp.rank_target,
                          rho, hp.k_alpha, hp.k_d, num_rounds, deriv_start)
  # 3. S <- prox_{beta/rho}(X - L + U)
  s, beta_cut = sparse_step(x - l_dense + dual, beta, hp, cfg)
  # 4. controller on beta
  dens = prox.density(s)
  if beta_cut is not None:
    beta = beta_cut
  else:
    beta = ctl.next_weight(cfg.mode, beta, dens, dens_prev, hp.density_target,
                           rho, hp.k_beta, hp.k_d, num_rounds, deriv_start)
  stored = s
  if cap is not None:
    stored, s = compact.project(s, cap)
  # 5. U <- U + (X - L - S)
  dual = dual * dual_scale + (x - l_dense - s)
  return f, stored, dual, alpha, beta, rank_rate, dens


def capacity(sparse_capacity, info: st.BlockInfo, density_target, cfg: Static):
  """c_i = ceil(kappa_i m n), the entries S_i may hold (None: S stored dense).
  kappa_i is the given fraction, or for 'auto' min(1, 3 d*_i) (at least N/M
  for N:M sparsity); 'auto' stores the group-sparse modes ('rows', 'cols')
  dense, since keeping the largest entries would cut their groups."""
  if sparse_capacity is None or (sparse_capacity == "auto"
                                 and cfg.sparse_mode in ("rows", "cols")):
    return None
  if sparse_capacity != "auto":
    return compact.capacity(info.size, sparse_capacity)
  d = _concrete_float(density_target)
  if d is None:
    raise ValueError(
        f"sparse_capacity='auto' sizes S's storage at 3 d* of each block's entries, but "
        f"density_target (d*) of block '{info.path}' is traced or injected; pass "
        "sparse_capacity=<fraction in (0, 1]> or sparse_capacity=None (S stored dense)")
  frac = min(1.0, compact.AUTO_FACTOR * d)
  if cfg.n_m is not None:
    frac = max(frac, cfg.n_m[0] / cfg.n_m[1])
  return compact.capacity(info.size, frac)
