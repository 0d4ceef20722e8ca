"""Consolidation: training the surrogate itself at a fixed structure.

For the last part of training the ADMM coupling is replaced by a projection
onto a fixed structure, so the trained weights *are* the deployed surrogate
X_i = L_i + S_i:  after each optimiser step, per block,

    L_i <- top-r_i truncated SVD of (X_i - S_i)    (kept as factors U diag(s) V^T)
    S_i <- P_Omega_i (X_i - L_i)                   (values on a fixed support)
    X_i <- L_i + S_i,  U_i <- 0

one alternating-projection sweep per step (the optax ``projections`` pattern:
updates become proj(X + u) - X).  The structure (r_i, Omega_i) is chosen once,
at the first consolidation step: either the controller's current one
(``'current'``: r_i = number of kept singular values, Omega_i = supp S_i) or
exactly the targets (``'target'``: r_i = ceil(r* min(m, n)), Omega_i = the
d* m n largest |X_i - L_i|).  L stays in SVD form (orthonormal factors,
descending singular values), so the elastic deployment (SALAAD.md §6) still
truncates triplets and entries.  This is projected gradient descent onto
{rank <= r} + {supp in Omega}, the same family of structured models SLTrain
(low rank + fixed random support) trains directly.

With ``params='factors'`` the structure is chosen the same way, once, and
then trained in its own coordinates, as SLTrain trains its model: with
L_i = B_i A_i^T (balanced at the start, B = U diag(sqrt s), A = V diag(sqrt s))
and the dense gradient G_i = dloss/dX_i, the inner optimiser steps

    B_i  on  G_i A_i,      A_i  on  G_i^T B_i,      S_i  on  P_Omega_i(G_i)

(the chain rule through X_i = B_i A_i^T + S_i), with its own moments for the
factors.  The SVD form of L_i is recomputed exactly from the factors after
every step (:func:`svd_of_product`), so the state always holds L as
orthonormal factors with descending singular values.

With ``global_dropout=p`` (factors only) every step trains a random
*deployment* of the surrogate instead of the whole of it: a share q ~ U(0, p)
of the structure's parameters is dropped by the global allocator's rule
(:func:`global_cut`: triplets of gain sigma^2 per parameter (m + n), entries
of gain s^2 per parameter, one threshold on gain per cost over all blocks, so
every block keeps its top triplets and largest entries), the params hold that
cut, and the gradients are the cut model's: P_kept(G_i) for S_i, and for the
factors (:func:`cut_factor_grads`)

    B_i  on  G_i A_i M^T,      A_i  on  G_i^T B_i M

with M the w x w matrix that makes B M A^T the kept triplets U_k S_k V_k^T
(held constant; M = I when nothing is cut, so an uncut step is the plain one
and the kept subspaces still rotate).  This is nested dropout (Rippel et al.
2014) with the allocator's own cut, as slimmable networks (Yu et al. 2019)
and Matryoshka representations (Kusupati et al. 2022) train their nested
widths: the smaller deployments of the one run are trained, not only its
full structure.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from salaad_jax import prox

_F32 = jnp.float32
STRUCTURES = ("target", "current")
SUPPORTS = ("largest", "random")


def support_key(seed: int, block: int) -> jax.Array:
  """The raw key of block ``block``'s random consolidation support."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed + 7919), block))
PARAMETERISATIONS = ("projection", "factors")


def target_rank(rank_target, k: int) -> jax.Array:
  """ceil(r* k), at least 1."""
  return jnp.maximum(jnp.ceil(jnp.asarray(rank_target, _F32) * k - 1e-6), 1).astype(jnp.int32)


