"""Options that steer SALAAD over training: target and rho schedules, the
shape-dependent rho, consolidation of the surrogate, and presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from hypothesis import assume, given, settings
from hypothesis import strategies as st_

import salaad_jax as sj
from helpers import TINY_FLAGS
from salaad_jax import consolidate as cons
from salaad_jax import prox, schedules
from salaad_jax.baselines import accounting
from salaad_jax.deploy import allocation
from salaad_jax.models import get_config
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import config as cfg_lib
from salaad_jax.train import flags as train_flags
from salaad_jax.train import methods, presets


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": {"kernel": jax.random.normal(k1, (24, 16))},
          "b": {"kernel": jax.random.normal(k2, (16, 40))}, "bias": jnp.ones(3)}


def _run(tx, params, steps, lr_target=1.0):
  """``steps`` optimiser steps on sum (X - lr_target)^2; returns the history
  of (params, state) after each step."""
  loss = lambda p: sum(jnp.sum((x - lr_target) ** 2) for x in jax.tree.leaves(p))
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for _ in range(steps):
    u, state = update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
    out.append((params, state))
  return out


def _leaf(tree, name):
  return np.asarray(tree[name]["kernel"], np.float64)


def _s_leaf(state, name):
  """S of block ``name`` in the param's shape, whichever way the state stores it."""
  return np.asarray(sj.sparse_parts(state)[f"{name}/kernel"], np.float64)


# ----------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------


def test_cubic_looseness_is_the_gradual_pruning_law():
  w = schedules.cubic_looseness(end_round=10, begin_round=2)
  n = np.arange(0, 15)
  want = (1 - np.clip((n - 2) / 8, 0, 1)) ** 3
  np.testing.assert_allclose(np.asarray(jax.vmap(w)(n)), want, rtol=1e-6)
  np.testing.assert_allclose(float(schedules.loosen(0.1, w(2))), 1.0)
  np.testing.assert_allclose(float(schedules.loosen(0.1, w(10))), 0.1)
  with pytest.raises(ValueError, match="begin_round"):
    schedules.cubic_looseness(end_round=2, begin_round=2)


def test_tanh_rho_ramp_is_the_reference_step():
  m = schedules.tanh_rho_ramp(center_round=2000, width_rounds=100, factor=10)
  assert float(m(0)) == pytest.approx(1.0, abs=1e-6)
  assert float(m(2000)) == pytest.approx(5.5, rel=1e-6)
  assert float(m(2050)) == pytest.approx(1 + 9 * (1 + np.tanh(1.472)) / 2, rel=1e-5)
  assert float(m(5000)) == pytest.approx(10.0, rel=1e-6)


def test_loose_targets_keep_the_thresholds_at_zero():
  """With w = 1 the targets are 1: the integral law never raises alpha or beta;
  with constant targets it does (the rank rate and density start above them)."""
  params = _params()
  kw = dict(every_k=1, rho=0.5, rank_target=0.1, density_target=0.05, k_alpha=1.0,
            k_beta=1.0, svt="exact")
  tight = _run(sj.salaad(optax.sgd(0.01), **kw), params, 4)[-1][1]
  loose = _run(sj.salaad(optax.sgd(0.01), target_schedule=lambda n: 1.0, **kw), params,
               4)[-1][1]
  assert float(_leaf(tight.beta, "a")) > 0 and float(_leaf(tight.alpha, "b")) > 0
  for name in ("a", "b"):
    assert float(_leaf(loose.alpha, name)) == 0.0 and float(_leaf(loose.beta, name)) == 0.0


def test_rho_change_rescales_the_scaled_dual():
  """When m(n) doubles between rounds 1 and 2, U_2 = U_1 m(1)/m(2) + X_2 - L_2 - S_2,
  i.e. Y = rho U continues; without the change the plain dual step holds."""
  params = _params()
  jump = lambda n: jnp.where(n >= 2, 2.0, 1.0)
  kw = dict(every_k=1, rho=0.3, rank_target=0.2, density_target=0.1, svt="exact",
            alpha_init="sigma_k", beta_init=0.3)
  for sched, ratio in ((jump, 0.5), (None, 1.0)):
    hist = _run(sj.salaad(optax.sgd(0.05), rho_schedule=sched, **kw), params, 2)
    (_, s1), (p2, s2) = hist
    for name in ("a", "b"):
      l2 = np.asarray(prox.dense(sj.low_rank_factors(s2)[f"{name}/kernel"]))
      resid = _leaf(p2, name) - l2 - _s_leaf(s2, name)
      np.testing.assert_allclose(_leaf(s2.dual, name), ratio * _leaf(s1.dual, name) + resid,
                                 atol=1e-5)
    assert np.abs(_leaf(s1.dual, "a")).max() > 1e-3  # the check is not vacuous


def test_rho_schedule_scales_the_penalty_gradient():
  params = _params()
  zero = lambda: jax.tree.map(jnp.zeros_like, params)
  kw = dict(every_k=5, rho=0.2, rank_target=0.2, svt="exact")
  for sched, factor in ((None, 1.0), (lambda n: 3.0, 3.0)):
    tx = sj.salaad(optax.sgd(1.0), rho_schedule=sched, **kw)
    state = tx.init(params)
    u, _ = tx.update(zero(), state, params)
    l0 = np.asarray(prox.dense(sj.low_rank_factors(state)["a/kernel"]))
    np.testing.assert_allclose(_leaf(u, "a"), -0.2 * factor * (_leaf(params, "a") - l0),
                               rtol=1e-5, atol=1e-6)


