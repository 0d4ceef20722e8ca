"""S stored compactly (values + flat indices at a bounded capacity) against
the dense layout (``sparse_capacity=None``) and a NumPy oracle."""

import json
import math

import chex
from hypothesis import given, settings, strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax import compact, prox
from salaad_jax.train.config import (TrainConfig, TrainError, read_config,
                                     sparse_capacity_value, validate)

SHAPE = (24, 16)


def _problem():
  rng = np.random.default_rng(0)
  target = {k: rng.normal(size=SHAPE).astype(np.float32) for k in ("a", "b")}
  params = {k: {"kernel": jnp.asarray(rng.normal(size=SHAPE), jnp.float32),
                "bias": jnp.zeros(SHAPE[1], jnp.float32)} for k in ("a", "b")}

  def loss(p):
    return sum(jnp.sum((p[k]["kernel"] - target[k]) ** 2) + jnp.sum(p[k].get("bias", 0.0) ** 2)
               for k in p)
  return params, jax.grad(loss)


def _train(tx, steps):
  params, grad_fn = _problem()
  state = tx.init(params)
  update = jax.jit(tx.update)
  trace = []
  for _ in range(steps):
    u, state = update(grad_fn(params), state, params)
    params = optax.apply_updates(params, u)
    trace.append((params, sj.find_state(state)))
  return trace


def _same_trajectory(trace_a, trace_b):
  """Equal up to float32 rounding: the two layouts compute the same values,
  but XLA fuses (and so rounds) X - L + U around a materialised S differently.
  L is compared as U diag(s) V^T (the factors' signs are not unique)."""
  close = lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
  l_dense = lambda s: {p: prox.dense(f) for p, f in sj.low_rank_factors(s).items()}
  for (pa, sa), (pb, sb) in zip(trace_a, trace_b):
    close(pa, pb)
    close(l_dense(sa), l_dense(sb))
    for f in ("lr_s", "dual", "alpha", "beta", "rank_rate", "density"):
      close(getattr(sa, f), getattr(sb, f))
    close(sj.sparse_parts(sa), sj.sparse_parts(sb))


SETTINGS = {
    # topk keeps exactly d* of the entries, so 'auto' (3 d*) never binds: rounds
    # at steps 2 and 4, then the consolidation projection on the d* support.
    "topk_auto": (dict(sparse_mode="topk", density_target=0.1, consolidate_from=4), "auto"),
    # soft l1 with a beta that keeps S sparse; the capacity is checked below.
    "soft_0.5": (dict(beta_init=0.01, k_beta=0.0), 0.5),
    "topk_rounds": (dict(sparse_mode="topk", density_target=0.1), "auto"),
}


@pytest.mark.parametrize("name,coupled", [("topk_auto", True), ("soft_0.5", True),
                                          ("topk_rounds", False)])
@pytest.mark.slow
def test_compact_equals_dense_when_capacity_never_binds(name, coupled):
  kw, cap = SETTINGS[name]
  make = ((lambda c: sj.salaad(optax.adam(1e-2), every_k=2, rho=0.05, sparse_capacity=c, **kw))
          if coupled else
          (lambda c: optax.chain(optax.adam(1e-2), sj.salaad_decoupled(
              1e-2, every_k=2, rho=0.05, sparse_capacity=c, **kw))))
  dense = _train(make(None), 6)
  comp = _train(make(cap), 6)
  cap_frac = 0.3 if cap == "auto" else cap
  dens = [float(v["density"]) for _, s in comp for v in sj.block_metrics(s).values()]
  assert 0 < max(dens) <= cap_frac  # S is nonzero and the capacity never binds
  assert isinstance(comp[-1][1].sparse["a"]["kernel"], compact.CompactSparse)
  _same_trajectory(dense, comp)


def test_binding_capacity_keeps_the_largest_entries():
  """beta_0 = 0: the first S-step is S = X - L + U, fully dense; the compact
  state keeps exactly its ceil(kappa m n) largest |entries|."""
  kappa = 0.1
  make = lambda c: sj.salaad(optax.sgd(1e-2), every_k=1, rho=0.05, sparse_capacity=c)
  (_, dense), = _train(make(None), 1)
  (_, comp), = _train(make(kappa), 1)
  # the same L-step (S_0 = 0), up to the rounding of two compiled programs
  chex.assert_trees_all_close(comp.lr_s, dense.lr_s, rtol=1e-5, atol=1e-6)
  cap = math.ceil(kappa * SHAPE[0] * SHAPE[1])
  for path, s_full in sj.sparse_parts(dense).items():
    s_full = np.asarray(s_full)
    assert np.count_nonzero(s_full) > cap
    order = np.argsort(-np.abs(s_full).reshape(-1), kind="stable")
    expect = np.zeros(s_full.size, np.float32)
    expect[order[:cap]] = s_full.reshape(-1)[order[:cap]]
    got = np.asarray(sj.sparse_parts(comp)[path])
    np.testing.assert_array_equal(got != 0, expect.reshape(s_full.shape) != 0)
    np.testing.assert_allclose(got, expect.reshape(s_full.shape), rtol=1e-5, atol=1e-5)
    # The density stat is the prox result's: above kappa marks the overflow.
    assert float(sj.block_metrics(comp)[path]["density"]) > kappa
    # The dual step used the projected S: U = X - L - S, so U_c - U_d = S_d - S_c.
    key = path.split("/")[0]
    du = np.asarray(comp.dual[key]["kernel"]) - np.asarray(dense.dual[key]["kernel"])
    np.testing.assert_allclose(du, s_full - got, atol=1e-5)