def project_block(x, f: prox.Factors, s, first, rank_target, density_target,
                  structure: str, svd_iters: int, exact: bool, support_key=None):
  """One consolidation projection of one block (matrix view, float32).

  Args:
    x: the new X_i after the optimiser step.
    f, s: the current factors of L_i and S_i.
    first: True at the first consolidation step (the structure is chosen).
    rank_target, density_target: r*, d* (for ``structure='target'``).
    structure: 'target' or 'current'.
    svd_iters: warm-started subspace iterations (fast path).
    exact: use an exact SVD instead.
    support_key: None or a float placeholder (the support of the d* m n
      largest |X - L|), or raw key data (``support_key``): with structure
      'target', d* m n entries drawn uniformly instead.
  Returns (factors, S, X_proj) with X_proj = L + S.
  """
  m, n = x.shape
  k = min(m, n)
  r_max = f.s.shape[0]
  kept_now = jnp.sum(f.s > 0).astype(jnp.int32)
  if structure == "target":
    r_first = jnp.minimum(target_rank(rank_target, k), r_max)
  else:
    r_first = jnp.maximum(kept_now, 1)
  rank = jnp.where(first, r_first, kept_now)
  support = s != 0
  z = x - jnp.where(first & (structure == "target"), 0.0, s)
  g = prox.svd_exact(z, r_max) if exact else prox.subspace_svd(z, f.v, svd_iters)
  sig = jnp.where(jnp.arange(r_max) < rank, g.s, 0.0)
  g = prox.Factors(g.u, sig, g.v)
  rest = x - prox.dense(g)
  if structure == "target":
    score = jnp.abs(rest)
    if support_key is not None and jnp.issubdtype(support_key.dtype, jnp.integer):
      score = jax.random.uniform(jax.random.wrap_key_data(support_key), rest.shape)
    top = score >= prox.topk_threshold(score, density_target)
    support = jnp.where(first, top, support)
  s_new = jnp.where(support, rest, 0.0)
  return g, s_new, prox.dense(g) + s_new


def truncated(f: prox.Factors, s, drop):
  """L_b + S_b: the trailing ``drop`` share of L's kept triplets and of S's
  smallest entries removed (keeps ceil((1 - drop) r) and ceil((1 - drop) nnz)).

  Consolidation with nested dropout trains on a random such truncation each
  step (drop ~ U(0, p)), so every smaller deployment of the same factors
  stays good: nested dropout of ordered units (Rippel et al. 2014, "Learning
  ordered representations with nested dropout"), as in slimmable networks
  (Yu et al. 2019) and Matryoshka representations (Kusupati et al. 2022).
  """
  keep = 1.0 - jnp.asarray(drop, _F32)
  r = jnp.sum(f.s > 0)
  r_b = jnp.ceil(keep * r - 1e-6)
  sig = jnp.where(jnp.arange(f.s.shape[0]) < r_b, f.s, 0.0)
  nnz = jnp.sum(s != 0)
  tau = prox.topk_threshold(s, keep * nnz / s.size)
  s_b = jnp.where(jnp.abs(s) >= tau, s, 0.0)
  return prox.dense(prox.Factors(f.u, sig, f.v)) + s_b


def factor_width(structure: str, factor_rank: int, rank_target: float, shape) -> int:
  """w, the rank a block's trained factors are sized for: ceil(r* min(m, n))
  for structure 'target', the factor rank for 'current' (the controller's
  rank), at most the factor rank (a Python int: it sizes the state)."""
  if structure == "current":
    return factor_rank
  return min(factor_rank, max(1, math.ceil(rank_target * min(shape) - 1e-6)))


def factor_grads(grad, b, a, s):
  """The gradients of B, A and S's values (on supp S, dense-shaped) from the
  dense gradient G of X = B A^T + S: (G A, G^T B, P_Omega(G))."""
  return grad @ a, grad.T @ b, jnp.where(s != 0, grad, 0.0)


def factor_apply(b, a, s, db, da, ds):
  """(B', A', S', X') after the optimiser's steps db, da, ds (S stepped on
  its support only); X' = B' A'^T + S'."""
  b, a = b + db, a + da
  s_new = jnp.where(s != 0, s + ds, 0.0)
  return b, a, s_new, b @ a.T + s_new