def test_shape_dependent_rho_is_one_over_blocks_times_sqrt_mn():
  params = _params()
  tx = sj.salaad(optax.sgd(1.0), every_k=5, rho="shape_dependent", rank_target=0.2,
                 svt="exact")
  state = tx.init(params)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  for name, (m, n) in (("a", (24, 16)), ("b", (16, 40))):
    l0 = np.asarray(prox.dense(sj.low_rank_factors(state)[f"{name}/kernel"]))
    rho = 1.0 / (2 * np.sqrt(m * n))
    np.testing.assert_allclose(_leaf(u, name), -rho * (_leaf(params, name) - l0),
                               rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="shape_dependent"):
    sj.salaad(optax.sgd(1.0), rho="big")


# ----------------------------------------------------------------------------
# Consolidation.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["exact", "fast"])
def consolidated(request):
  params = _params(1)
  tx = sj.salaad(optax.adam(3e-2), every_k=2, rho=0.2, rank_target=0.25,
                 density_target=0.1, consolidate_from=4, svt=request.param, svt_iters=2)
  return request.param, _run(tx, params, 9, lr_target=0.5)


def test_consolidation_trains_the_surrogate_at_the_target_structure(consolidated):
  svt, hist = consolidated
  masks = None
  for t, (p, s) in enumerate(hist):
    if t < 4:
      continue  # steps 0..3: ordinary ADMM (the projection starts at step 4)
    for name, (m, n) in (("a", (24, 16)), ("b", (16, 40))):
      f = sj.low_rank_factors(s)[f"{name}/kernel"]
      l = np.asarray(prox.dense(f))
      sp = _s_leaf(s, name)
      np.testing.assert_allclose(_leaf(p, name), l + sp, atol=1e-5)  # X = L + S
      assert np.abs(_leaf(s.dual, name)).max() == 0.0
      r = int(np.sum(np.asarray(f.s) > 0))
      assert r == int(np.ceil(0.25 * min(m, n)))
      assert np.sum(sp != 0) == int(np.ceil(0.1 * m * n))
      kept = np.asarray(f.s) > 0
      u, v = np.asarray(f.u)[:, kept], np.asarray(f.v)[:, kept]
      np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-4)  # L stays an SVD
      np.testing.assert_allclose(v.T @ v, np.eye(r), atol=1e-4)
      assert np.all(np.diff(np.asarray(f.s)[kept]) <= 1e-6)
    now = {name: _s_leaf(s, name) != 0 for name in ("a", "b")}
    if masks is not None:  # the support is fixed after the first projection
      for name in now:
        np.testing.assert_array_equal(now[name], masks[name])
    masks = now
  # Before consolidation X is not yet L + S.
  p3, s3 = hist[3]
  l3 = np.asarray(prox.dense(sj.low_rank_factors(s3)["a/kernel"]))
  assert np.abs(_leaf(p3, "a") - l3 - _s_leaf(s3, "a")).max() > 1e-3


def test_first_projection_is_the_truncated_svd_and_top_residual():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
  f0 = prox.svd_exact(x + 0.1, 12)
  g, s, x_proj = cons.project_block(x, f0, jnp.zeros_like(x), jnp.asarray(True), 0.25, 0.1,
                                    "target", 1, True)
  u, sig, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  l_ref = (u[:, :3] * sig[:3]) @ vt[:3]
  np.testing.assert_allclose(np.asarray(prox.dense(g)), l_ref, atol=1e-4)
  rest = np.asarray(x) - l_ref
  keep = np.abs(rest) >= np.sort(np.abs(rest).ravel())[::-1][23]  # ceil(0.1 * 240) = 24
  np.testing.assert_allclose(np.asarray(s), np.where(keep, rest, 0.0), atol=1e-4)
  np.testing.assert_allclose(np.asarray(x_proj), l_ref + np.where(keep, rest, 0.0), atol=1e-4)


def test_consolidation_keeps_the_current_structure():
  params = _params(2)
  kw = dict(every_k=1, rho=0.5, rank_target=0.2, density_target=0.1, k_alpha=1.0,
            k_beta=1.0, svt="exact", alpha_init="sigma_k")
  before = _run(sj.salaad(optax.adam(1e-2), **kw), params, 3)[-1][1]
  after = _run(sj.salaad(optax.adam(1e-2), consolidate_from=3,
                         consolidate_structure="current", **kw), params, 5)
  for name in ("a", "b"):
    r0 = int(np.sum(np.asarray(sj.low_rank_factors(before)[f"{name}/kernel"].s) > 0))
    for _, s in after[3:]:
      assert int(np.sum(np.asarray(sj.low_rank_factors(s)[f"{name}/kernel"].s) > 0)) == r0
      np.testing.assert_array_equal(_s_leaf(s, name) != 0,
                                    _s_leaf(before, name) != 0)