def test_state_bytes_shrink_as_computed():
  params, _ = _problem()
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  for dtype, item in (("float32", 4), ("bfloat16", 2)):
    shapes = {}
    for cap in (None, "auto", 0.3):
      tx = sj.salaad(optax.sgd(1e-2), density_target=0.05, state_dtype=dtype, sparse_capacity=cap)
      shapes[cap] = sj.find_state(jax.eval_shape(tx.init, params)).sparse
    size = SHAPE[0] * SHAPE[1]  # both blocks; the biases hold (0,) float32 placeholders
    assert nbytes(shapes[None]) == 2 * size * item
    assert nbytes(shapes["auto"]) == 2 * math.ceil(0.15 * size) * (item + 4)
    assert nbytes(shapes[0.3]) == 2 * math.ceil(0.3 * size) * (item + 4)
    assert shapes["auto"]["a"]["kernel"].index.dtype == jnp.int32
    assert shapes["auto"]["a"]["bias"].shape == (0,)


def test_auto_capacity_of_n_m_sparsity_is_at_least_n_over_m():
  params, _ = _problem()
  tx = sj.salaad(optax.sgd(1e-2), sparse_mode="2:4", density_target=0.05)
  s = sj.find_state(jax.eval_shape(tx.init, params)).sparse
  assert s["a"]["kernel"].values.shape == (SHAPE[0] * SHAPE[1] // 2,)


def test_auto_capacity_needs_a_concrete_density_target():
  params, _ = _problem()
  make = optax.inject_hyperparams(sj.salaad, static_args=sj.STATIC_ARGS)
  tx = make(optax.sgd(1e-2), density_target=0.05)
  with pytest.raises(ValueError, match=r"sparse_capacity='auto'.*'a/kernel'.*sparse_capacity=None"):
    jax.jit(tx.init)(params)
  tx = make(optax.sgd(1e-2), density_target=0.05, sparse_capacity=0.2)
  state = jax.eval_shape(tx.init, params)
  assert state.inner_state.sparse["a"]["kernel"].values.shape == (math.ceil(0.2 * 384),)
  # An eager init sees a concrete d*; the jitted update reads the capacity off the state.
  tx = make(optax.sgd(1e-2), density_target=0.05)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  assert state.inner_state.sparse["a"]["kernel"].values.shape == (math.ceil(0.15 * 384),)


@pytest.mark.parametrize("bad", [0.0, 1.5, "big", float("nan")])
def test_bad_capacity_is_one_clear_error(bad):
  with pytest.raises(ValueError, match="sparse_capacity"):
    sj.salaad(optax.sgd(1e-2), sparse_capacity=bad)


def test_runs_saved_before_compact_s_read_back_with_dense_s(tmp_path):
  saved = json.loads(TrainConfig(sparse_capacity="0.5").to_json())
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert read_config(str(tmp_path)).sparse_capacity == "0.5"
  del saved["sparse_capacity"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert read_config(str(tmp_path)).sparse_capacity == "none"


def test_train_config_flag():
  assert sparse_capacity_value(TrainConfig()) == "auto"
  assert sparse_capacity_value(TrainConfig(sparse_capacity="none")) is None
  assert sparse_capacity_value(TrainConfig(sparse_capacity="0.25")) == 0.25
  for bad in ("0", "1.5", "dense"):
    with pytest.raises(TrainError, match="--sparse_capacity"):
      validate(TrainConfig(sparse_capacity=bad))


@settings(max_examples=30, deadline=None)
@given(hst.sampled_from([6, 40]), hst.sampled_from([1, 4, 6, 40]), hst.floats(0.0, 1.0),
       hst.integers(0, 2**31 - 1), hst.booleans())
def test_compactify_densify_round_trip(size, cap, fill, seed, ties):
  cap = min(cap, size)  # few distinct shapes: each compiles once
  rng = np.random.default_rng(seed)
  vals = rng.integers(-3, 4, size) if ties else rng.normal(size=size)
  s = np.where(rng.random(size) < fill, vals, 0.0).astype(np.float32)
  c = compact.compactify(jnp.asarray(s), cap)
  index = np.asarray(c.index)
  assert c.values.shape == c.index.shape == (cap,)
  assert len(set(index.tolist())) == cap and index.min() >= 0 and index.max() < size
  back = np.asarray(compact.densify(c, (size,)))
  order = np.argsort(-np.abs(s), kind="stable")  # the oracle: cap largest, ties by index
  expect = np.zeros_like(s)
  expect[order[:cap]] = s[order[:cap]]
  np.testing.assert_array_equal(back, expect)
  if np.count_nonzero(s) <= cap:
    np.testing.assert_array_equal(back, s)
  # Padding slots (value 0) add nothing, even when they repeat an index.
  padded = compact.CompactSparse(jnp.concatenate([c.values, jnp.zeros(3)]),
                                 jnp.concatenate([c.index, jnp.zeros(3, jnp.int32)]))
  np.testing.assert_array_equal(np.asarray(compact.densify(padded, (size,))), expect)