def balanced(f: prox.Factors, width: int) -> tuple[jax.Array, jax.Array]:
  """(B, A) with B A^T = L: the first ``width`` triplets of ``f`` as
  B = U diag(sqrt s) (m, width) and A = V diag(sqrt s) (n, width)."""
  root = jnp.sqrt(jnp.maximum(f.s[:width], 0.0))
  return f.u[:, :width] * root, f.v[:, :width] * root


def svd_of_product(b, a, r_max: int) -> prox.Factors:
  """The exact SVD of B A^T, B (m, w), A (n, w), w <= min(m, n), as
  ``Factors`` of width ``r_max`` >= w (zero beyond w): thin QR of both
  factors, then the SVD of the w x w core R_B R_A^T."""
  qb, rb = jnp.linalg.qr(b)
  qa, ra = jnp.linalg.qr(a)
  w, sig, zt = jnp.linalg.svd(rb @ ra.T)
  pad = r_max - sig.shape[0]
  widen = lambda m: jnp.pad(m, ((0, 0), (0, pad)))
  return prox.Factors(widen(qb @ w), jnp.pad(sig, (0, pad)), widen(qa @ zt.T))


def _entry_chain(sp, overhead):
  """One block's sparse entries as allocator items, in chain order: gains
  s^2 sorted descending, where the first ``j`` entries are one item of cost
  ``overhead + j`` (the prefix of best average gain per cost with the fixed
  cost, the deployment's fold of a bitmap into its first item); returns
  (ratio per entry, made non-increasing; cost per entry, the bundle's on its
  first entry and 0 on the rest of it; flat index of each entry)."""
  gain = jnp.where(sp != 0, sp * sp, 0.0).ravel()
  idx = jnp.argsort(-gain)
  g = gain[idx]
  live = g > 0
  k = jnp.arange(1, g.size + 1, dtype=_F32)
  csum = jnp.cumsum(g)
  j = jnp.argmax(jnp.where(live, csum / (overhead + k), -1.0)) + 1
  pos = jnp.arange(g.size)
  bundle = pos < j
  cost = jnp.where(bundle, jnp.where(pos == 0, overhead + j.astype(_F32), 0.0), 1.0)
  ratio = jnp.where(bundle, csum[j - 1] / (overhead + j), g)
  ratio = jax.lax.cummin(ratio)
  return jnp.where(live, ratio, -1.0), jnp.where(live, cost, 0.0), idx


def _best_within(ratio, cost, budget):
  """The items of largest ``ratio`` (>= 0; < 0: not an item) whose costs sum
  to at most ``budget``: every item with ratio >= tau, tau the smallest
  float32 for which that fits.  Non-negative float32s are ordered as their
  int32 bit patterns, so 32 bisection steps on the bits find tau exactly,
  with masked sums instead of a sort (ratios are non-increasing along every
  chain, so each chain keeps a prefix; the greedy prefix of the sorted items
  up to exact ties)."""
  live = ratio >= 0
  bits = jax.lax.bitcast_convert_type(jnp.where(live, ratio, 0.0).astype(_F32), jnp.int32)
  cost = jnp.where(live, cost, 0.0)

  def step(_, bounds):
    lo, hi = bounds  # sum over bits >= hi fits; over bits >= lo it does not (lo = -1: all)
    mid = lo + (hi - lo) // 2
    fits = jnp.sum(jnp.where(bits >= mid, cost, 0.0)) <= budget
    return jnp.where(fits, lo, mid), jnp.where(fits, mid, hi)

  inf_bits = jnp.int32(0x7F800001)  # above +inf: nothing kept, which always fits
  _, hi = jax.lax.fori_loop(0, 32, step, (jnp.int32(-1), inf_bits))
  return live & (bits >= hi)


