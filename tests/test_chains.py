"""SALAAD inside optax's combinators, with blocks present (a small Flax model).

Each test compares against an oracle run without the combinator (or with the
combinator's effect applied by hand), so it fails when the composition
changes what SALAAD computes.  ``svt='exact'`` keeps the initial L
independent of the leaf order (the fast path's random sketch is seeded per
shape group).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax.train.state import TrainState
from salaad_jax.train.steps import train_step

MLP_KERNELS = r"mlp_\w+/kernel"
SALAAD_FIELDS = ("lr_u", "lr_s", "lr_v", "sparse", "dual", "alpha", "beta")


class Net(nn.Module):
  """An input projection, a two-layer MLP and a head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(12, name="in_proj")(x)
    h = nn.relu(nn.Dense(20, name="mlp_up")(h))
    h = nn.Dense(12, name="mlp_down")(h)
    return nn.Dense(1, name="head")(h)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
  y = jnp.sin(jnp.sum(x, axis=1, keepdims=True))
  model = Net()
  params = model.init(jax.random.key(0), x)["params"]

  @jax.jit
  def weighted_grad(p, w):
    return jax.grad(lambda p: jnp.sum(w * (model.apply({"params": p}, x) - y)[:, 0] ** 2))(p)

  def grad_fn(p, part=(0, 1)):
    """Gradient of the mean squared error over the rows start::stride."""
    w = np.zeros(len(x), np.float32)
    w[part[0]::part[1]] = 1.0
    return weighted_grad(p, jnp.asarray(w / w.sum()))

  return params, grad_fn


def salaad_adamw(rho=1e-2, **kwargs):
  # float32 S, U: the runs compared are equal up to float32 rounding, which
  # bfloat16 storage would round further apart.
  return sj.salaad(optax.adamw(1e-2), every_k=2, rho=rho, svt="exact",
                   state_dtype="float32", **kwargs)


def _train(tx, params, grad_fn, steps):
  update = jax.jit(tx.update)
  state = jax.jit(tx.init)(params)
  for _ in range(steps):
    u, state = update(grad_fn(params), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def _salaad_fields(state):
  s = sj.find_state(state)
  return {f: getattr(s, f) for f in SALAAD_FIELDS}


def _assert_same_salaad(state, ref_state):
  blocks = sj.block_paths(ref_state)
  assert sj.block_paths(state) == blocks
  for name, get in (("L", sj.low_rank_factors), ("S", sj.sparse_parts)):
    got, want = get(state), get(ref_state)
    for path in blocks:
      g = sj.prox.dense(got[path]) if name == "L" else got[path]
      w = sj.prox.dense(want[path]) if name == "L" else want[path]
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 rtol=1e-4, atol=1e-5, err_msg=f"{name} of {path}")
  chex.assert_trees_all_close(sj.block_metrics(state), sj.block_metrics(ref_state),
                              rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# masked / partition: SALAAD on the MLP kernels, plain AdamW on the rest.
# ---------------------------------------------------------------------------


def _is_mlp_kernel(path, _):
  return bool(jax.tree_util.keystr(path, simple=True, separator="/").startswith("mlp_")
              and path[-1].key == "kernel")


def _partitioned():
  labels = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, x: "salaad" if _is_mlp_kernel(path, x) else "adamw", p)
  return optax.partition({"salaad": salaad_adamw(), "adamw": optax.adamw(1e-2)}, labels)


def _masked():
  mask = lambda p: jax.tree_util.tree_map_with_path(_is_mlp_kernel, p)
  not_mask = lambda p: jax.tree.map(lambda m: not m, mask(p))
  return optax.chain(optax.masked(salaad_adamw(), mask),
                     optax.masked(optax.adamw(1e-2), not_mask))


