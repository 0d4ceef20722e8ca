"""The comparison's controls: the consolidated structure without ADMM (the
truncated SVD of the first iterate and its largest residual entries) and
with a random support, against NumPy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax import consolidate as cons
from salaad_jax import prox
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import config as cfg_lib


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": {"kernel": jax.random.normal(k1, (24, 16))},
          "b": {"kernel": jax.random.normal(k2, (16, 40))}}


def _one_step(tx, params):
  loss = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  state = tx.init(params)
  u, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
  return optax.apply_updates(params, u), state


def _oracle(x, rank, density):
  u, sig, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  low = (u[:, :rank] * sig[:rank]) @ vt[:rank]
  return low, np.asarray(x, np.float64) - low, int(np.ceil(density * x.size - 1e-9))


@pytest.mark.slow
@pytest.mark.parametrize("support", ["largest", "random"])
def test_no_admm_structure_is_the_svd_of_the_first_iterate(support):
  """consolidate_from=0: the very first step chooses the structure from the
  first iterate, no ADMM round before it: L the rank ceil(r* min) truncated
  SVD of X_1, S on the d* m n largest |X_1 - L| (or, random, on as many
  entries drawn at random), S = X_1 - L there."""
  kw = dict(every_k=5, rho=1e-3, rank_target=0.25, density_target=0.1, svt="exact",
            consolidate_from=0, consolidate_support=support, seed=3)
  params = _params(1)
  zero = sj.salaad(optax.sgd(0.0), **kw)  # X_1 = X_0: the structure of the initial weights
  new, state = _one_step(zero, params)
  for name in ("a", "b"):
    x0 = np.asarray(params[name]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(new[name]["kernel"]),
                               _reconstruct(state, name), atol=1e-4)
    rank = int(np.ceil(0.25 * min(x0.shape)))
    low, rest, k = _oracle(x0, rank, 0.1)
    f = sj.low_rank_factors(state)[f"{name}/kernel"]
    assert int(np.sum(np.asarray(f.s) > 0)) == rank
    np.testing.assert_allclose(np.asarray(prox.dense(f)), low, atol=1e-4)
    s = np.asarray(sj.sparse_parts(state)[f"{name}/kernel"], np.float64)
    assert np.count_nonzero(s) == k
    kept = s != 0
    np.testing.assert_allclose(s[kept], rest[kept], atol=1e-4)
    top = np.abs(rest) >= np.sort(np.abs(rest).ravel())[::-1][k - 1]
    if support == "largest":
      np.testing.assert_array_equal(kept, top)
    else:  # not the largest entries: overlap near the chance level d*
      assert np.sum(kept & top) < 0.5 * k


def _reconstruct(state, name):
  f = sj.low_rank_factors(state)[f"{name}/kernel"]
  return np.asarray(prox.dense(f)) + np.asarray(sj.sparse_parts(state)[f"{name}/kernel"])


def test_random_support_differs_by_seed_and_block_and_keeps_the_count():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
  f0 = prox.svd_exact(x, 12)
  args = (x, f0, jnp.zeros_like(x), jnp.asarray(True), 0.25, 0.1, "target", 1, True)
  supports = [np.asarray(cons.project_block(*args, support_key=cons.support_key(seed, blk))[1])
              != 0 for seed, blk in ((0, 0), (0, 1), (1, 0), (0, 0))]
  assert all(s.sum() == 24 for s in supports)  # ceil(0.1 * 240)
  assert not np.array_equal(supports[0], supports[1])
  assert not np.array_equal(supports[0], supports[2])
  np.testing.assert_array_equal(supports[0], supports[3])


def test_support_option_errors_name_the_option():
  with pytest.raises(ValueError, match="consolidate_support"):
    sj.salaad(optax.sgd(0.1), consolidate_from=2, consolidate_support="smallest")
  with pytest.raises(ValueError, match="consolidate_support"):
    sj.salaad(optax.sgd(0.1), consolidate_from=2, consolidate_structure="current",
              consolidate_support="random")
  config = TrainConfig(method="salaad", model="tiny", consolidate_from=0.1,
                       consolidate_structure="current", consolidate_support="random")
  with pytest.raises(TrainError, match="--consolidate_support"):
    cfg_lib.validate(config)