def test_truncation_drops_trailing_triplets_and_smallest_entries():
  rng = np.random.default_rng(3)
  f = prox.svd_exact(jnp.asarray(rng.normal(size=(10, 8)), jnp.float32), 8)
  f = prox.Factors(f.u, jnp.where(jnp.arange(8) < 5, f.s, 0.0), f.v)
  s = jnp.asarray(np.where(rng.random((10, 8)) < 0.2, rng.normal(size=(10, 8)), 0.0), jnp.float32)
  nnz = int(np.sum(np.asarray(s) != 0))
  got = np.asarray(cons.truncated(f, s, 0.4))
  l3 = np.asarray(prox.dense(prox.Factors(f.u, jnp.where(jnp.arange(8) < 3, f.s, 0.0), f.v)))
  keep = int(np.ceil(0.6 * nnz))
  thr = np.sort(np.abs(np.asarray(s)).ravel())[::-1][keep - 1]
  np.testing.assert_allclose(got, l3 + np.where(np.abs(np.asarray(s)) >= thr, s, 0.0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(cons.truncated(f, s, 0.0)),
                             np.asarray(prox.dense(f) + s), atol=1e-5)


def test_nested_dropout_trains_the_full_surrogate_through_truncations():
  params = _params(4)
  tx = sj.salaad(optax.adam(3e-2), every_k=2, rho=0.2, rank_target=0.25, density_target=0.1,
                 consolidate_from=2, consolidate_dropout=0.5, svt="exact")
  hist = _run(tx, params, 8, lr_target=0.5)
  gaps = []
  for p, s in hist[3:]:
    f = sj.low_rank_factors(s)["b/kernel"]
    full = np.asarray(prox.dense(f)) + _s_leaf(s, "b")
    x = _leaf(p, "b")
    gaps.append(np.abs(x - full).max())
    # the params are the truncation at some drop share q in [0, 0.5)
    assert int(np.sum(np.asarray(f.s) > 0)) == 4
    sp = jnp.asarray(_s_leaf(s, "b"), jnp.float32)
    err = min(np.abs(x - np.asarray(cons.truncated(f, sp, q))).max()
              for q in np.linspace(0.0, 0.5, 51))
    assert err < 1e-4
  assert max(gaps) > 1e-3  # some steps train a strictly smaller model
  loss = lambda p, s: np.sum((np.asarray(prox.dense(sj.low_rank_factors(s)["b/kernel"]))
                              + _s_leaf(s, "b") - 0.5) ** 2)
  assert loss(*hist[-1]) < loss(*hist[2])  # and the full surrogate improves


# Consolidation in factors.


def _factors(state, name):
  return tuple(np.asarray(v, np.float64)
               for v in sj.find_state(state).factored.factors[name]["kernel"])


@pytest.mark.parametrize("capacity, factor_lr", [(None, 1.0), ("auto", 1.0), (None, 0.4)])
def test_factor_consolidation_steps_the_factors_by_the_chain_rule(capacity, factor_lr):
  # SGD on a count-dependent learning rate: the oracle below also checks
  # that the factors' optimiser counts in step with the main one; the
  # factors' steps are factor_lr times it, S's values keep the run's.
  lr = lambda count: 0.01 * (1.0 + count)
  tx = sj.salaad(optax.sgd(lr), every_k=2, rho=0.2, rank_target=0.25, density_target=0.1,
                 consolidate_from=3, consolidate_params="factors", svt="exact",
                 sparse_capacity=capacity, consolidate_factor_lr=factor_lr)
  params = _params(5)
  hist = _run(tx, params, 7, lr_target=0.5)
  for t in range(3, 6):  # hist[t]: after step t (0-based); step 3 projects
    (p, s), (p_next, s_next) = hist[t], hist[t + 1]
    for name, (m, n) in (("a", (24, 16)), ("b", (16, 40))):
      b, a = _factors(s, name)
      sp = _s_leaf(s, name)
      x = _leaf(p, name)
      np.testing.assert_allclose(x, b @ a.T + sp, atol=1e-5)  # X = B A^T + S
      assert b.shape == (m, int(np.ceil(0.25 * min(m, n))))
      grad = 2.0 * (x - 0.5)
      step = lr(t + 1)  # the update of step t + 1 sees count t + 1
      b2, a2 = b - factor_lr * step * grad @ a, a - factor_lr * step * grad.T @ b
      s2 = np.where(sp != 0, sp - step * grad, 0.0)
      np.testing.assert_allclose(_leaf(p_next, name), b2 @ a2.T + s2, rtol=1e-4, atol=1e-4)
      nb, na = _factors(s_next, name)
      np.testing.assert_allclose(nb, b2, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(na, a2, rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(_s_leaf(s_next, name) != 0, sp != 0)  # fixed support
      # L in the state is the exact SVD of B' A'^T: orthonormal, descending.
      f = sj.low_rank_factors(s_next)[f"{name}/kernel"]
      kept = np.asarray(f.s) > 0
      u, v = np.asarray(f.u)[:, kept], np.asarray(f.v)[:, kept]
      np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-4)
      np.testing.assert_allclose(v.T @ v, np.eye(v.shape[1]), atol=1e-4)
      assert np.all(np.diff(np.asarray(f.s)[kept]) <= 1e-5)
      np.testing.assert_allclose(np.asarray(prox.dense(f)), b2 @ a2.T, atol=1e-4)
      np.testing.assert_allclose(np.linalg.svd(b2 @ a2.T, compute_uv=False)[:kept.sum()],
                                 np.asarray(f.s)[kept], rtol=1e-4, atol=1e-5)
  # Before consolidation the factors are untouched zeros.
  assert not np.any(_factors(hist[2][1], "a")[0])


def test_factor_consolidation_starts_from_the_projection():
  kw = dict(every_k=2, rho=0.2, rank_target=0.25, density_target=0.1, consolidate_from=3,
            svt="exact")
  params = _params(6)
  proj = _run(sj.salaad(optax.adam(1e-2), **kw), params, 4)
  fac = _run(sj.salaad(optax.adam(1e-2), consolidate_params="factors", **kw), params, 4)
  # Through the first projection the two are the same run; B, A are its
  # balanced factors.
  for (p1, s1), (p2, s2) in zip(proj, fac):
    np.testing.assert_allclose(_leaf(p1, "b"), _leaf(p2, "b"), atol=1e-4)
  b, a = _factors(fac[-1][1], "b")
  f = sj.low_rank_factors(fac[-1][1])["b/kernel"]
  sig = np.asarray(f.s)[:b.shape[1]]
  np.testing.assert_allclose(b, np.asarray(f.u)[:, :b.shape[1]] * np.sqrt(sig), atol=1e-5)
  np.testing.assert_allclose(b.T @ b, a.T @ a, atol=1e-4)  # balanced
  # and the factors' adam moments are still zero: no gradient reached them yet
  moments = [x for x in jax.tree.leaves(sj.find_state(fac[-1][1]).factored.inner_state)
             if np.ndim(x) == 2]
  assert moments and all(not np.any(np.asarray(x)) for x in moments)


def test_product_svd_matches_numpy():
  rng = np.random.default_rng(7)
  b, a = rng.normal(size=(12, 3)), rng.normal(size=(9, 3))
  f = cons.svd_of_product(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), 5)
  assert f.u.shape == (12, 5) and f.s.shape == (5,) and f.v.shape == (9, 5)
  np.testing.assert_allclose(np.asarray(f.s)[:3], np.linalg.svd(b @ a.T, compute_uv=False)[:3],
                             rtol=1e-5)
  assert not np.any(np.asarray(f.s)[3:])
  np.testing.assert_allclose(np.asarray(prox.dense(f)), b @ a.T, atol=1e-4)


def _cut_oracle(sigmas, sparses, drop=0.0, keep=None, overhead=0.0):
  """The global cut by a plain sort over the deployment allocator's items
  (``deploy.allocation._sparse_chain`` folds a block's fixed cost into its
  first entries): items in decreasing gain per cost (non-increasing along
  each chain), taken while their running cost fits (1 - drop) of the total
  (or ``keep``)."""
  items = []  # (ratio, chain, position, cost, [kept items])
  for i, (sig, sp) in enumerate(zip(sigmas, sparses)):
    m, n = sp.shape
    items += [(x * x / (m + n), 2 * i, j, m + n, [(i, "t", j)])
              for j, x in enumerate(sig) if x > 0]
    flat = sp.ravel()
    idx = [j for j in np.argsort(-flat * flat, kind="stable") if flat[j] != 0]
    if idx:
      g, c, cnt = allocation._sparse_chain(flat[idx] ** 2, 1, int(round(overhead * m * n)))
      ratio, at = np.minimum.accumulate(g / c), 0
      for p, (r, cost, k) in enumerate(zip(ratio, c, cnt)):
        items.append((r, 2 * i + 1, p, cost, [(i, "e", j) for j in idx[at:at + k]]))
        at += k
  total = sum(t[3] for t in items)
  budget = (1 - drop) * total if keep is None else keep
  kept, run = set(), 0
  for _, _, _, cost, what in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
    if run + cost > budget * (1 + 1e-6) + 1e-6:
      break
    run += cost
    kept.update(what)
  return kept


@settings(max_examples=30, deadline=None)
@given(st_.integers(0, 10_000), st_.floats(0.0, 1.0), st_.booleans(),
       st_.sampled_from([0.0, 1 / 16, 1 / 4]))
def test_global_cut_keeps_the_best_gain_per_cost_within_the_share(seed, drop, by_count,
                                                                  overhead):
  rng = np.random.default_rng(seed)
  shapes = [(4, 8), (4, 4), (8, 8)]  # m n overhead: whole parameters
  sigmas = [np.sort(np.where(rng.random(min(s)) < 0.8, rng.gamma(2.0, size=min(s)), 0.0))[::-1]
            for s in shapes]
  sparses = [np.where(rng.random(s) < 0.3, rng.normal(size=s), 0.0) for s in shapes]
  # by_count: the budget as a parameter count (up to past the total) instead of a share
  keep = float(np.floor(drop * 160)) if by_count else None
  got = cons.global_cut([jnp.asarray(x, jnp.float32) for x in sigmas],
                        [jnp.asarray(x, jnp.float32) for x in sparses], drop, keep=keep,
                        overhead=overhead)
  want = _cut_oracle(sigmas, sparses, drop, keep, overhead)
  # The cut is exact up to the float32 rounding of its budget: a budget within
  # 1e-5 of a boundary of the greedy's running cost (drop 1e-6, say) may fall
  # either side of it, so such draws are not a test of the cut.
  near = [_cut_oracle(sigmas, sparses, min(max(drop + e, 0.0), 1.0),
                      None if keep is None else keep * (1 - e), overhead) for e in (-1e-5, 1e-5)]
  assume(near[0] == near[1] == want)
  for i, (kt, ks) in enumerate(got):
    kt, ks = np.asarray(kt), np.asarray(ks).ravel()
    assert {j for j in range(kt.size) if kt[j]} == {j for (b, k, j) in want if b == i and k == "t"}
    assert {j for j in range(ks.size) if ks[j]} == {j for (b, k, j) in want if b == i and k == "e"}
    # a prefix of the triplets (sigma descending)
    assert not np.any(kt[1:] & ~kt[:-1])


def test_cut_factor_grads_are_the_cut_models_and_plain_uncut():
  rng = np.random.default_rng(3)
  b, a, g = rng.normal(size=(10, 4)), rng.normal(size=(8, 4)), rng.normal(size=(10, 8))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  f = cons.svd_of_product(f32(b), f32(a), 6)
  everything = jnp.ones(6, bool)
  gb, ga = cons.cut_factor_grads(f32(g), f32(b), f32(a), f, everything)
  np.testing.assert_allclose(gb, g @ a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ga, g.T @ b, rtol=1e-4, atol=1e-4)
  kept = jnp.arange(6) < 2
  gb, ga = cons.cut_factor_grads(f32(g), f32(b), f32(a), f, kept)
  u, sig, vt = np.linalg.svd(b @ a.T)
  l2 = (u[:, :2] * sig[:2]) @ vt[:2]
  m = np.linalg.pinv(b) @ l2 @ np.linalg.pinv(a).T  # B M A^T = the top-2 triplets
  np.testing.assert_allclose(b @ m @ a.T, l2, atol=1e-8)
  np.testing.assert_allclose(gb, g @ a @ m.T, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(ga, g.T @ b @ m, rtol=1e-3, atol=1e-4)


def _kept_of(x, f, sp):
  """(k, kept entries) with x = the top-k triplets of f + S on the kept entries."""
  u, sig, v = (np.asarray(t, np.float64) for t in f)
  for k in range(int(np.sum(sig > 0)) + 1):
    rest = x - (u[:, :k] * sig[:k]) @ v[:, :k].T
    ks = np.abs(rest) > 1e-4
    if np.all(sp[ks] != 0) and np.allclose(rest[ks], sp[ks], atol=1e-4):
      return k, ks
  raise AssertionError("the params are not a cut of the state's L + S")


@pytest.mark.parametrize("cut", [
    dict(consolidate_global_dropout=0.8), dict(consolidate_cut_budgets=(0.3, 0.6)),
    dict(consolidate_cut_budgets=(0.4, 0.7), consolidate_cut_overhead=1 / 16),
    dict(consolidate_cut_budgets=(0.3, 0.6), consolidate_cut_jitter=0.1)])
def test_global_dropout_trains_the_cut_through_its_gradients(cut):
  lr = 0.02
  tx = sj.salaad(optax.sgd(lr), every_k=2, rho=0.2, rank_target=0.5, density_target=0.1,
                 consolidate_from=3, consolidate_params="factors", svt="exact", **cut)
  hist = _run(tx, _params(4), 9, lr_target=0.5)
  budgets = cut.get("consolidate_cut_budgets", ())
  ks_seen, cut_steps, budgets_seen = set(), 0, set()
  for t in range(3, 8):
    (p, s), (_, s_next) = hist[t], hist[t + 1]
    info, dropped_ratios, kept_ratios = {}, [], []
    for name in ("a", "b"):
      x, sp = _leaf(p, name), _s_leaf(s, name)
      f = sj.low_rank_factors(s)[f"{name}/kernel"]
      k, ks = _kept_of(x, f, sp)
      info[name] = (x, sp, f, k, ks)
      sig, (m, n) = np.asarray(f.s, np.float64), x.shape
      live = sig > 0
      kept_ratios += list(sig[:k] ** 2 / (m + n)) + list(sp[ks] ** 2)
      dropped_ratios += list(sig[k:][live[k:]] ** 2 / (m + n)) + list(sp[(sp != 0) & ~ks] ** 2)
      ks_seen.add(k)
    if dropped_ratios:  # one threshold over both blocks
      cut_steps += 1
      assert min(kept_ratios) >= max(dropped_ratios) - 1e-6
    if budgets and t > 3:  # the cut is the oracle's at one of the budgets
      fs = [sj.low_rank_factors(s)[f"{n}/kernel"] for n in ("a", "b")]
      sps = [_s_leaf(s, n) for n in ("a", "b")]
      got = {(i, "t", j) for i, n in enumerate("ab") for j in range(info[n][3])}
      got |= {(i, "e", j) for i, n in enumerate("ab") for j in np.flatnonzero(info[n][4])}
      total, outside = 24 * 16 + 16 * 40 + 3, 3
      sigs = [np.asarray(f.s, np.float64) for f in fs]
      jitter = cut.get("consolidate_cut_jitter", 0.0)
      if jitter:  # the greedy cut at its own cost, within the jitter of a budget
        cost = sum(info[n][3] * sum(info[n][0].shape) + int(info[n][4].sum()) for n in "ab")
        assert got == _cut_oracle(sigs, sps, keep=cost)
        hits = [b for b in budgets
                if (b - jitter) * total - outside - 56 <= cost <= (b + jitter) * total - outside]
        off_budget = all(got != _cut_oracle(sigs, sps, keep=b * total - outside)
                         for b in budgets)
        budgets_seen.add(("moved", off_budget))
      else:
        hits = [b for b in budgets if got == _cut_oracle(
            sigs, sps, keep=b * total - outside,
            overhead=cut.get("consolidate_cut_overhead", 0.0))]
      assert hits, f"step {t}: the cut is at none of the budgets"
      budgets_seen.add(hits[0])
    for name in ("a", "b"):
      x, sp, f, k, ks = info[name]
      b, a = _factors(s, name)
      grad = 2.0 * (x - 0.5)
      u, sig, v = (np.asarray(t_, np.float64) for t_ in f)
      lk = (u[:, :k] * sig[:k]) @ v[:, :k].T
      mm = np.linalg.pinv(b) @ lk @ np.linalg.pinv(a).T
      b2, a2 = b - lr * grad @ a @ mm.T, a - lr * grad.T @ b @ mm
      s2 = np.where(ks, sp - lr * grad, sp)
      nb, na = _factors(s_next, name)
      np.testing.assert_allclose(nb, b2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(na, a2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(_s_leaf(s_next, name), s2, rtol=1e-4, atol=1e-5)
  assert cut_steps >= 2 and len(ks_seen) >= 2  # the cut changes from step to step
  if budgets:
    assert len(budgets_seen) >= 2
  if cut.get("consolidate_cut_jitter"):  # some cut is off every budget's point
    assert ("moved", True) in budgets_seen
  # the first factor step trains the whole projection
  assert _kept_of(_leaf(hist[3][0], "b"), sj.low_rank_factors(hist[3][1])["b/kernel"],
                  _s_leaf(hist[3][1], "b"))[0] == int(np.ceil(0.5 * 16))


def test_joint_cut_loss_mixes_the_whole_and_the_cuts_gradients():
  # SGD on sum (X - 0.5)^2; grad_fn is that loss's gradient plus 1 on the
  # leaf outside the blocks, so the mix shows there too.  The params stay
  # the whole L + S; each step's factors move by (1 - w) the whole's
  # gradients plus w the cut's (at budget 0.3, the oracle's cut).
  lr, w, budget = 0.02, 0.3, 0.3
  tx = sj.salaad(optax.sgd(lr), every_k=2, rho=0.2, rank_target=0.5, density_target=0.1,
                 consolidate_from=3, consolidate_params="factors", svt="exact",
                 consolidate_cut_budgets=(budget, 1.0), consolidate_cut_joint=w)
  loss = lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p))
  calls = []

  def grad_fn(p):
    calls.append(1)
    g = jax.grad(loss)(p)
    return dict(g, bias=g["bias"] + 1.0)

  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  params, state, hist = _params(4), None, []
  state = tx.init(params)
  for _ in range(8):
    u, state = update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
    hist.append((params, state))
  assert calls  # traced once, inside the consolidation branch
  total, outside = 24 * 16 + 16 * 40 + 3, 3
  kept_sizes = set()
  for t in range(4, 7):
    (p, s), (p_next, s_next) = hist[t], hist[t + 1]
    fs = [sj.low_rank_factors(s)[f"{n}/kernel"] for n in ("a", "b")]
    sps = [_s_leaf(s, n) for n in ("a", "b")]
    cut = _cut_oracle([np.asarray(f.s, np.float64) for f in fs], sps,
                      keep=budget * total - outside)
    for i, name in enumerate(("a", "b")):
      x, sp, f = _leaf(p, name), sps[i], fs[i]
      u, sig, v = (np.asarray(t_, np.float64) for t_ in f)
      np.testing.assert_allclose(x, (u * sig) @ v.T + sp, atol=1e-4)  # the whole L + S
      k = sum(1 for (blk_, kind, _) in cut if blk_ == i and kind == "t")
      ks = np.zeros(sp.size, bool)
      ks[[j for (blk_, kind, j) in cut if blk_ == i and kind == "e"]] = True
      ks = ks.reshape(sp.shape)
      kept_sizes.add((name, k, int(ks.sum())))
      x_cut = (u[:, :k] * sig[:k]) @ v[:, :k].T + np.where(ks, sp, 0.0)
      g, gc = 2.0 * (x - 0.5), 2.0 * (x_cut - 0.5)
      b, a = _factors(s, name)
      mm = np.linalg.pinv(b) @ ((u[:, :k] * sig[:k]) @ v[:, :k].T) @ np.linalg.pinv(a).T
      b2 = b - lr * ((1 - w) * g @ a + w * gc @ a @ mm.T)
      a2 = a - lr * ((1 - w) * g.T @ b + w * gc.T @ b @ mm)
      s2 = np.where(sp != 0, sp - lr * ((1 - w) * g + w * np.where(ks, gc, 0.0)), 0.0)
      nb, na = _factors(s_next, name)
      np.testing.assert_allclose(nb, b2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(na, a2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(_s_leaf(s_next, name), s2, rtol=1e-4, atol=1e-5)
    bias, bias_next = np.asarray(p["bias"]), np.asarray(p_next["bias"])
    np.testing.assert_allclose(bias_next, bias - lr * (2.0 * (bias - 0.5) + w), rtol=1e-5)
  # the cut is a strict part of the structure in both blocks
  full = {"a": int(np.ceil(0.5 * 16)), "b": int(np.ceil(0.5 * 16))}
  assert all(k < full[name] for name, k, _ in kept_sizes)


def test_joint_cut_loss_needs_its_gradient_and_a_cut():
  kw = dict(consolidate_from=3, consolidate_params="factors")
  tx = sj.salaad(optax.sgd(0.1), every_k=2, rank_target=0.5, density_target=0.1,
                 consolidate_cut_budgets=(0.3, 1.0), consolidate_cut_joint=0.5, **kw)
  params = _params(1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="budget below 1"):
    sj.salaad(optax.sgd(0.1), consolidate_cut_budgets=(1.0,), consolidate_cut_joint=0.5, **kw)
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match="consolidate_cut_joint"):
      sj.salaad(optax.sgd(0.1), consolidate_cut_budgets=(0.3,), consolidate_cut_joint=bad, **kw)


def test_lever_errors_name_the_option():
  with pytest.raises(ValueError, match="consolidate_structure"):
    sj.salaad(optax.sgd(1.0), consolidate_structure="best")
  with pytest.raises(ValueError, match="consolidate_from"):
    sj.salaad(optax.sgd(1.0), consolidate_from=-1)
  with pytest.raises(ValueError, match="target_schedule"):
    sj.salaad(optax.sgd(1.0), target_schedule=0.5)
  with pytest.raises(ValueError, match="consolidate_dropout"):
    sj.salaad(optax.sgd(1.0), consolidate_dropout=1.5)
  with pytest.raises(ValueError, match="consolidate_params must be one of"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="svd")
  for bad in (dict(), dict(consolidate_from=3, consolidate_dropout=0.2)):
    with pytest.raises(ValueError, match="consolidate_params='factors'"):
      sj.salaad(optax.sgd(1.0), consolidate_params="factors", **bad)
  with pytest.raises(ValueError, match="consolidate_params='factors'"):
    sj.salaad_decoupled(1.0, consolidate_from=3, consolidate_params="factors")
  with pytest.raises(ValueError, match="consolidate_factor_lr"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_factor_lr=0.0)
  with pytest.raises(ValueError, match="consolidate_factor_lr scales the factors"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_factor_lr=2.0)
  with pytest.raises(ValueError, match="consolidate_global_dropout trains cuts"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_global_dropout=0.5)
  with pytest.raises(ValueError, match="consolidate_global_dropout"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_global_dropout=1.5)
  with pytest.raises(ValueError, match="consolidate_cut_budgets trains cuts"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_cut_budgets=(0.5,))
  for bad in ((0.5, 0.0), (1.2,), ("x",)):
    with pytest.raises(ValueError, match="consolidate_cut_budgets"):
      sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
                consolidate_cut_budgets=bad)
  with pytest.raises(ValueError, match="consolidate_cut_overhead prices"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_overhead=0.1)
  with pytest.raises(ValueError, match="consolidate_cut_jitter moves"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_jitter=0.1)
  with pytest.raises(ValueError, match="consolidate_cut_jitter"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_budgets=(0.5,), consolidate_cut_jitter=-0.1)
  with pytest.raises(ValueError, match="pass one of them"):
    sj.salaad(optax.sgd(1.0), consolidate_from=3, consolidate_params="factors",
              consolidate_cut_budgets=(0.5,), consolidate_global_dropout=0.3)


# ----------------------------------------------------------------------------
# TrainConfig fields and presets.
# ----------------------------------------------------------------------------


def _tiny(**kw):
  return TrainConfig(model="tiny", steps=100, warmup_steps=5, **kw)


def test_config_fields_become_transform_options():
  kw = methods.salaad_kwargs(_tiny(every_k=5, target_schedule_end=0.5, rho_mode="tanh",
                                   rho_ramp_center=0.5, rho_ramp_width=0.1,
                                   consolidate_from=0.7))
  assert kw["consolidate_from"] == 70
  assert float(kw["target_schedule"](10)) == 0.0 and float(kw["target_schedule"](0)) == 1.0
  assert float(kw["rho_schedule"](10)) == pytest.approx(5.5)  # centre: 0.5 * 100 / 5
  off = methods.salaad_kwargs(_tiny())
  assert (off["consolidate_from"], off["target_schedule"], off["rho_schedule"]) == (None,) * 3
  assert methods.salaad_kwargs(_tiny(rho_mode="shape_dependent"))["rho"] == "shape_dependent"
  fac = methods.salaad_kwargs(_tiny(consolidate_params="factors", consolidate_from=0.5,
                                    consolidate_factor_lr=3.0, consolidate_global_dropout=0.2))
  assert (fac["consolidate_params"], fac["consolidate_factor_lr"],
          fac["consolidate_global_dropout"]) == ("factors", 3.0, 0.2)
  # byte budgets: with --consolidate_cut_bitmaps a bitmap per block (1/16 of a
  # bf16 value per entry) priced in the cut; without, every bitmap counted as
  # kept: b less the bitmaps' share of the dense bytes
  fields = dict(consolidate_params="factors", consolidate_from=0.5,
                consolidate_cut_budgets="0.4, 0.6", vocab_size=256, seq_len=64)
  cb = methods.salaad_kwargs(_tiny(consolidate_cut_bitmaps=True, consolidate_cut_jitter=0.02,
                                   **fields))
  assert (cb["consolidate_cut_budgets"], cb["consolidate_cut_overhead"],
          cb["consolidate_cut_jitter"]) == ((0.4, 0.6), 1 / 16, 0.02)
  blocks = accounting.model_blocks(get_config("tiny", vocab_size=256, max_len=64))
  total = blocks.rest + sum(m * n for m, n in blocks.shapes.values())
  bitmaps = sum(np.ceil(m * n / 8) for m, n in blocks.shapes.values())
  cb = methods.salaad_kwargs(_tiny(**fields))
  np.testing.assert_allclose(cb["consolidate_cut_budgets"],
                             [b - bitmaps / (2 * total) for b in (0.4, 0.6)])
  assert cb["consolidate_cut_overhead"] == 0.0
  assert cb["consolidate_cut_joint"] == 0.0
  assert methods.salaad_kwargs(_tiny(consolidate_cut_joint=0.5, **fields))[
      "consolidate_cut_joint"] == 0.5
  assert methods.salaad_kwargs(_tiny(consolidate_cut_budgets="0.4"))[
      "consolidate_cut_budgets"] == ()  # consolidation off: no cuts
  # --consolidate_from=0 switches consolidation off whatever the preset set.
  cfg = presets.config_with_preset("recommended", model="tiny", consolidate_from=0.0)
  cfg_lib.validate(cfg)
  off = methods.salaad_kwargs(cfg)
  assert (off["consolidate_from"], off["consolidate_params"], off["consolidate_factor_lr"]) == (
      None, "projection", 1.0)


@pytest.mark.parametrize("change, message", [
    (dict(consolidate_from=1.0), r"--consolidate_from=1.0 must lie in \[0, 1\)"),
    (dict(consolidate_dropout=1.0), "--consolidate_dropout=1.0 must lie in"),
    (dict(target_schedule_end=2.0), "--target_schedule_end=2.0"),
    (dict(rho_mode="tanh", rho_ramp_width=0.0), "--rho_mode=tanh needs"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_dropout=0.2),
     r"--consolidate_params='factors' trains .* no --consolidate_dropout"),
    (dict(consolidate_params="factors", consolidate_from=0.5, coupling="decoupled"),
     r"consolidate_params='factors' trains .* needs the coupled"),
    (dict(consolidate_factor_lr=0.0), "--consolidate_factor_lr=0.0 must be > 0"),
    (dict(consolidate_from=0.5, consolidate_global_dropout=0.5),
     "consolidate_global_dropout trains cuts of the factors: it needs"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_global_dropout=1.0),
     "--consolidate_global_dropout=1.0 must lie in"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_factor_lr=0.0),
     "--consolidate_factor_lr=0.0 must be > 0"),
    (dict(consolidate_cut_budgets="0.4,x"), "--consolidate_cut_budgets='0.4,x' must be"),
    (dict(consolidate_cut_jitter=1.0), r"--consolidate_cut_jitter=1.0 must lie in \[0, 1\)"),
    (dict(consolidate_cut_budgets="0.4,1.5"), "--consolidate_cut_budgets='0.4,1.5' must be"),
    (dict(consolidate_from=0.5, consolidate_cut_budgets="0.4"),
     "consolidate_cut_budgets trains cuts of the factors: it needs"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_cut_budgets="0.4",
          consolidate_global_dropout=0.2), "both choose each step's cut"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_cut_budgets="1.0",
          consolidate_cut_joint=0.5), "consolidate_cut_joint adds the loss at a cut"),
    (dict(consolidate_params="factors", consolidate_from=0.5, consolidate_cut_budgets="0.4",
          consolidate_cut_joint=1.0), r"--consolidate_cut_joint=1.0 must lie in \[0, 1\)"),
])
def test_lever_flags_are_validated(change, message):
  with pytest.raises(TrainError, match=message):
    cfg_lib.validate(_tiny(**change))


