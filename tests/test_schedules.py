"""schedules: the gradual-pruning looseness and the tanh rho ramp, and what
schedules do inside the transform (loose targets, the scaled dual rescaled
when rho changes, the penalty gradient scaled) with the shape-dependent rho."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from helpers import block_leaf, run_steps, sparse_leaf, two_blocks
from salaad_jax import prox, schedules


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
  params = two_blocks()
  kw = dict(every_k=1, rho=0.5, rank_target=0.1, density_target=0.05, k_alpha=1.0,
            k_beta=1.0, svt="exact")
  tight = run_steps(sj.salaad(optax.sgd(0.01), **kw), params, 4)[-1][1]
  loose = run_steps(sj.salaad(optax.sgd(0.01), target_schedule=lambda n: 1.0, **kw), params,
               4)[-1][1]
  assert float(block_leaf(tight.beta, "a")) > 0 and float(block_leaf(tight.alpha, "b")) > 0
  for name in ("a", "b"):
    assert float(block_leaf(loose.alpha, name)) == 0.0
    assert float(block_leaf(loose.beta, name)) == 0.0


def test_rho_change_rescales_the_scaled_dual():
  """When m(n) doubles between rounds 1 and 2, U_2 = U_1 m(1)/m(2) + X_2 - L_2 - S_2,
  i.e. Y = rho U continues; without the change the plain dual step holds."""
  params = two_blocks()
  jump = lambda n: jnp.where(n >= 2, 2.0, 1.0)
  kw = dict(every_k=1, rho=0.3, rank_target=0.2, density_target=0.1, svt="exact",
            alpha_init="sigma_k", beta_init=0.3)
  for sched, ratio in ((jump, 0.5), (None, 1.0)):
    hist = run_steps(sj.salaad(optax.sgd(0.05), rho_schedule=sched, **kw), params, 2)
    (_, s1), (p2, s2) = hist
    for name in ("a", "b"):
      l2 = np.asarray(prox.dense(sj.low_rank_factors(s2)[f"{name}/kernel"]))
      resid = block_leaf(p2, name) - l2 - sparse_leaf(s2, name)
      np.testing.assert_allclose(block_leaf(s2.dual, name),
                                 ratio * block_leaf(s1.dual, name) + resid, atol=1e-5)
    assert np.abs(block_leaf(s1.dual, "a")).max() > 1e-3  # the check is not vacuous


def test_rho_schedule_scales_the_penalty_gradient():
  params = two_blocks()
  zero = lambda: jax.tree.map(jnp.zeros_like, params)
  kw = dict(every_k=5, rho=0.2, rank_target=0.2, svt="exact")
  for sched, factor in ((None, 1.0), (lambda n: 3.0, 3.0)):
    tx = sj.salaad(optax.sgd(1.0), rho_schedule=sched, **kw)
    state = tx.init(params)
    u, _ = tx.update(zero(), state, params)
    l0 = np.asarray(prox.dense(sj.low_rank_factors(state)["a/kernel"]))
    np.testing.assert_allclose(block_leaf(u, "a"), -0.2 * factor * (block_leaf(params, "a") - l0),
                               rtol=1e-5, atol=1e-6)


def test_shape_dependent_rho_is_one_over_blocks_times_sqrt_mn():
  params = two_blocks()
  tx = sj.salaad(optax.sgd(1.0), every_k=5, rho="shape_dependent", rank_target=0.2,
                 svt="exact")
  state = tx.init(params)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  for name, (m, n) in (("a", (24, 16)), ("b", (16, 40))):
    l0 = np.asarray(prox.dense(sj.low_rank_factors(state)[f"{name}/kernel"]))
    rho = 1.0 / (2 * np.sqrt(m * n))
    np.testing.assert_allclose(block_leaf(u, name), -rho * (block_leaf(params, name) - l0),
                               rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="shape_dependent"):
    sj.salaad(optax.sgd(1.0), rho="big")
