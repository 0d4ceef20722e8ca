"""Tests for salaad_jax.models: the LLaMA decoder, its configs and helpers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from salaad_jax.models import (CONFIGS, Llama, LlamaConfig, count_params,
                               cross_entropy_loss, generate, generate_uncached,
                               get_config, init_cache, init_params)
from salaad_jax.models import llama
from salaad_jax.models.llama import RMSNorm, apply_rotary

F32_TINY = get_config("tiny", dtype=jnp.float32)


@pytest.fixture(scope="module")
def f32_model():
  params = init_params(F32_TINY, jax.random.key(0))
  model = Llama(F32_TINY)
  return model, params, jax.jit(model.apply)


def _tokens(seed, batch, seq, vocab):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab,
                            dtype=jnp.int32)


# ----------------------------------------------------------------- configs


def _closed_form_count(cfg: LlamaConfig) -> int:
  d, f, v, n_layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
  embeddings = v * d * (1 if cfg.tie_embeddings else 2)
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return embeddings + n_layers * per_layer + d


@pytest.mark.parametrize("name", ["60m", "130m"])
@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_closed_form(name, tied):
  cfg = get_config(name, tie_embeddings=tied)
  abstract = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(abstract))
  assert count_params(abstract) == _closed_form_count(cfg)


def test_preset_sizes():
  n_130m = _closed_form_count(CONFIGS["130m"])
  assert 120e6 <= n_130m <= 140e6  # 134.1M with untied embeddings.
  assert 55e6 <= _closed_form_count(CONFIGS["60m"]) <= 60e6  # 58.1M.
  expected = {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12),
              "350m": (1024, 2736, 16, 24), "1b": (2048, 5461, 32, 24)}
  for name, (d, f, h, n_layers) in expected.items():
    cfg = CONFIGS[name]
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_layers) == (d, f, h,
                                                                  n_layers)
    assert cfg.vocab_size == 32000 and cfg.max_len == 256
  assert CONFIGS["tiny"].vocab_size == CONFIGS["small"].vocab_size == 256


def test_get_config_overrides_and_errors():
  cfg = get_config("TINY", n_layers=3, dtype="float32")
  assert cfg.n_layers == 3 and cfg.dtype == jnp.float32
  assert CONFIGS["tiny"].n_layers == 2  # Presets are not mutated.
  with pytest.raises(ValueError, match=r"'nope'.*'tiny'.*'1b'"):
    get_config("nope")
  with pytest.raises(ValueError, match="d_modle"):
    get_config("tiny", d_modle=32)


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=65), "d_model"),
    (dict(n_heads=0), "n_heads"),
    (dict(n_layers=-1), "n_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_ff=2.5), "d_ff"),
    (dict(max_len=0), "max_len"),
    (dict(d_model=60, n_heads=4), "head_dim"),  # head_dim 15 is odd.
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(param_dtype="not-a-dtype"), "param_dtype"),
])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    get_config("tiny", **overrides)


# ------------------------------------------------------------- components


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3
  scale = np.linspace(0.5, 2.0, 16).astype(np.float32)
  eps = 1e-6
  out = RMSNorm(eps=eps).apply({"params": {"scale": scale}}, jnp.asarray(x))
  ref = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
  # bf16 input: math in float32, output in the input dtype.
  out16 = RMSNorm(eps=eps).apply({"params": {"scale": scale}},
                                 jnp.asarray(x, jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), ref, rtol=2e-2,
                             atol=2e-2)


def _numpy_rope(x, positions, theta):
  """Reference: rotate channel pairs (i, i + d/2) by p * theta^(-2i/d)."""
  d = x.shape[-1]
  half = d // 2
  out = np.empty_like(x, dtype=np.float64)
  for b in range(x.shape[0]):
    for s in range(x.shape[1]):
      for i in range(half):
        phi = positions[b, s] * theta**(-2.0 * i / d)
        c, sn = np.cos(phi), np.sin(phi)
        x1, x2 = x[b, s, :, i], x[b, s, :, i + half]
        out[b, s, :, i] = x1 * c - x2 * sn
        out[b, s, :, i + half] = x2 * c + x1 * sn
  return out


def test_rotary_matches_numpy_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 50, size=(2, 6))
  out = apply_rotary(jnp.asarray(x), jnp.asarray(positions), 10000.0)
  np.testing.assert_allclose(np.asarray(out),
                             _numpy_rope(x, positions, 10000.0), rtol=1e-5,
                             atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(p, s):
    rq = apply_rotary(q, jnp.array([[p]]), 10000.0)
    rk = apply_rotary(k, jnp.array([[s]]), 10000.0)
    return float(jnp.sum(rq * rk))

  for p, s in [(5, 2), (9, 9), (3, 7)]:
    for shift in (1, 13, 40):
      assert score(p, s) == pytest.approx(score(p + shift, s + shift),
                                          rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------ model


def test_parameter_paths_are_2d_kernels(f32_model):
  _, params, _ = f32_model
  flat = traverse_util.flatten_dict(params, sep="/")
  cfg = F32_TINY
  d, f = cfg.d_model, cfg.d_ff
  expected = {"embed/embedding": (cfg.vocab_size, d),
              "final_norm/scale": (d,), "lm_head/kernel": (d, cfg.vocab_size)}
  for i in range(cfg.n_layers):
    pre = f"layers_{i}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      expected[f"{pre}/attn/{name}/kernel"] = (d, d)
    expected[f"{pre}/mlp/gate_proj/kernel"] = (d, f)
    expected[f"{pre}/mlp/up_proj/kernel"] = (d, f)
    expected[f"{pre}/mlp/down_proj/kernel"] = (f, d)
    expected[f"{pre}/attn_norm/scale"] = (d,)
    expected[f"{pre}/mlp_norm/scale"] = (d,)
  assert {k: v.shape for k, v in flat.items()} == expected
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_causality(f32_model):
  _, params, apply = f32_model
  tokens = _tokens(3, 2, 12, F32_TINY.vocab_size)
  base = apply({"params": params}, tokens)
  for t in (0, 5, 11):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % F32_TINY.vocab_size)
    out = apply({"params": params}, changed)
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, t:], base[:, t:])


def test_positions_shift_invariance(f32_model):
  _, params, apply = f32_model
  tokens = _tokens(4, 2, 10, F32_TINY.vocab_size)
  base = apply({"params": params}, tokens)
  explicit = apply({"params": params}, tokens,
                   positions=jnp.arange(10)[None].repeat(2, 0))
  np.testing.assert_allclose(explicit, base, rtol=1e-6, atol=1e-6)
  for shift in (3, 57):
    shifted = apply({"params": params}, tokens,
                    positions=jnp.arange(10) + shift)
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)


def test_short_sequences_and_max_len(f32_model):
  model, params, apply = f32_model
  assert apply({"params": params}, jnp.zeros((1, 1), jnp.int32)).shape == (
      1, 1, F32_TINY.vocab_size)
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params},
                jnp.zeros((1, F32_TINY.max_len + 1), jnp.int32))


def test_tied_embeddings():
  cfg = get_config("tiny", dtype=jnp.float32, tie_embeddings=True)
  params = init_params(cfg, jax.random.key(5))
  assert "lm_head" not in params
  tokens = _tokens(6, 2, 8, cfg.vocab_size)
  logits, state = jax.jit(lambda p, t: Llama(cfg).apply(
      {"params": p}, t,
      capture_intermediates=lambda mdl, _: mdl.name == "final_norm"))(
          params, tokens)
  (hidden,) = state["intermediates"]["final_norm"]["__call__"]
  expected = np.asarray(hidden) @ np.asarray(params["embed"]["embedding"]).T
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5,
                             atol=1e-5)


def test_bf16_compute():
  cfg = get_config("tiny")
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  params = init_params(cfg, jax.random.key(7))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, state = jax.jit(lambda p, t: Llama(cfg).apply(
      {"params": p}, t,
      capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dense)))(
          params, _tokens(8, 2, 16, cfg.vocab_size))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, 256)
  assert bool(jnp.all(jnp.isfinite(logits)))
  q = state["intermediates"]["layers_0"]["attn"]["q_proj"]["__call__"][0]
  assert q.dtype == jnp.bfloat16


def test_dense_cls_is_injectable():
  calls = []

  class RecordingDense(nn.Dense):

    @nn.compact
    def __call__(self, x):
      calls.append(self.name)
      return super().__call__(x)

  def shapes(**kwargs):
    return jax.eval_shape(
        lambda r: init_params(F32_TINY, r, **kwargs), jax.random.key(0))

  assert shapes(dense_cls=RecordingDense) == shapes()
  assert sorted(set(calls)) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
       "down_proj"])


# ---------------------------------------------------------------- helpers


def test_cross_entropy_loss_matches_numpy():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  mask = rng.integers(0, 2, size=(2, 5)).astype(bool)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  loss, count = cross_entropy_loss(jnp.asarray(logits), targets)
  assert loss.dtype == jnp.float32 and float(count) == 10
  assert float(loss) == pytest.approx(nll.mean(), rel=1e-5)
  loss, count = cross_entropy_loss(jnp.asarray(logits), targets, mask)
  assert float(count) == mask.sum()
  assert float(loss) == pytest.approx(nll[mask].mean(), rel=1e-5)
  loss, count = cross_entropy_loss(jnp.asarray(logits), targets,
                                   np.zeros((2, 5)))
  assert float(loss) == 0.0 and float(count) == 0.0


@pytest.mark.slow
def test_adamw_learns_a_repeated_sequence():
  cfg = CONFIGS["tiny"]  # bf16 compute, float32 params.
  model = Llama(cfg)
  params = init_params(cfg, jax.random.key(10))
  tokens = jnp.tile(jnp.arange(8, dtype=jnp.int32) * 5, (4, 4))  # (4, 32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  tx = optax.adamw(3e-3, weight_decay=0.0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):

    def loss_fn(p):
      return cross_entropy_loss(model.apply({"params": p}, inputs),
                                targets)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(cfg.vocab_size), rel=0.05)
  assert losses[-1] < 0.5 * losses[0], losses
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_generate_greedy_matches_stepwise_argmax(f32_model):
  model, params, apply = f32_model
  prompt = _tokens(11, 2, 3, F32_TINY.vocab_size)
  out = generate(model, params, prompt, 5, jax.random.key(0), 0.0)
  assert out.shape == (2, 8) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :3], prompt)
  # Reference loop on a zero-padded buffer (causality makes the pad inert).
  seq = np.zeros((2, 8), np.int32)
  seq[:, :3] = prompt
  for t in range(3, 8):
    seq[:, t] = np.argmax(apply({"params": params}, jnp.asarray(seq))[:, t - 1],
                          -1)
  np.testing.assert_array_equal(out, seq)


def test_generate_compiles_once_per_model_and_shape(f32_model):
  model, params, _ = f32_model
  prompt = _tokens(5, 2, 3, F32_TINY.vocab_size)
  first = generate(model, params, prompt, 5, jax.random.key(0), 0.0)
  compiled = llama._generate_compiled.jitted._cache_size()
  assert compiled >= 1
  # An equal model (another instance), another key and temperature: no new program.
  again = generate(Llama(F32_TINY), params, prompt, 5, jax.random.key(1), 0.5)
  assert llama._generate_compiled.jitted._cache_size() == compiled
  np.testing.assert_array_equal(first[:, :3], again[:, :3])
  # A model that cannot be a static argument runs uncompiled, to the same tokens.
  class Unhashable:  # the model's interface, without a hash
    __hash__ = None

    def __init__(self, inner):
      self.inner, self.config = inner, inner.config

    def apply(self, *args, **kwargs):
      return self.inner.apply(*args, **kwargs)

    def init(self, *args, **kwargs):
      return self.inner.init(*args, **kwargs)

  eager = generate(Unhashable(model), params, prompt, 5, jax.random.key(0), 0.0)
  np.testing.assert_array_equal(eager, first)
  assert llama._generate_compiled.jitted._cache_size() == compiled


def test_generate_sampling(f32_model):
  model, params, _ = f32_model
  prompt = jnp.array([1, 2, 3], jnp.int32)
  a = generate(model, params, prompt, 4, jax.random.key(1), 1.0)
  b = generate(model, params, prompt, 4, jax.random.key(1), 1.0)
  c = generate(model, params, prompt, 4, jax.random.key(2), 1e3)
  assert a.shape == c.shape == (1, 7)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:, :3], c[:, :3])
  assert not np.array_equal(a, c)
  assert bool(jnp.all((c >= 0) & (c < F32_TINY.vocab_size)))
  with pytest.raises(ValueError, match="max_len"):
    generate(model, params, prompt, F32_TINY.max_len, jax.random.key(1))


# ------------------------------------------------------------------ KV cache


def test_cached_decoding_gives_the_full_forward_logits(f32_model):
  model, params, apply = f32_model
  tokens = _tokens(12, 2, 9, F32_TINY.vocab_size)
  cache = init_cache(model, 2)
  assert cache["layers_0"]["attn"]["cached_key"].shape == (
      2, F32_TINY.max_len, F32_TINY.n_heads, F32_TINY.head_dim)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t,
                                          decode=True, mutable=["cache"]))
  logits, state = step(cache, tokens[:, :4])  # a prompt, then one at a time
  pieces = [logits]
  for t in range(4, 9):
    logits, state = step(state["cache"], tokens[:, t:t + 1])
    pieces.append(logits)
  assert int(state["cache"]["cache_index"]) == 9
  np.testing.assert_allclose(jnp.concatenate(pieces, 1),
                             apply({"params": params}, tokens), atol=1e-5)
  with pytest.raises(ValueError, match="init_cache"):
    model.apply({"params": params, "cache": cache}, tokens[:1, :1], decode=True,
                mutable=["cache"])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_matches_uncached_token_for_token(f32_model, temperature):
  model, params, _ = f32_model
  prompt = _tokens(13, 3, 5, F32_TINY.vocab_size)
  args = (model, params, prompt, 24, jax.random.key(4), temperature)
  cached = jax.jit(generate, static_argnums=(0, 3))(*args)
  uncached = jax.jit(generate_uncached, static_argnums=(0, 3))(*args)
  assert cached.shape == (3, 29)
  np.testing.assert_array_equal(cached, uncached)
  # The comparison can fail: another key draws other tokens.
  if temperature:
    other = jax.jit(generate, static_argnums=(0, 3))(*args[:4], jax.random.key(5), 1.0)
    assert not np.array_equal(other, cached)
  np.testing.assert_array_equal(generate(model, params, prompt, 0, jax.random.key(0)),
                                prompt)


def test_projection_accumulates_in_float32_and_rounds_once():
  """``llama.Dense``: bfloat16 x bfloat16 with a float32 accumulator,
  rounded to bfloat16 once: against the float64 product of the same
  bfloat16 inputs, at most half a bfloat16 step off (a bfloat16
  accumulator over 512 terms is several steps off); float32 unchanged."""
  from salaad_jax.models.llama import Dense
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 512)), jnp.bfloat16)
  layer = Dense(96, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  got = jax.jit(layer.apply)(params, x)
  assert got.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float64) @ np.asarray(params["params"]["kernel"], np.float64)
  terms = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(params["params"]["kernel"],
                                                                np.float64))
  half_step = np.abs(ref) * 2.0 ** -8  # bfloat16 has 8 significant bits
  assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= half_step + 1e-6 * terms)
  x32 = x.astype(jnp.float32)
  layer32 = Dense(96, use_bias=False)
  p32 = layer32.init(jax.random.key(0), x32)
  np.testing.assert_array_equal(layer32.apply(p32, x32), nn.Dense(96, use_bias=False).apply(p32, x32))
