"""consolidation: the projection and factor steps through the transform, on
two blocks (the params are L + S at the target structure; the factors step
by the chain rule; nested dropout, global dropout, cut budgets and the joint
cut loss train their cuts) and on the golden cases' model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golden_cases as gc
import salaad_jax as sj
from helpers import (block_leaf, cut_oracle, factor_leaves, kept_of, run_steps, sparse_leaf,
                     two_blocks)
from salaad_jax import consolidate as cons
from salaad_jax import prox


@pytest.mark.slow
def test_factors_keep_the_current_structure():
  """consolidate_structure='current' with factors: the first projection keeps
  the controller's rank and S's support, and the factor steps never leave
  them (L's rank at most that, S on that support, U zero)."""
  tx = sj.salaad(gc.adam(), consolidate_params="factors", consolidate_structure="current",
                 **gc.CONSOLIDATE)
  before = gc.run_transform(tx, gc.CONSOLIDATE_FROM)
  after = gc.run_transform(tx, 4, start=before)
  rank = lambda state: {p: int(np.sum(np.asarray(f.s) > 0))
                        for p, f in sj.low_rank_factors(state).items()}
  support = lambda state: {p: np.asarray(s) != 0 for p, s in sj.sparse_parts(state).items()}
  kept, omega = rank(before[1]), support(before[1])
  assert int(after[1].count) == gc.CONSOLIDATE_FROM + 4
  assert all(kept[p] > 0 for p in kept) and any(o.any() for o in omega.values())
  for p, r in rank(after[1]).items():
    assert 0 < r <= kept[p], (p, r, kept[p])
  for p, o in support(after[1]).items():
    assert not np.any(o & ~omega[p]), p
  for dual in jax.tree.leaves(after[1].dual):
    assert not np.any(np.asarray(dual))
  # the params are the surrogate L + S
  x_hat = sj.surrogate_params(after[0], after[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               after[0], x_hat)


@pytest.fixture(scope="module", params=["exact", "fast"])
def consolidated(request):
  params = two_blocks(1)
  tx = sj.salaad(optax.adam(3e-2), every_k=2, rho=0.2, rank_target=0.25,
                 density_target=0.1, consolidate_from=4, svt=request.param, svt_iters=2)
  return request.param, run_steps(tx, params, 9, lr_target=0.5)


@pytest.mark.slow
def test_consolidation_trains_the_surrogate_at_the_target_structure(consolidated):
  svt, hist = consolidated
  masks = None
  for t, (p, s) in enumerate(hist):
    if t < 4:
      continue  # steps 0..3: ordinary ADMM (the projection starts at step 4)
    for name, (m, n) in (("a", (24, 16)), ("b", (16, 40))):
      f = sj.low_rank_factors(s)[f"{name}/kernel"]
      l = np.asarray(prox.dense(f))
      sp = sparse_leaf(s, name)
      np.testing.assert_allclose(block_leaf(p, name), l + sp, atol=1e-5)  # X = L + S
      assert np.abs(block_leaf(s.dual, name)).max() == 0.0
      r = int(np.sum(np.asarray(f.s) > 0))
      assert r == int(np.ceil(0.25 * min(m, n)))
      assert np.sum(sp != 0) == int(np.ceil(0.1 * m * n))
      kept = np.asarray(f.s) > 0
      u, v = np.asarray(f.u)[:, kept], np.asarray(f.v)[:, kept]
      np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-4)  # L stays an SVD
      np.testing.assert_allclose(v.T @ v, np.eye(r), atol=1e-4)
      assert np.all(np.diff(np.asarray(f.s)[kept]) <= 1e-6)
    now = {name: sparse_leaf(s, name) != 0 for name in ("a", "b")}
    if masks is not None:  # the support is fixed after the first projection
      for name in now:
        np.testing.assert_array_equal(now[name], masks[name])
    masks = now
  # Before consolidation X is not yet L + S.
  p3, s3 = hist[3]
  l3 = np.asarray(prox.dense(sj.low_rank_factors(s3)["a/kernel"]))
  assert np.abs(block_leaf(p3, "a") - l3 - sparse_leaf(s3, "a")).max() > 1e-3


@pytest.mark.slow
def test_consolidation_keeps_the_current_structure():
  params = two_blocks(2)
  kw = dict(every_k=1, rho=0.5, rank_target=0.2, density_target=0.1, k_alpha=1.0,
            k_beta=1.0, svt="exact", alpha_init="sigma_k")
  before = run_steps(sj.salaad(optax.adam(1e-2), **kw), params, 3)[-1][1]
  after = run_steps(sj.salaad(optax.adam(1e-2), consolidate_from=3,
                         consolidate_structure="current", **kw), params, 5)
  for name in ("a", "b"):
    r0 = int(np.sum(np.asarray(sj.low_rank_factors(before)[f"{name}/kernel"].s) > 0))
    for _, s in after[3:]:
      assert int(np.sum(np.asarray(sj.low_rank_factors(s)[f"{name}/kernel"].s) > 0)) == r0
      np.testing.assert_array_equal(sparse_leaf(s, name) != 0,
                                    sparse_leaf(before, name) != 0)


@pytest.mark.slow
def test_nested_dropout_trains_the_full_surrogate_through_truncations():
  params = two_blocks(4)
  tx = sj.salaad(optax.adam(3e-2), every_k=2, rho=0.2, rank_target=0.25, density_target=0.1,
                 consolidate_from=2, consolidate_dropout=0.5, svt="exact")
  hist = run_steps(tx, params, 8, lr_target=0.5)
  gaps = []
  for p, s in hist[3:]:
    f = sj.low_rank_factors(s)["b/kernel"]
    full = np.asarray(prox.dense(f)) + sparse_leaf(s, "b")
    x = block_leaf(p, "b")
    gaps.append(np.abs(x - full).max())
    # the params are the truncation at some drop share q in [0, 0.5)
    assert int(np.sum(np.asarray(f.s) > 0)) == 4
    sp = jnp.asarray(sparse_leaf(s, "b"), jnp.float32)
    err = min(np.abs(x - np.asarray(cons.truncated(f, sp, q))).max()
              for q in np.linspace(0.0, 0.5, 51))
    assert err < 1e-4
  assert max(gaps) > 1e-3  # some steps train a strictly smaller model
  loss = lambda p, s: np.sum((np.asarray(prox.dense(sj.low_rank_factors(s)["b/kernel"]))
                              + sparse_leaf(s, "b") - 0.5) ** 2)
  assert loss(*hist[-1]) < loss(*hist[2])  # and the full surrogate improves


@pytest.mark.slow
@pytest.mark.parametrize("capacity, factor_lr", [(None, 1.0), ("auto", 1.0), (None, 0.4)])
def test_factor_consolidation_steps_the_factors_by_the_chain_rule(capacity, factor_lr):
  # SGD on a count-dependent learning rate: the oracle below also checks
  # that the factors' optimiser counts in step with the main one; the
  # factors' steps are factor_lr times it, S's values keep the run's.
  lr = lambda count: 0.01 * (1.0 + count)
  tx = sj.salaad(optax.sgd(lr), every_k=2, rho=0.2, rank_target=0.25, density_target=0.1,
                 consolidate_from=3, consolidate_params="factors", svt="exact",
                 sparse_capacity=capacity, consolidate_factor_lr=factor_lr)
  params = two_blocks(5)
  hist = run_steps(tx, params, 7, lr_target=0.5)
  for t in range(3, 6):  # hist[t]: after step t (0-based); step 3 projects
    (p, s), (p_next, s_next) = hist[t], hist[t + 1]
    for name, (m, n) in (("a", (24, 16)), ("b", (16, 40))):
      b, a = factor_leaves(s, name)
      sp = sparse_leaf(s, name)
      x = block_leaf(p, name)
      np.testing.assert_allclose(x, b @ a.T + sp, atol=1e-5)  # X = B A^T + S
      assert b.shape == (m, int(np.ceil(0.25 * min(m, n))))
      grad = 2.0 * (x - 0.5)
      step = lr(t + 1)  # the update of step t + 1 sees count t + 1
      b2, a2 = b - factor_lr * step * grad @ a, a - factor_lr * step * grad.T @ b
      s2 = np.where(sp != 0, sp - step * grad, 0.0)
      np.testing.assert_allclose(block_leaf(p_next, name), b2 @ a2.T + s2, rtol=1e-4, atol=1e-4)
      nb, na = factor_leaves(s_next, name)
      np.testing.assert_allclose(nb, b2, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(na, a2, rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(sparse_leaf(s_next, name) != 0, sp != 0)  # fixed support
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
  assert not np.any(factor_leaves(hist[2][1], "a")[0])


@pytest.mark.slow
def test_factor_consolidation_starts_from_the_projection():
  kw = dict(every_k=2, rho=0.2, rank_target=0.25, density_target=0.1, consolidate_from=3,
            svt="exact")
  params = two_blocks(6)
  proj = run_steps(sj.salaad(optax.adam(1e-2), **kw), params, 4)
  fac = run_steps(sj.salaad(optax.adam(1e-2), consolidate_params="factors", **kw), params, 4)
  # Through the first projection the two are the same run; B, A are its
  # balanced factors.
  for (p1, s1), (p2, s2) in zip(proj, fac):
    np.testing.assert_allclose(block_leaf(p1, "b"), block_leaf(p2, "b"), atol=1e-4)
  b, a = factor_leaves(fac[-1][1], "b")
  f = sj.low_rank_factors(fac[-1][1])["b/kernel"]
  sig = np.asarray(f.s)[:b.shape[1]]
  np.testing.assert_allclose(b, np.asarray(f.u)[:, :b.shape[1]] * np.sqrt(sig), atol=1e-5)
  np.testing.assert_allclose(b.T @ b, a.T @ a, atol=1e-4)  # balanced
  # and the factors' adam moments are still zero: no gradient reached them yet
  moments = [x for x in jax.tree.leaves(sj.find_state(fac[-1][1]).factored.inner_state)
             if np.ndim(x) == 2]
  assert moments and all(not np.any(np.asarray(x)) for x in moments)


@pytest.mark.parametrize("cut", [
    dict(consolidate_global_dropout=0.8), dict(consolidate_cut_budgets=(0.3, 0.6)),
    dict(consolidate_cut_budgets=(0.4, 0.7), consolidate_cut_overhead=1 / 16),
    dict(consolidate_cut_budgets=(0.3, 0.6), consolidate_cut_jitter=0.1)])
@pytest.mark.slow
def test_global_dropout_trains_the_cut_through_its_gradients(cut):
  lr = 0.02
  tx = sj.salaad(optax.sgd(lr), every_k=2, rho=0.2, rank_target=0.5, density_target=0.1,
                 consolidate_from=3, consolidate_params="factors", svt="exact", **cut)
  hist = run_steps(tx, two_blocks(4), 9, lr_target=0.5)
  budgets = cut.get("consolidate_cut_budgets", ())
  ks_seen, cut_steps, budgets_seen = set(), 0, set()
  for t in range(3, 8):
    (p, s), (_, s_next) = hist[t], hist[t + 1]
    info, dropped_ratios, kept_ratios = {}, [], []
    for name in ("a", "b"):
      x, sp = block_leaf(p, name), sparse_leaf(s, name)
      f = sj.low_rank_factors(s)[f"{name}/kernel"]
      k, ks = kept_of(x, f, sp)
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
      sps = [sparse_leaf(s, n) for n in ("a", "b")]
      got = {(i, "t", j) for i, n in enumerate("ab") for j in range(info[n][3])}
      got |= {(i, "e", j) for i, n in enumerate("ab") for j in np.flatnonzero(info[n][4])}
      total, outside = 24 * 16 + 16 * 40 + 3, 3
      sigs = [np.asarray(f.s, np.float64) for f in fs]
      jitter = cut.get("consolidate_cut_jitter", 0.0)
      if jitter:  # the greedy cut at its own cost, within the jitter of a budget
        cost = sum(info[n][3] * sum(info[n][0].shape) + int(info[n][4].sum()) for n in "ab")
        assert got == cut_oracle(sigs, sps, keep=cost)
        hits = [b for b in budgets
                if (b - jitter) * total - outside - 56 <= cost <= (b + jitter) * total - outside]
        off_budget = all(got != cut_oracle(sigs, sps, keep=b * total - outside)
                         for b in budgets)
        budgets_seen.add(("moved", off_budget))
      else:
        hits = [b for b in budgets if got == cut_oracle(
            sigs, sps, keep=b * total - outside,
            overhead=cut.get("consolidate_cut_overhead", 0.0))]
      assert hits, f"step {t}: the cut is at none of the budgets"
      budgets_seen.add(hits[0])
    for name in ("a", "b"):
      x, sp, f, k, ks = info[name]
      b, a = factor_leaves(s, name)
      grad = 2.0 * (x - 0.5)
      u, sig, v = (np.asarray(t_, np.float64) for t_ in f)
      lk = (u[:, :k] * sig[:k]) @ v[:, :k].T
      mm = np.linalg.pinv(b) @ lk @ np.linalg.pinv(a).T
      b2, a2 = b - lr * grad @ a @ mm.T, a - lr * grad.T @ b @ mm
      s2 = np.where(ks, sp - lr * grad, sp)
      nb, na = factor_leaves(s_next, name)
      np.testing.assert_allclose(nb, b2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(na, a2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(sparse_leaf(s_next, name), s2, rtol=1e-4, atol=1e-5)
  assert cut_steps >= 2 and len(ks_seen) >= 2  # the cut changes from step to step
  if budgets:
    assert len(budgets_seen) >= 2
  if cut.get("consolidate_cut_jitter"):  # some cut is off every budget's point
    assert ("moved", True) in budgets_seen
  # the first factor step trains the whole projection
  assert kept_of(block_leaf(hist[3][0], "b"), sj.low_rank_factors(hist[3][1])["b/kernel"],
                  sparse_leaf(hist[3][1], "b"))[0] == int(np.ceil(0.5 * 16))


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
  params, state, hist = two_blocks(4), None, []
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
    sps = [sparse_leaf(s, n) for n in ("a", "b")]
    cut = cut_oracle([np.asarray(f.s, np.float64) for f in fs], sps,
                      keep=budget * total - outside)
    for i, name in enumerate(("a", "b")):
      x, sp, f = block_leaf(p, name), sps[i], fs[i]
      u, sig, v = (np.asarray(t_, np.float64) for t_ in f)
      np.testing.assert_allclose(x, (u * sig) @ v.T + sp, atol=1e-4)  # the whole L + S
      k = sum(1 for (blk_, kind, _) in cut if blk_ == i and kind == "t")
      ks = np.zeros(sp.size, bool)
      ks[[j for (blk_, kind, j) in cut if blk_ == i and kind == "e"]] = True
      ks = ks.reshape(sp.shape)
      kept_sizes.add((name, k, int(ks.sum())))
      x_cut = (u[:, :k] * sig[:k]) @ v[:, :k].T + np.where(ks, sp, 0.0)
      g, gc = 2.0 * (x - 0.5), 2.0 * (x_cut - 0.5)
      b, a = factor_leaves(s, name)
      mm = np.linalg.pinv(b) @ ((u[:, :k] * sig[:k]) @ v[:, :k].T) @ np.linalg.pinv(a).T
      b2 = b - lr * ((1 - w) * g @ a + w * gc @ a @ mm.T)
      a2 = a - lr * ((1 - w) * g.T @ b + w * gc.T @ b @ mm)
      s2 = np.where(sp != 0, sp - lr * ((1 - w) * g + w * np.where(ks, gc, 0.0)), 0.0)
      nb, na = factor_leaves(s_next, name)
      np.testing.assert_allclose(nb, b2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(na, a2, rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(sparse_leaf(s_next, name), s2, rtol=1e-4, atol=1e-5)
    bias, bias_next = np.asarray(p["bias"]), np.asarray(p_next["bias"])
    np.testing.assert_allclose(bias_next, bias - lr * (2.0 * (bias - 0.5) + w), rtol=1e-5)
  # the cut is a strict part of the structure in both blocks
  full = {"a": int(np.ceil(0.5 * 16)), "b": int(np.ceil(0.5 * 16))}
  assert all(k < full[name] for name, k, _ in kept_sizes)


def test_joint_cut_loss_needs_its_gradient_and_a_cut():
  kw = dict(consolidate_from=3, consolidate_params="factors")
  tx = sj.salaad(optax.sgd(0.1), every_k=2, rank_target=0.5, density_target=0.1,
                 consolidate_cut_budgets=(0.3, 1.0), consolidate_cut_joint=0.5, **kw)
  params = two_blocks(1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="budget below 1"):
    sj.salaad(optax.sgd(0.1), consolidate_cut_budgets=(1.0,), consolidate_cut_joint=0.5, **kw)
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match="consolidate_cut_joint"):
      sj.salaad(optax.sgd(0.1), consolidate_cut_budgets=(0.3,), consolidate_cut_joint=bad, **kw)


@pytest.mark.slow
def test_blocks_of_one_shape_are_projected_as_a_group_each_onto_its_own_svd():
  """Three blocks of one shape (one vmapped group) and one of another: at
  learning rate 0 X never moves, so the first projection makes each block's
  L the truncated SVD of its own X at ceil(r* min(m, n)) triplets and S the
  ceil(d* m n) largest entries of X - L (NumPy), and the params L + S."""
  rng = np.random.default_rng(11)
  shapes = {"a": (20, 12), "b": (20, 12), "c": (20, 12), "d": (12, 30)}
  params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
            for name, shape in shapes.items()}
  tx = sj.salaad(optax.sgd(0.0), every_k=2, rho=0.2, rank_target=0.25, density_target=0.1,
                 consolidate_from=3, svt="exact")
  hist = run_steps(tx, params, 4)
  p, s = hist[3]  # after the step taken from count 3: the first projection
  for name, (m, n) in shapes.items():
    x = block_leaf(params, name)
    u, sig, vt = np.linalg.svd(x, full_matrices=False)
    # ceil of the products as meant, as the transform takes it (0.1 * 12 * 30 is 36.00000000000001)
    r, k = math.ceil(0.25 * min(m, n) - 1e-6), math.ceil(0.1 * m * n - 1e-6)
    l_ref = (u[:, :r] * sig[:r]) @ vt[:r]
    rest = x - l_ref
    s_ref = np.where(np.abs(rest) >= np.sort(np.abs(rest).ravel())[::-1][k - 1], rest, 0.0)
    f = sj.low_rank_factors(s)[f"{name}/kernel"]
    assert int(np.sum(np.asarray(f.s) > 0)) == r, name
    np.testing.assert_allclose(np.asarray(f.s)[:r], sig[:r], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(np.asarray(prox.dense(f)), l_ref, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(sparse_leaf(s, name), s_ref, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(block_leaf(p, name), l_ref + s_ref, atol=1e-4, err_msg=name)
  # Before it X was untouched: the projection is of the starting point.
  jax.tree.map(np.testing.assert_array_equal, hist[2][0], params)