def test_reference_preset_is_the_papers_settings():
  ref = presets.config_with_preset("reference", model="60m")
  assert (ref.k_alpha, ref.k_beta, ref.every_k, ref.rho, ref.rho_embed) == (
      0.2, 0.002, 10, 1e-6, 3e-7)
  assert (ref.alpha_init, ref.beta_init, ref.energy, ref.svt) == ("zero", 0.0, 0.999, "exact")
  assert (ref.rank_target, ref.density_target, ref.deriv_start) == (0.15, 0.05, 1500)
  # S dense, as the authors store it: with their slow gains its density stays
  # far above the default capacity (3 d*) for most of training.
  assert ref.sparse_capacity == "none"
  assert presets.config_with_preset("recommended", model="tiny").sparse_capacity == "none"
  big = presets.config_with_preset("reference", model="350m")
  assert (big.k_beta, big.rho, big.every_k) == (0.0013, 1e-8, 25)
  assert presets.config_with_preset("reference", model="1b").every_k == 5
  assert presets.config_with_preset("reference", model="tiny", rho=1e-3).rho == 1e-3
  with pytest.raises(TrainError, match="--salaad_preset='best' is not a preset"):
    presets.preset_fields("best", "tiny")


def test_with_preset_expands_the_named_preset_under_explicit_fields():
  got = presets.with_preset({"salaad_preset": "recommended", "rank_target": 0.3}, "tiny")
  assert got["rank_target"] == 0.3 and got["salaad_preset"] == "recommended"
  assert (got["consolidate_from"], got["density_target"], got["rho"]) == (0.01, 0.08, 1e-3)
  assert (got["consolidate_params"], got["consolidate_factor_lr"]) == ("factors", 3.0)
  # The tiny model's structure is sized for half its dense bytes; others keep 0.2.
  assert presets.with_preset({"salaad_preset": "recommended"}, "tiny")["rank_target"] == 0.12
  assert presets.with_preset({"salaad_preset": "recommended"}, "60m")["rank_target"] == 0.2
  assert presets.with_preset({"k_alpha": 1.0}, "tiny") == {"k_alpha": 1.0}
  with pytest.raises(TrainError, match="is not a preset"):
    presets.with_preset({"salaad_preset": "best"}, "tiny")