def global_cut(sigmas, sparses, drop=0.0, *, keep=None, overhead=0.0):
  """The global allocator's cut of blocks to a share 1 - ``drop`` of their
  structured parameters (or to ``keep`` of them), priced in parameters: the
  greedy pass of ``deploy.allocation`` without its skip-and-fill.  Triplet j
  of block i (shape (m, n)) has gain per cost sigma_ij^2 / (m + n), a sparse
  entry s^2; with ``overhead`` > 0 storing any of a block's S costs a fixed
  ``overhead m n`` more (a bitmap: 1/16 of a parameter per entry with 2-byte
  values), folded into the first item of its entry chain as the deployment
  does.  Items are taken in decreasing gain per cost while their running cost
  fits (:func:`_best_within`), so each block keeps a prefix of its triplets
  and its largest entries.

  Args:
    sigmas: per block, its singular values (r,), zero where none.
    sparses: per block, S (m, n) (zero off its support).
    drop: the share of the parameters to drop, in [0, 1].
    keep: instead of ``drop``, the number of parameters to keep, the fixed
      costs included (a scalar, traced or not; all of them when it is at
      least their number).
    overhead: the fixed cost of a block's S per matrix entry, >= 0.
  Returns:
    per block (kept triplets (r,) bool, kept entries (m, n) bool).
  """
  ratios, costs, where = [], [], []
  for sig, sp in zip(sigmas, sparses):
    m, n = sp.shape
    sig, sp = jnp.asarray(sig, _F32), jnp.asarray(sp, _F32)
    live = sig > 0
    ratios.append(jnp.where(live, sig * sig / (m + n), -1.0))
    costs.append(jnp.where(live, float(m + n), 0.0))
    if overhead:
      e_ratio, e_cost, e_idx = _entry_chain(sp, overhead * m * n)
    else:  # every entry its own item: no sort per block
      e_ratio = jnp.where(sp != 0, sp * sp, -1.0).ravel()
      e_cost, e_idx = jnp.where(sp != 0, 1.0, 0.0).ravel(), jnp.arange(sp.size)
    ratios.append(e_ratio)
    costs.append(e_cost)
    where.append(e_idx)
  ratio, cost = jnp.concatenate(ratios), jnp.concatenate(costs)
  budget = ((1.0 - jnp.asarray(drop, _F32)) * jnp.sum(cost) if keep is None
            else jnp.asarray(keep, _F32))
  kept = _best_within(ratio, cost, budget * (1 + 1e-6) + 1e-6)
  out, at = [], 0
  for (sig, sp), idx in zip(zip(sigmas, sparses), where):
    r, k = jnp.shape(sig)[0], math.prod(jnp.shape(sp))
    entries = jnp.zeros(k, bool).at[idx].set(kept[at + r:at + r + k])
    out.append((kept[at:at + r], entries.reshape(jnp.shape(sp))))
    at += r + k
  return out


def cut_matrix(f: prox.Factors, s, kept_triplets, kept_entries):
  """The cut of L + S: L's kept triplets plus S's kept entries."""
  return (prox.dense(prox.Factors(f.u, jnp.where(kept_triplets, f.s, 0.0), f.v))
          + jnp.where(kept_entries, s, 0.0))


def cut_factor_grads(grad, b, a, f: prox.Factors, kept):
  """(dB, dA) of the cut low-rank part L_k = U_k S_k V_k^T = B M A^T.

  ``f`` is the SVD of B A^T (width >= w), ``kept`` its kept triplets.  With
  T_b = B^+ U sqrt(S) and T_a = A^+ V sqrt(S) (so B T_b = U sqrt(S), the
  balanced left factor, and A T_a = V sqrt(S)), M = T_b D_k T_a^T, D_k the
  kept mask; holding M constant, dB = G A M^T = G (V sqrt(S) D_k) T_b^T and
  dA = G^T B M = G^T (U sqrt(S) D_k) T_a^T.  With every triplet kept and B,
  A of full column rank, M = I and these are (G A, G^T B).
  """
  w = b.shape[1]
  root = jnp.sqrt(jnp.maximum(jnp.asarray(f.s[:w], _F32), 0.0))
  ub, va = jnp.asarray(f.u[:, :w], _F32) * root, jnp.asarray(f.v[:, :w], _F32) * root
  tb, ta = jnp.linalg.pinv(b) @ ub, jnp.linalg.pinv(a) @ va
  d = kept[:w].astype(_F32)
  return (grad @ (va * d)) @ tb.T, (grad.T @ (ub * d)) @ ta.T
