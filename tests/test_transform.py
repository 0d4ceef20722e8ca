"""The SALAAD transform: ADMM rounds, controller, initialisation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax import prox


def _rpca_problem(m=60, n=80, r=3, frac=0.05, seed=0):
  rng = np.random.default_rng(seed)
  l0 = rng.normal(size=(m, r)) @ rng.normal(size=(r, n))
  s0 = np.zeros((m, n))
  mask = rng.random((m, n)) < frac
  s0[mask] = rng.choice([-1, 1], mask.sum()) * rng.uniform(5, 10, mask.sum())
  return l0, s0, mask


def _hold_fixed(tx, params, rounds):
  """Runs ``rounds`` steps with zero updates (X held fixed), every_k = 1."""
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  step = jax.jit(lambda s: tx.update(zeros, s, params)[1])
  for _ in range(rounds):
    state = step(state)
  return state


@pytest.mark.slow
@pytest.mark.parametrize("svt", ["exact", "fast"])
def test_robust_pca_recovery(svt):
  l0, s0, mask = _rpca_problem()
  m, n = l0.shape
  x = jnp.asarray(l0 + s0, jnp.float32)
  params = {"w": {"kernel": x}}
  mu = m * n / (4 * np.abs(l0 + s0).sum())
  lam = 1 / np.sqrt(max(m, n))
  # alpha/rho = 1/mu and beta/rho = lambda/mu: the classical RPCA thresholds.
  tx = sj.salaad(optax.sgd(0.0), every_k=1, rho=mu, mode="fixed", alpha_init=mu,
                 beta_init=mu * lam, svt=svt, max_rank=10 if svt == "fast" else None,
                 svt_iters=2)
  state = _hold_fixed(tx, params, 300)
  f = sj.low_rank_factors(state)["w/kernel"]
  s = np.asarray(sj.sparse_parts(state)["w/kernel"])
  l = np.asarray(prox.dense(f))
  assert int(np.sum(np.asarray(f.s) > 1e-3 * float(f.s[0]))) == 3
  assert np.linalg.norm(l - l0) / np.linalg.norm(l0) < 1e-3
  support = s != 0
  assert (support & mask).sum() / support.sum() > 0.99  # precision
  assert (support & mask).sum() / mask.sum() > 0.99  # recall
  assert float(sj.primal_residual(params, state)["w/kernel"]) < 1e-4


def test_rounds_run_every_k_steps_only():
  params = {"w": {"kernel": jnp.ones((8, 6)) + jnp.eye(8, 6)}}
  tx = sj.salaad(optax.sgd(0.1), every_k=3, rho=0.1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda s, p: tx.update(grads, s, p))
  counts = []
  for _ in range(7):
    updates, state = step(state, params)
    params = optax.apply_updates(params, updates)
    counts.append(int(state.num_rounds))
  assert counts == [0, 0, 1, 1, 1, 2, 2]


def test_coupled_gradient_adds_penalty_and_round_uses_new_x():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)
  params = {"w": {"kernel": x}, "b": {"bias": jnp.ones(7)}}
  rho = 0.3
  tx = sj.salaad(optax.sgd(1.0), every_k=2, rho=rho)
  state = tx.init(params)
  f = sj.low_rank_factors(state)["w/kernel"]
  l = prox.dense(f)
  g = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, state = tx.update(g, state, params)
  # sgd(1): update = -(g + rho (X - L - S + U)) with S = U = 0 at init.
  np.testing.assert_allclose(updates["w"]["kernel"], -(0.5 + rho * (x - l)), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(updates["b"]["bias"], -0.5 * np.ones(7))
  # Second step runs the round on X_2 = X_1 + u_2; check the dual update
  # U = X_2 - L - S exactly (U was 0).
  params = optax.apply_updates(params, updates)
  updates, state = tx.update(g, state, params)
  x2 = params["w"]["kernel"] + updates["w"]["kernel"]
  f = sj.low_rank_factors(state)["w/kernel"]
  s = sj.sparse_parts(state)["w/kernel"]
  np.testing.assert_allclose(state.dual["w"]["kernel"], x2 - prox.dense(f) - s, atol=1e-5)


def test_decoupled_equals_manual_formula():
  rng = np.random.default_rng(1)
  params = {"k": {"kernel": jnp.asarray(rng.normal(size=(6, 9)), jnp.float32)}}
  lr, rho = 0.05, 0.7
  tx = optax.chain(optax.sgd(lr), sj.salaad_decoupled(lr, rho=rho, every_k=5))
  state = tx.init(params)
  l = prox.dense(sj.low_rank_factors(state)["k/kernel"])
  g = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(g, state, params)
  x = params["k"]["kernel"]
  np.testing.assert_allclose(updates["k"]["kernel"], -lr * 1.0 - lr * rho * (x - l),
                             rtol=1e-5, atol=1e-6)


def test_init_low_rank_at_target_and_sigma_k_alpha():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 20)).astype(np.float32)
  params = {"a": {"kernel": jnp.asarray(x)}}
  rho = 1e-3
  for svt in ("exact", "fast"):
    tx = sj.salaad(optax.sgd(0.1), rank_target=0.25, rho=rho, svt=svt,
                   alpha_init="sigma_k", init_iters=8)
    state = tx.init(params)
    f = sj.low_rank_factors(state)["a/kernel"]
    sig = np.linalg.svd(x, compute_uv=False)
    assert int(np.sum(np.asarray(f.s) > 0)) == 5  # floor(0.25 * 20)
    np.testing.assert_allclose(np.asarray(f.s[:5]), sig[:5], rtol=2e-3)
    alpha = float(sj.block_metrics(state)["a/kernel"]["alpha"])
    np.testing.assert_allclose(alpha, rho * sig[4], rtol=2e-3)  # k = ceil(0.25*20) = 5
    assert np.all(np.asarray(sj.sparse_parts(state)["a/kernel"]) == 0)


def _structured(m, n, r, d, noise, rng):
  low = rng.normal(size=(m, r)) @ rng.normal(size=(r, n)) / np.sqrt(r)
  sparse = np.where(rng.random((m, n)) < d, 3 * rng.normal(size=(m, n)), 0)
  return (low + sparse + noise * rng.normal(size=(m, n))).astype(np.float32)


# Read at every step of a toy run: one compiled program, not its ops one by one.
_block_metrics = jax.jit(sj.block_metrics)


def _quadratic_toy(rank_target, density_target, steps, mode="adaptive",
                   sparse_mode="soft", seed=0, deriv_start=50):
  """Trains X towards a noisy low-rank + sparse target T with loss
  0.5 ||X - T||^2, from X = 0.01 and zero thresholds."""
  rng = np.random.default_rng(seed)
  targets = {"l1": {"kernel": _structured(32, 48, 8, 0.1, 0.05, rng)},
             "l2": {"kernel": _structured(48, 24, 6, 0.1, 0.05, rng)},
             "n": {"scale": np.ones(5, np.float32)}}
  params = jax.tree.map(lambda t: jnp.zeros_like(t) + 0.01, targets)

  def loss(p):
    return sum(0.5 * jnp.sum((a - b) ** 2) for a, b in
               zip(jax.tree.leaves(p), jax.tree.leaves(targets)))

  tx = sj.salaad(optax.adam(3e-2), every_k=1, rho=0.1, rank_target=rank_target,
                 density_target=density_target, k_alpha=1.0, k_beta=0.1, mode=mode,
                 sparse_mode=sparse_mode, deriv_start=deriv_start)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  history = []
  for _ in range(steps):
    params, state = step(params, state)
    m = jax.device_get(_block_metrics(state))
    history.append({k: (float(v["alpha"]), float(v["beta"])) for k, v in m.items()})
  return params, state, history


@pytest.mark.slow
def test_controller_reaches_rank_and_density_targets():
  _, state, history = _quadratic_toy(0.25, 0.1, 500)
  for path, m in sj.block_metrics(state).items():
    k = {"l1/kernel": 32, "l2/kernel": 24}[path]
    # Rank rate is quantised in steps of 1/min(m, n): within two steps of r*.
    assert abs(float(m["rank_rate"]) - 0.25) <= 2.0 / k + 1e-6, (path, m)
    assert abs(float(m["density"]) - 0.1) < 0.02, (path, m)
  assert history[0]["l1/kernel"] == (0.0, 0.0) or min(history[0]["l1/kernel"]) >= 0
  for h in history:
    for a, b in h.values():
      assert a >= 0 and b >= 0


@pytest.mark.slow
@pytest.mark.parametrize("deriv_start", [50, 10_000])
def test_controller_never_goes_negative_when_targets_exceed_reach(deriv_start):
  # Targets of 1.0 push both weights down (rate - target <= 0); the clamp must
  # hold them at zero.  Once the one-sided derivative term acts, a rise of the
  # rate (e.g. the density reaching exactly 1.0 when beta is 0) still adds
  # rho k_d (rate - rate_prev) <= rho k_d; without it the weights end at 0.
  _, state, history = _quadratic_toy(1.0, 1.0, 60, deriv_start=deriv_start)
  bound = 0.0 if deriv_start > 60 else 0.1 * 0.01  # rho * k_d (default k_d)
  for h in history:
    for a, b in h.values():
      assert a >= 0 and b >= 0
  for m in sj.block_metrics(state).values():
    assert 0.0 <= float(m["alpha"]) <= bound and 0.0 <= float(m["beta"]) <= bound
  if deriv_start > 60:
    for m in sj.block_metrics(state).values():
      assert float(m["alpha"]) == 0.0 and float(m["beta"]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("sparse_mode", ["topk", "rows", "2:4"])
def test_sparse_modes(sparse_mode):
  _, state, _ = _quadratic_toy(0.25, 0.25, 150, sparse_mode=sparse_mode)
  metrics = sj.block_metrics(state)
  rows_kept = []
  for path, s in sj.sparse_parts(state).items():
    s = np.asarray(s)
    d = float(np.mean(s != 0))
    assert d > 0.0, f"{path}: S is zero"
    np.testing.assert_allclose(float(metrics[path]["density"]), d, atol=1e-6)
    if sparse_mode == "topk":
      assert d <= 0.25 + 1e-6 and d > 0.2
    elif sparse_mode == "rows":
      rows_nz = np.any(s != 0, axis=1)
      # Whole rows are either kept or dropped.
      np.testing.assert_array_equal(np.all(s[rows_nz] != 0, axis=1), True)
      rows_kept.append(rows_nz.mean())
    else:
      groups = (s != 0).reshape(s.shape[0] // 4, 4, s.shape[1]).sum(axis=1)
      assert groups.max() == 2 and d <= 0.5
  if sparse_mode == "rows":
    assert min(rows_kept) < 1.0  # some block drops rows


@pytest.mark.slow
def test_hard_cut_mode_sets_density_exactly():
  _, state, _ = _quadratic_toy(0.25, 0.1, 30, mode="hard_cut")
  for path, m in sj.block_metrics(state).items():
    assert abs(float(m["density"]) - 0.1) < 0.01


def test_per_block_targets_from_callable_and_pytree():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(20, 20)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(20, 20)), jnp.float32)}}
  tx = sj.salaad(optax.sgd(0.0), rank_target=lambda p: 0.1 if p.startswith("a") else 0.5,
                 rho={"a": {"kernel": 1e-3}, "b": {"kernel": 2e-3}}, svt="exact",
                 alpha_init="sigma_k")
  state = tx.init(params)
  f = sj.low_rank_factors(state)
  assert int(jnp.sum(f["a/kernel"].s > 0)) == 2 and int(jnp.sum(f["b/kernel"].s > 0)) == 10
  sig_b = np.linalg.svd(np.asarray(params["b"]["kernel"]), compute_uv=False)
  np.testing.assert_allclose(float(state.alpha["b"]["kernel"]), 2e-3 * sig_b[9], rtol=1e-4)


def test_higher_rank_kernels_are_viewed_as_matrices():
  rng = np.random.default_rng(0)
  params = {"q": {"kernel": jnp.asarray(rng.normal(size=(16, 4, 4)), jnp.float32)},
            "o": {"kernel": jnp.asarray(rng.normal(size=(4, 4, 16)), jnp.float32)}}
  tx = sj.salaad(optax.sgd(0.1), every_k=1, rho=1e-2)
  state = tx.init(params)
  assert state.lr_u["q"]["kernel"].shape[0] == 16
  assert state.lr_v["q"]["kernel"].shape[0] == 16
  assert state.lr_u["o"]["kernel"].shape[0] == 16
  g = jax.tree.map(jnp.ones_like, params)
  u, state = tx.update(g, state, params)
  assert sj.sparse_parts(state)["q/kernel"].shape == (16, 4, 4)
  assert sj.surrogate_params(params, state)["o"]["kernel"].shape == (4, 4, 16)


def test_surrogate_and_residual_accessors():
  rng = np.random.default_rng(0)
  params = {"w": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)},
            "n": {"scale": jnp.ones(3)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   sj.salaad_decoupled(0.1, every_k=1, rho=0.1))
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  u, state = tx.update(g, state, params)
  params = optax.apply_updates(params, u)
  hat = sj.surrogate_params(params, state)
  np.testing.assert_array_equal(hat["n"]["scale"], params["n"]["scale"])
  f = sj.low_rank_factors(state)["w/kernel"]
  s = sj.sparse_parts(state)["w/kernel"]
  np.testing.assert_allclose(hat["w"]["kernel"], prox.dense(f) + s, atol=1e-6)
  x = params["w"]["kernel"]
  res = float(sj.primal_residual(params, state)["w/kernel"])
  np.testing.assert_allclose(res, np.linalg.norm(x - hat["w"]["kernel"]) / np.linalg.norm(x),
                             rtol=1e-5)
  assert sj.block_paths(state) == ["w/kernel"]
  summ = sj.summary(params, state)
  assert set(summ) == {"rank_rate", "density", "alpha", "beta", "primal_residual"}
  # A block whose params are 0 (a cut that drops it whole): all of L + S is
  # missing, a residual of 1 (not a division by 0); 0 when L + S is 0 too.
  zero = jax.tree.map(jnp.zeros_like, params)
  assert float(sj.primal_residual(zero, state)["w/kernel"]) == pytest.approx(1.0)
  assert np.isfinite(float(sj.summary(zero, state)["primal_residual"]))
  empty = jax.tree.map(jnp.zeros_like, state)
  assert float(sj.primal_residual(zero, empty)["w/kernel"]) == 0.0


# ---------------------------------------------------------------------------
# Errors a user can cause.
# ---------------------------------------------------------------------------


def _params():
  return {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}


def test_error_structure_selects_nothing():
  tx = sj.salaad(optax.sgd(0.1), structure=r"nothing_matches")
  with pytest.raises(ValueError, match="selected no parameter"):
    tx.init(_params())


def test_error_non_matrix_leaf_forced_into_block():
  tx = sj.salaad(optax.sgd(0.1), structure=r"bias")
  with pytest.raises(ValueError, match="dense/bias.*must be a matrix"):
    tx.init(_params())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(rho=-1.0), "rho must be > 0"),
    (dict(rho=0.0), "rho must be > 0"),
    (dict(rank_target=0.0), "rank_target must be > 0"),
    (dict(rank_target=1.5), "rank_target must be <= 1"),
    (dict(density_target=-0.1), "density_target must be > 0"),
    (dict(every_k=0), "every_k"),
    (dict(every_k=2.5), "every_k"),
    (dict(mode="pid"), "controller mode"),
    (dict(sparse_mode="3:2"), "sparse_mode"),
    (dict(svt="lanczos"), "svt must be"),
    (dict(k_alpha=-1.0), "k_alpha must be >= 0"),
])
def test_error_bad_hyperparameters(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    sj.salaad(optax.sgd(0.1), **kwargs)


def test_error_bad_per_block_values_name_the_block():
  tx = sj.salaad(optax.sgd(0.1), rho=lambda p: -1.0)
  with pytest.raises(ValueError, match="rho must be > 0.*dense/kernel"):
    tx.init(_params())


def test_error_update_without_params():
  tx = sj.salaad(optax.sgd(0.1))
  state = tx.init(_params())
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(_params(), state)


@pytest.mark.slow
def test_spread_rounds_runs_each_block_once_per_k_steps():
  rng = np.random.default_rng(0)
  params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(8, 6 + i % 2)), jnp.float32)}
            for i in range(6)}
  k = 3
  tx = sj.salaad(optax.sgd(0.01), every_k=k, rho=0.1, spread_rounds=True)
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda s, p: tx.update(g, s, p))
  last = {p: np.asarray(v) for p, v in sj.sparse_parts(state).items()}
  changes = {p: [] for p in last}
  for t in range(2 * k):
    u, state = step(state, params)
    params = optax.apply_updates(params, u)
    for p, v in sj.sparse_parts(state).items():
      v = np.asarray(v)
      changes[p].append(not np.array_equal(v, last[p]))
      last[p] = v
  phases = set()
  for p, ch in changes.items():
    # Every block runs exactly once in each window of K steps.
    assert sum(ch[:k]) == 1 and sum(ch[k:]) == 1, (p, ch)
    assert ch.index(True) + k == k + ch[k:].index(True)
    phases.add(ch.index(True))
  assert len(phases) > 1  # the work is spread over several steps
  assert int(state.num_rounds) == 2


def test_spread_rounds_matches_plain_rounds_when_x_is_fixed():
  rng = np.random.default_rng(1)
  params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)}
            for i in range(4)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  outs = []
  for spread in (False, True):
    tx = sj.salaad(optax.sgd(0.0), every_k=2, rho=0.5, spread_rounds=spread, svt="exact")
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(zeros, s, params)[1])
    for _ in range(12):  # every block gets 6 rounds (the last phase lands on step 12)
      state = step(state)
    outs.append(sj.surrogate_blocks(state))
  for p in outs[0]:
    np.testing.assert_allclose(outs[0][p], outs[1][p], atol=1e-5)
