"""Same SALAAD step under jit, pmap over 8 CPU devices and a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import salaad_jax as sj

N_DEV = 8
pytestmark = pytest.mark.skipif(jax.device_count() < N_DEV,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _setup():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(24, 16)), jnp.float32),
                  "bias": jnp.zeros(16)}}
  xs = jnp.asarray(rng.normal(size=(N_DEV * 4, 16)), jnp.float32)
  tx = sj.salaad(optax.adam(1e-2), every_k=2, rho=1e-2, svt="fast")
  return params, xs, tx


def _loss(p, x):
  h = jnp.tanh(x @ p["a"]["kernel"])
  out = h @ p["b"]["kernel"] + p["b"]["bias"]
  return jnp.mean((out - x) ** 2)


def _run_jit(params, xs, tx, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(_loss)(p, xs)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.fixture(scope="module")
def jit_reference():
  """(params, state) after 4 steps of ``_setup()``'s problem under jit."""
  return _run_jit(*_setup(), 4)


@pytest.mark.slow
def test_pmap_matches_jit(jit_reference):
  params, xs, tx = _setup()
  ref_p, ref_s = jit_reference
  state = tx.init(params)
  rep = jax.tree.map(lambda x: jnp.stack([x] * N_DEV), (params, state))
  shards = xs.reshape(N_DEV, -1, xs.shape[-1])

  def step(p, s, x):
    g = jax.grad(_loss)(p, x)
    g = jax.lax.pmean(g, "d")
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name="d")
  p, s = rep
  for _ in range(4):
    p, s = pstep(p, s, shards)
  p0 = jax.tree.map(lambda x: x[0], p)
  s0 = jax.tree.map(lambda x: x[0], s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p0, ref_p)
  np.testing.assert_allclose(sj.sparse_parts(s0)["a/kernel"], sj.sparse_parts(ref_s)["a/kernel"],
                             rtol=1e-4, atol=1e-5)
  assert int(s0.num_rounds) == 2


@pytest.mark.slow
def test_sharded_mesh_matches_jit(jit_reference):
  params, xs, tx = _setup()
  ref_p, ref_s = jit_reference
  mesh = Mesh(np.array(jax.devices()[:N_DEV]).reshape(4, 2), ("data", "model"))
  # FSDP-style: shard kernels along their first axis over 'data'.
  def spec(x):
    return P("data") if x.ndim >= 1 and x.shape[0] % 4 == 0 else P()
  p_sh = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
  state = tx.init(params)
  s_sh = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), state)
  x_sh = jax.device_put(xs, NamedSharding(mesh, P("data")))

  @jax.jit
  def step(p, s, x):
    g = jax.grad(_loss)(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = p_sh, s_sh
  for _ in range(4):
    p, s = step(p, s, x_sh)
  # The kernels and their SALAAD state stay split over the devices (not
  # gathered onto every one).
  for leaf in (p["a"]["kernel"], s.dual["a"]["kernel"]):
    assert not leaf.sharding.is_fully_replicated, leaf.sharding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p, ref_p)
  np.testing.assert_allclose(s.dual["b"]["kernel"], ref_s.dual["b"]["kernel"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_joint_cut_loss_under_pmap_matches_one_device():
  # The harness's step with the joint cut loss: its second pass (grad_fn,
  # called inside the transform's consolidation branch) is pmean-ed too, so 8
  # replicas on an eighth of the batch each compute the one-device step.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from salaad_jax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  from salaad_jax.train.steps import train_step  # pylint: disable=g-import-not-at-top

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      h = nn.Embed(32, 16)(tokens)
      return nn.Dense(32, name="out")(jnp.tanh(nn.Dense(24, name="hid")(h)))

  model = Tiny()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tx = sj.salaad(optax.adam(1e-2), every_k=2, rho=1e-2, rank_target=0.5, density_target=0.1,
                 consolidate_from=2, consolidate_params="factors", svt="exact",
                 consolidate_cut_budgets=(0.5, 1.0), consolidate_cut_joint=0.6)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, size=(N_DEV * 2, 9)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((N_DEV * 2, 8), jnp.float32)}
  one = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))
  rep = jax.tree.map(lambda x: jnp.stack([x] * N_DEV), one)
  shards = jax.tree.map(lambda x: x.reshape((N_DEV, -1) + x.shape[1:]), batch)
  step = jax.jit(lambda s, b: train_step(model, tx, s, b))
  pstep = jax.pmap(lambda s, b: train_step(model, tx, s, b, axis_name="d"), axis_name="d")
  for _ in range(5):
    one, m1 = step(one, batch)
    rep, mp = pstep(rep, shards)
    np.testing.assert_allclose(mp["loss"][0], m1["loss"], rtol=1e-5)
  assert int(sj.find_state(one.opt_state).count) == 5  # three steps in consolidation
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5),
               rep.params, one.params)
