"""SALAAD against optax's expectations for contributed transformations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax._src import test_utils

import salaad_jax as sj


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), dtype),
                    "bias": jnp.zeros(6, dtype)},
          "proj": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), dtype)}}


def _loss(p):
  return sum(jnp.sum(jnp.asarray(x, jnp.float32) ** 2) for x in jax.tree.leaves(p))


FORMS = {
    "coupled": lambda: sj.salaad(optax.adamw(1e-2), every_k=2, rho=1e-2),
    "decoupled": lambda: optax.chain(optax.adamw(1e-2),
                                     sj.salaad_decoupled(1e-2, every_k=2, rho=1e-2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_accepts_extra_args_and_does_not_recompile(form):
  opt = FORMS[form]()

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params)
    updates, state = opt.update(grads, state, params, unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = opt.init(params)
  params, state = step(params, state)
  with test_utils.log_compilations() as compiles:
    params, state = step(params, state)
    params, state = step(params, state)
  assert not compiles, compiles


@pytest.mark.slow
def test_wrapped_in_inject_hyperparams():
  params = _params()
  grads = jax.grad(_loss)(params)
  # alpha_0 = rho sigma_k: the first round cuts L at the target rank, so S
  # holds residual entries, not X's rounding noise (L = X at alpha = 0).
  factory = lambda rho, rank_target: sj.salaad(optax.sgd(0.1), rho=rho,
                                               rank_target=rank_target, every_k=1,
                                               alpha_init="sigma_k")
  opt = factory(1e-2, 0.3)
  opt_inj = optax.inject_hyperparams(factory)(rho=1e-2, rank_target=0.3)
  state = jax.jit(opt.init)(params)
  state_inj = jax.jit(opt_inj.init)(params)
  u, state = jax.jit(opt.update)(grads, state, params)
  u_inj, state_inj = jax.jit(opt_inj.update)(grads, state_inj, params)
  chex.assert_trees_all_close(u, u_inj, rtol=1e-5)
  dense_s = lambda st: [np.asarray(x) for x in sj.sparse_parts(st).values()]
  assert max(np.abs(x).max() for x in dense_s(state)) > 1e-2
  chex.assert_trees_all_close(dense_s(state_inj), dense_s(state), rtol=1e-5, atol=1e-6)
  # The hyperparameter can be changed through the state.
  state_inj.hyperparams["rho"] = jnp.asarray(0.5)
  u2, _ = jax.jit(opt_inj.update)(grads, state_inj, params)
  assert not np.allclose(u2["dense"]["kernel"], u_inj["dense"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_preserves_dtype_and_works_under_multisteps(form, dtype):
  params = _params(dtype)
  grads = jax.grad(lambda p: _loss(p).astype(dtype))(params)
  opt = FORMS[form]()
  state = jax.jit(opt.init)(params)
  updates, _ = jax.jit(opt.update)(grads, state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  ms = optax.MultiSteps(FORMS[form](), every_k_schedule=4)
  state = jax.jit(ms.init)(params)
  updates, state = jax.jit(ms.update)(grads, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
  for _ in range(3):
    updates, state = jax.jit(ms.update)(grads, state, params)
  assert any(np.any(np.asarray(u, np.float32) != 0) for u in jax.tree.leaves(updates))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_shapes_and_dtypes_stable_under_lax_cond(dtype):
  opt = sj.salaad(optax.adam(1e-2), every_k=1, rho=1e-2, state_dtype=None)
  params = _params(dtype)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: _loss(p).astype(dtype))(params)
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, new_state = jax.lax.cond(
        cond, lambda: opt.update(grads, state, params),
        lambda: (jax.tree.map(jnp.zeros_like, params), state))
    return optax.apply_updates(params, updates), new_state

  state = opt.init(params)
  for _ in range(3):
    params, new_state = step(params, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    state = new_state
  assert state.sparse["dense"]["kernel"].values.dtype == dtype  # S's values, compact


@pytest.mark.slow
def test_tree_map_params_on_state():
  params = _params()
  opt = sj.salaad(optax.adam(1e-2))
  state = opt.init(params)
  mapped = optax.tree.map_params(opt, lambda p: jnp.zeros_like(p) + 7, state,
                                 transform_non_params=lambda x: x)
  # The inner Adam moments mirror the params and are mapped; counters are not.
  adam_state = mapped.inner_state[0]
  assert float(adam_state.mu["dense"]["kernel"][0, 0]) == 7
  assert int(mapped.count) == 0
  # The SALAAD per-block fields mirror the params' tree and are mapped too;
  # a compact S is a (values, index) pair under its block's path, both mapped.
  assert float(mapped.dual["dense"]["kernel"][0, 0]) == 7
  assert np.all(np.asarray(mapped.sparse["dense"]["kernel"].values) == 7)
  specs = optax.tree.map_params(opt, lambda p: "P", state, transform_non_params=lambda _: None)
  assert specs.sparse["proj"]["kernel"] == sj.CompactSparse("P", "P")
  dense_s = sj.salaad(optax.adam(1e-2), sparse_capacity=None)
  specs = optax.tree.map_params(dense_s, lambda p: "P", dense_s.init(params),
                                transform_non_params=lambda _: None)
  assert specs.sparse["proj"]["kernel"] == "P"


@pytest.mark.slow
def test_composes_in_a_chain_with_a_flax_model():
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(1)(x)

  model = MLP()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
  y = jnp.sum(x, axis=1, keepdims=True)
  params = model.init(jax.random.key(0), x)["params"]
  tx = sj.salaad(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
                 every_k=5, rho=1e-4, structure=r"Dense_\d/kernel")
  state = tx.init(params)
  assert sj.block_paths(state) == ["Dense_0/kernel", "Dense_1/kernel"]

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(50):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