def test_explicit_flags_win_over_the_preset(tmp_path):
  flagfile = tmp_path / "f.flags"
  flagfile.write_text("--every_k=3\n")
  fv = flags.FlagValues()
  train_flags.define_flags(fv)
  fv(["prog", "--model=tiny", "--salaad_preset=reference", "--rho=1e-3",
      f"--flagfile={flagfile}"])
  c = train_flags.config_from_flags(fv)
  assert c.salaad_preset == "reference"
  assert (c.rho, c.every_k) == (1e-3, 3)  # given: command line, flag file
  assert (c.k_beta, c.alpha_init, c.svt) == (0.002, "zero", "exact")  # from the preset
  defaults = dataclasses.replace(TrainConfig(), model="tiny")
  plain = flags.FlagValues()
  train_flags.define_flags(plain)
  plain(["prog", "--model=tiny"])
  assert train_flags.config_from_flags(plain) == defaults


def test_tiny_flag_file_runs_the_recommended_preset():
  """The flag file sets no SALAAD field itself, so --salaad_preset swaps all of them."""
  got = {}
  for preset in (None, "reference"):
    fv = flags.FlagValues()
    train_flags.define_flags(fv)
    fv(["prog", f"--flagfile={TINY_FLAGS}"] + ([f"--salaad_preset={preset}"] if preset else []))
    got[preset] = train_flags.config_from_flags(fv)
  rec = presets.preset_fields("recommended", "tiny")
  assert got[None].salaad_preset == "recommended" and rec["consolidate_from"] > 0
  assert all(getattr(got[None], k) == v for k, v in rec.items())
  ref = presets.preset_fields("reference", "tiny")
  assert all(getattr(got["reference"], k) == v for k, v in ref.items())