@pytest.mark.slow
@pytest.mark.parametrize("combinator", [_partitioned, _masked], ids=["partition", "masked"])
def test_salaad_on_part_of_the_tree(problem, combinator):
  params, grad_fn = problem
  steps = 5  # rounds at steps 2 and 4
  got_params, state = _train(combinator(), params, grad_fn, steps)
  want_params, ref_state = _train(salaad_adamw(structure=MLP_KERNELS), params, grad_fn, steps)
  # The state holds blocks only where SALAAD runs (in_proj would be one by default).
  assert sj.block_paths(state) == ["mlp_down/kernel", "mlp_up/kernel"]
  assert int(sj.find_state(state).num_rounds) == 2
  _assert_same_salaad(state, ref_state)
  chex.assert_trees_all_close(got_params, want_params, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# MultiSteps and the harness's gradient accumulation.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_multisteps_runs_rounds_on_applied_updates(problem):
  params, grad_fn = problem
  k, groups = 3, 4
  micro = [(j, k) for j in range(k)]
  # Fixed thresholds: the controller's density count would amplify the float32
  # difference between MultiSteps' running mean and this one into a step of beta.
  make = lambda: salaad_adamw(mode="fixed", alpha_init=1e-3, beta_init=1e-4)
  ms = optax.MultiSteps(make(), every_k_schedule=k)
  ref = make()
  ms_state, ref_state = jax.jit(ms.init)(params), jax.jit(ref.init)(params)
  ms_update, ref_update = jax.jit(ms.update), jax.jit(ref.update)
  p_ms, p_ref = params, params
  for _ in range(groups):
    for rows in micro:
      u, ms_state = ms_update(grad_fn(p_ms, rows), ms_state, p_ms)
      p_ms = optax.apply_updates(p_ms, u)
    mean = jax.tree.map(jnp.zeros_like, p_ref)
    for n, rows in enumerate(micro):  # MultiSteps' running mean, op for op
      mean = jax.tree.map(lambda m, g, n=n: m + (g - m) / (n + 1), mean, grad_fn(p_ref, rows))
    u, ref_state = ref_update(mean, ref_state, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  inner = sj.find_state(ms_state)
  # every_k=2 counts applied updates: 4 of them, 2 rounds (not 12 micro-steps, 6 rounds)
  assert int(inner.count) == groups and int(inner.num_rounds) == groups // 2
  _assert_same_salaad(ms_state, ref_state)
  chex.assert_trees_all_close(p_ms, p_ref, rtol=1e-5, atol=1e-6)


def test_multisteps_inside_salaad_is_a_clear_error(problem):
  params, _ = problem
  tx = sj.salaad(optax.MultiSteps(optax.adamw(1e-2), every_k_schedule=3))
  with pytest.raises(ValueError, match=r"optax.MultiSteps\(salaad\(inner"):
    tx.init(params)
  chained = sj.salaad(optax.chain(optax.clip(1.0),
                                  optax.MultiSteps(optax.adamw(1e-2), every_k_schedule=3)))
  with pytest.raises(ValueError, match="inner contains optax.MultiSteps"):
    chained.init(params)


class TinyLM(nn.Module):
  """Embedding, one MLP block (the SALAAD block) and a head: the model
  interface of the training harness (token ids -> logits)."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(32, 8, name="embed")(tokens)
    h = nn.relu(nn.Dense(16, name="mlp_up")(h))
    return nn.Dense(32, name="head")(h)


@pytest.mark.slow
def test_harness_grad_accum_equals_multisteps():
  model = TinyLM()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  k, steps = 4, 2
  rng = np.random.default_rng(1)

  def batch():
    tokens = jnp.asarray(rng.integers(0, 32, size=(8, 9)), jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "mask": jnp.ones((8, 8), jnp.float32)}

  # alpha_0 = sigma_k: L has rank below the block's, so the residual S sees is
  # weight, not rounding noise (at full rank its near-zero entries, and so the
  # density and beta, flip with the summation order).
  tx = salaad_adamw(alpha_init="sigma_k")
  ms = optax.MultiSteps(salaad_adamw(alpha_init="sigma_k"), every_k_schedule=k)
  accum = jax.jit(lambda s, b: train_step(model, tx, s, b, grad_accum=k))
  micro = jax.jit(lambda s, b: train_step(model, ms, s, b))
  a = TrainState(jnp.zeros([], jnp.int32), params, jax.jit(tx.init)(params))
  m = TrainState(jnp.zeros([], jnp.int32), params, jax.jit(ms.init)(params))
  for _ in range(steps):
    b = batch()
    a, _ = accum(a, b)
    for j in range(k):  # the harness puts row i in micro-batch i mod k
      m, _ = micro(m, jax.tree.map(lambda x, j=j: x[j::k], b))
  assert sj.block_paths(a.opt_state) == ["mlp_up/kernel"]
  assert int(sj.find_state(a.opt_state).num_rounds) == steps // 2
  _assert_same_salaad(m.opt_state, a.opt_state)
  chex.assert_trees_all_close(m.params, a.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_step_passes_the_gradient_at_other_params(grad_accum):
  # A transformation that steps by the gradient at params / 2, via grad_fn:
  # it must be the gradient of the same batch's loss (accumulated the same
  # way) at those params.
  from salaad_jax.train.steps import loss_fn
  model = TinyLM()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  half = lambda p: jax.tree.map(lambda x: 0.5 * x, p)

  def update(updates, state, params=None, *, grad_fn):
    return grad_fn(half(params)), state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, size=(4, 9)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((4, 8))}
  state = TrainState(jnp.zeros([], jnp.int32), params, optax.EmptyState())
  new, _ = jax.jit(lambda s, b: train_step(model, tx, s, b, grad_accum=grad_accum))(state, batch)
  if grad_accum == 1:
    want = jax.grad(lambda p: loss_fn(model, p, batch)[0])(half(params))
  else:  # row i in micro-batch i mod 2, the mean of the two gradients
    g = [jax.grad(lambda p, j=j: loss_fn(model, p, jax.tree.map(lambda x: x[j::2], batch))[0])(
        half(params)) for j in range(2)]
    want = jax.tree.map(lambda a, b: (a + b) / 2, *g)
  chex.assert_trees_all_close(jax.tree.map(jnp.subtract, new.params, params), want,
                              rtol=1e-4, atol=1e-6)
  # a plain GradientTransformation gets no extra argument
  plain = optax.sgd(1.0)
  out, _ = train_step(model, plain, TrainState(jnp.zeros([], jnp.int32), params,
                                               plain.init(params)), batch)
  assert jax.tree.structure(out.params) == jax.tree.structure(params)


# ---------------------------------------------------------------------------
# apply_if_finite and inject_hyperparams.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_apply_if_finite_skips_a_nan_step_without_touching_the_state(problem):
  params, grad_fn = problem
  tx = optax.apply_if_finite(sj.salaad(optax.adam(1e-2), every_k=1, rho=1e-2),
                             max_consecutive_errors=3)
  update = jax.jit(tx.update)
  state = jax.jit(tx.init)(params)
  u, state = update(grad_fn(params), state, params)  # a finite step (with a round)
  params = optax.apply_updates(params, u)
  before = _salaad_fields(state)
  bad = grad_fn(params)
  bad["mlp_up"]["kernel"] = bad["mlp_up"]["kernel"].at[0, 0].set(jnp.nan)
  u, state = update(bad, state, params)  # every_k=1: a round would run here
  assert int(state.notfinite_count) == 1
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(_salaad_fields(state), before)
  assert int(sj.find_state(state).count) == 1
  u, state = update(grad_fn(params), state, params)  # the next finite step runs
  assert int(sj.find_state(state).count) == 2
  assert not np.allclose(_salaad_fields(state)["dual"]["mlp_up"]["kernel"],
                         before["dual"]["mlp_up"]["kernel"])


@pytest.mark.slow
def test_inject_hyperparams_over_rho(problem):
  params, grad_fn = problem
  make = optax.inject_hyperparams(sj.salaad, static_args=sj.STATIC_ARGS)
  # d* is injected too, so S's capacity is given (auto's 3 d* of the reference).
  tx = make(optax.adamw(1e-2), every_k=2, rho=1e-2, svt="exact", state_dtype="float32",
            sparse_capacity=0.15)
  p_inj, state = _train(tx, params, grad_fn, 2)  # a round at step 2
  p_ref, ref_state = _train(salaad_adamw(), params, grad_fn, 2)
  chex.assert_trees_all_close(p_inj, p_ref, rtol=1e-5, atol=1e-6)
  _assert_same_salaad(state, ref_state)
  # A new rho through the state acts as salaad(rho=new) from the same state.
  state.hyperparams["rho"] = jnp.asarray(0.2, jnp.float32)
  g = grad_fn(p_inj)
  u_inj, _ = jax.jit(tx.update)(g, state, p_inj)
  u_new, _ = jax.jit(salaad_adamw(rho=0.2).update)(g, state.inner_state, p_inj)
  u_old, _ = jax.jit(salaad_adamw().update)(g, state.inner_state, p_inj)
  chex.assert_trees_all_close(u_inj, u_new, rtol=1e-5, atol=1e-7)
  assert not np.allclose(u_new["mlp_up"]["kernel"], u_old["mlp_up"]["kernel"])


def test_inject_hyperparams_without_static_args_names_them(problem):
  params, _ = problem
  tx = optax.inject_hyperparams(sj.salaad)(optax.adamw(1e-2), rho=1e-2)
  with pytest.raises(ValueError, match=r"svt_iters is static.*static_args=salaad_jax.STATIC_ARGS"):
    jax.jit(tx.init)(params)
