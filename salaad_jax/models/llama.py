"""A LLaMA-style decoder in Flax linen, with helpers to init, score and sample.

Architecture (pre-norm residual blocks, no biases), for tokens t_1..t_T:

    x_0   = E[t]                                   E: (V, d) embedding
    x'    = x_l + Attn(RMSNorm(x_l))               causal, rotary q and k
    x_l+1 = x' + MLP(RMSNorm(x'))                  SwiGLU
    logits = RMSNorm(x_L) W_out                    W_out = E^T if tied

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * scale
    MLP(x)     = W_down (silu(W_gate x) * (W_up x))
    Attn(x)    = W_o concat_h softmax(q_h k_h^T / sqrt(d_h) + causal) v_h

Every projection is a 2-D kernel of shape (in, out) at a fixed path, e.g.
`params/layers_3/attn/q_proj/kernel`, `params/layers_0/mlp/down_proj/kernel`;
the layers are a plain Python loop (not `nn.scan`) so each block owns its
matrices. The class building these projections is `Llama.dense_cls`
(default `Dense`: `nn.Dense` accumulating in float32); a replacement must accept
`dense_cls(features, *, use_bias, dtype, param_dtype, kernel_init, name)`
and keep the same parameter names to stay path-compatible.

Numerics: parameters are stored in `config.param_dtype`, activations and
matmuls run in `config.dtype`; every projection accumulates in float32 and
rounds its result to `config.dtype` once (`dot_general_f32`); RMSNorm,
rotary angles and softmax run in float32, and the output head accumulates
into float32 logits.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from salaad_jax.models.configs import LlamaConfig

__all__ = [
    "RMSNorm", "apply_rotary", "rotary_angles", "Attention", "MLP", "Block",
    "Llama", "Dense", "dot_general_f32", "init_params", "init_cache", "count_params", "cross_entropy_loss",
    "generate", "generate_uncached",
]

Array = jax.Array
DenseCls = Callable[..., nn.Module]

_INIT_STD = 0.02


def dot_general_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """``lax.dot_general`` accumulating in float32, its result in the operands'
  dtype (or ``preferred_element_type``).

  For bfloat16 operands this is the same rounding as a bfloat16 product with
  a float32 accumulator, made explicit: XLA:CPU runs a bfloat16 x bfloat16 ->
  bfloat16 dot on a generic path several times slower than the same dot
  with a float32 result (benchmarks/RESULTS.md, "Inference of a deployed
  model").  For float32 operands it is ``lax.dot_general`` itself.
  """
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


class Dense(nn.Dense):
  """``nn.Dense`` whose product accumulates in float32 (``dot_general_f32``):
  the default projection of ``Llama``."""

  dot_general: Any = dot_general_f32


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2, -1) + eps) * scale, computed in float32.

  `scale` (shape (d,), initialised to ones) is stored in `param_dtype`; the
  result is cast to `dtype` (or to the input dtype when `dtype` is None).
  """

  eps: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) +
                            self.eps)
    y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


def rotary_angles(positions: Array, head_dim: int, theta: float) -> Array:
  """Angles phi[..., i] = p * theta^(-2i / head_dim), i < head_dim / 2 (f32)."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) /
                       head_dim)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rotary(x: Array, positions: Array, theta: float) -> Array:
  """Rotary position embedding (rotate-half convention), in float32.

  For x of shape (batch, seq, heads, head_dim) and positions (batch, seq),
  the channel pairs (x1, x2) = (x[..., i], x[..., i + head_dim/2]) are
  rotated by phi_i = p * theta^(-2i/head_dim):

      x1' = x1 cos(phi_i) - x2 sin(phi_i)
      x2' = x2 cos(phi_i) + x1 sin(phi_i)

  so <R(p) q, R(s) k> depends on p - s only. Returns x's dtype.
  """
  head_dim = x.shape[-1]
  phi = rotary_angles(positions, head_dim, theta)[:, :, None, :]
  cos, sin = jnp.cos(phi), jnp.sin(phi)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _dense(dense_cls: DenseCls, features: int, name: str, config: LlamaConfig,
           std: float = _INIT_STD) -> nn.Module:
  return dense_cls(features, use_bias=False, dtype=config.dtype,
                   param_dtype=config.param_dtype,
                   kernel_init=nn.initializers.normal(std), name=name)


def _residual_std(config: LlamaConfig) -> float:
  """Init std of the projections writing into the residual stream."""
  return _INIT_STD / math.sqrt(2 * config.n_layers)


class Attention(nn.Module):
  """Causal multi-head self-attention with rotary q and k.

  q = x W_q, k = x W_k, v = x W_v split into h heads of d_h = d / h;
  out = softmax(R(q) R(k)^T / sqrt(d_h) + M) v, M_ts = -inf for s > t;
  result = concat_h(out) W_o. Logits and softmax are float32.

  With ``decode=True`` (the Flax cache-collection pattern of the lm1b
  example) the keys and values live in the ``cache`` collection:
  ``cached_key`` / ``cached_value`` (batch, max_len, h, d_h) and
  ``cache_index`` i (int32). A call on s tokens writes their k, v at
  [i, i + s), lets query t (at absolute index i + t) attend to the cached
  keys 0..i+t, and advances i by s: a prompt of any length, then one token
  at a time, gives the logits of the uncached forward over the whole prefix.
  """

  config: LlamaConfig
  dense_cls: DenseCls = Dense

  @nn.compact
  def __call__(self, x: Array, positions: Array, decode: bool = False) -> Array:
    cfg = self.config
    batch, seq, _ = x.shape
    heads_shape = (batch, seq, cfg.n_heads, cfg.head_dim)
    q = _dense(self.dense_cls, cfg.d_model, "q_proj", cfg)(x)
    k = _dense(self.dense_cls, cfg.d_model, "k_proj", cfg)(x)
    v = _dense(self.dense_cls, cfg.d_model, "v_proj", cfg)(x)
    q = apply_rotary(q.reshape(heads_shape), positions, cfg.rope_theta)
    k = apply_rotary(k.reshape(heads_shape), positions, cfg.rope_theta)
    v = v.reshape(heads_shape)
    if decode:
      k, v, mask = self._cached(k, v)
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    out = out.reshape(batch, seq, cfg.d_model)
    return _dense(self.dense_cls, cfg.d_model, "o_proj", cfg,
                  _residual_std(cfg))(out)

  def _cached(self, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """Writes k, v into the cache; (all keys, all values, mask (1,1,s,max_len))."""
    cfg = self.config
    batch, seq = k.shape[:2]
    shape = (batch, cfg.max_len, cfg.n_heads, cfg.head_dim)
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    index = self.variable("cache", "cache_index",
                          lambda: jnp.array(0, jnp.int32))
    if cached_k.value.shape != shape:
      raise ValueError(
          f"the KV cache holds shape {cached_k.value.shape} but this call needs "
          f"{shape}; build it with init_cache(model, batch={batch}).")
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(
        cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(
        cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0))
    index.value = i + seq
    query_at = i + jnp.arange(seq, dtype=jnp.int32)
    mask = jnp.arange(cfg.max_len, dtype=jnp.int32)[None, :] <= query_at[:, None]
    return cached_k.value, cached_v.value, mask[None, None]


class MLP(nn.Module):
  """SwiGLU: W_down (silu(x W_gate) * (x W_up)), hidden width d_ff."""

  config: LlamaConfig
  dense_cls: DenseCls = Dense

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gate = _dense(self.dense_cls, cfg.d_ff, "gate_proj", cfg)(x)
    up = _dense(self.dense_cls, cfg.d_ff, "up_proj", cfg)(x)
    return _dense(self.dense_cls, cfg.d_model, "down_proj", cfg,
                  _residual_std(cfg))(nn.silu(gate) * up)


class Block(nn.Module):
  """Pre-norm block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

  config: LlamaConfig
  dense_cls: DenseCls = Dense

  @nn.compact
  def __call__(self, x: Array, positions: Array, decode: bool = False) -> Array:
    cfg = self.config
    norm = functools.partial(RMSNorm, eps=cfg.norm_eps, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype)
    x = x + Attention(cfg, self.dense_cls, name="attn")(
        norm(name="attn_norm")(x), positions, decode)
    x = x + MLP(cfg, self.dense_cls, name="mlp")(norm(name="mlp_norm")(x))
    return x


class Llama(nn.Module):
  """LLaMA-style decoder: tokens int[batch, seq] -> logits float32[b, s, V].

  Parameter tree: `embed/embedding` (V, d); `layers_{i}/{attn_norm,mlp_norm}/
  scale`; `layers_{i}/attn/{q,k,v,o}_proj/kernel` (d, d);
  `layers_{i}/mlp/{gate,up}_proj/kernel` (d, d_ff), `down_proj/kernel`
  (d_ff, d); `final_norm/scale`; `lm_head/kernel` (d, V) unless
  `config.tie_embeddings`.

  Attributes:
    config: the LlamaConfig.
    dense_cls: class used for the attention and MLP projections (see the
      module docstring for the constructor contract).
  """

  config: LlamaConfig
  dense_cls: DenseCls = Dense

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               deterministic: bool = True, decode: bool = False) -> Array:
    """Logits for every position.

    Args:
      tokens: int[batch, seq] token ids, seq <= config.max_len.
      positions: optional int[batch, seq] or int[seq] rotary positions;
        defaults to 0..seq-1 (with ``decode``: the cache index onwards).
        Causality always follows the sequence index.
      deterministic: accepted for API symmetry with dropout models; this
        model has no dropout, so it has no effect.
      decode: read and extend the KV cache (the ``cache`` collection, from
        ``init_cache``; apply with ``mutable=["cache"]``): the tokens are
        the continuation of those already cached.

    Returns:
      float32[batch, seq, vocab_size] logits.
    """
    del deterministic
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(
          f"tokens must have shape (batch, seq), got {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}.")
    batch, seq = tokens.shape
    if seq > cfg.max_len:
      raise ValueError(
          f"sequence length {seq} exceeds LlamaConfig.max_len={cfg.max_len}.")
    if positions is None:
      positions = jnp.arange(seq, dtype=jnp.int32)
      if decode:  # the absolute index of the first token
        start = self.variable("cache", "cache_index",
                              lambda: jnp.array(0, jnp.int32))
        positions = positions + start.value
        start.value = start.value + seq
    positions = jnp.broadcast_to(jnp.asarray(positions), (batch, seq))

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype,
                     embedding_init=nn.initializers.normal(_INIT_STD),
                     name="embed")
    x = embed(tokens)
    for i in range(cfg.n_layers):
      x = Block(cfg, self.dense_cls, name=f"layers_{i}")(x, positions, decode)
    x = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                name="final_norm")(x)

    # Output head: inputs in the compute dtype, float32 accumulation/output.
    if cfg.tie_embeddings:
      table = embed.embedding.astype(cfg.dtype)
      logits = jnp.einsum("bsd,vd->bsv", x, table,
                          preferred_element_type=jnp.float32)
    else:
      logits = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
          param_dtype=cfg.param_dtype,
          kernel_init=nn.initializers.normal(_INIT_STD),
          dot_general=functools.partial(jax.lax.dot_general,
                                        preferred_element_type=jnp.float32),
          name="lm_head")(x)
    return logits.astype(jnp.float32)


def init_params(config: LlamaConfig, rng: Array, batch: int = 1,
                seq: int | None = None, *,
                dense_cls: DenseCls = Dense) -> dict:
  """Initialise `Llama(config)` and return `variables['params']`.

  Parameter shapes do not depend on (batch, seq); seq defaults to
  min(config.max_len, 8). Traceable, so `jax.eval_shape` gives the abstract
  tree without materialising it.
  """
  seq = min(config.max_len, 8) if seq is None else seq
  tokens = jnp.zeros((batch, seq), jnp.int32)
  model = Llama(config, dense_cls=dense_cls)
  return jax.jit(model.init)(rng, tokens)["params"]


def count_params(params: Any) -> int:
  """Total number of scalars over all leaves (arrays or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def cross_entropy_loss(logits: Array, targets: Array,
                       mask: Array | None = None) -> tuple[Array, Array]:
  """Mean token cross-entropy, in float32.

  loss = sum_t m_t * (-log softmax(logits_t)[y_t]) / max(sum_t m_t, 1)

  Args:
    logits: float[..., V].
    targets: int[...] labels.
    mask: optional weights/booleans broadcastable to targets (1 = count).

  Returns:
    (mean loss, token count sum_t m_t), both float32 scalars.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  if mask is None:
    weights = jnp.ones_like(losses)
  else:
    weights = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), losses.shape)
  count = jnp.sum(weights)
  return jnp.sum(losses * weights) / jnp.maximum(count, 1.0), count


def init_cache(model: Llama, batch: int) -> dict:
  """An empty KV cache for ``model`` (the ``cache`` collection of
  ``model.apply(..., decode=True, mutable=["cache"])``): per layer k and v of
  shape (batch, max_len, h, d_h) in the compute dtype, and the indices at 0.
  Parameters are not initialised (the shapes come from ``jax.eval_shape``)."""
  tokens = jnp.zeros((batch, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _check_generate_args(model: Llama, prompt_tokens, max_new_tokens: int):
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt_tokens.ndim == 1:
    prompt_tokens = prompt_tokens[None]
  batch, prompt_len = prompt_tokens.shape
  total = prompt_len + int(max_new_tokens)
  if prompt_len < 1:
    raise ValueError("generate needs a prompt of at least one token.")
  if int(max_new_tokens) < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
  if total > model.config.max_len:
    raise ValueError(
        f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
        f"{total} exceeds LlamaConfig.max_len={model.config.max_len}.")
  buffer = jnp.zeros((batch, total), jnp.int32)
  return jax.lax.dynamic_update_slice(buffer, prompt_tokens, (0, 0)), prompt_len


def _next_token(last: Array, rng: Array, i, temperature: Array) -> Array:
  """y ~ softmax(last / temperature) with key fold_in(rng, i), or argmax when
  temperature <= 0; int32[batch]."""
  greedy = jnp.argmax(last, axis=-1)
  sampled = jax.random.categorical(
      jax.random.fold_in(rng, i), last / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _generate(model: Llama, params: Any, prompt_tokens: Array,
              max_new_tokens: int, rng: Array,
              temperature: float | Array = 1.0) -> Array:
  buffer, prompt_len = _check_generate_args(model, prompt_tokens, max_new_tokens)
  n = int(max_new_tokens)
  if n == 0:
    return buffer
  temperature = jnp.asarray(temperature, jnp.float32)
  cache = init_cache(model, buffer.shape[0])

  def run(tokens, cache):
    logits, state = model.apply({"params": params, "cache": cache}, tokens,
                                decode=True, mutable=["cache"])
    return logits[:, -1], state["cache"]

  last, cache = run(buffer[:, :prompt_len], cache)
  token = _next_token(last, rng, 0, temperature)
  buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, prompt_len))

  def step(i, carry):
    buf, cache = carry
    prev = jax.lax.dynamic_slice_in_dim(buf, prompt_len + i - 1, 1, axis=1)
    last, cache = run(prev, cache)
    token = _next_token(last, rng, i, temperature)
    return jax.lax.dynamic_update_slice(buf, token[:, None], (0, prompt_len + i)), cache

  return jax.lax.fori_loop(1, n, step, (buffer, cache))[0]


def _generate_uncached(model: Llama, params: Any, prompt_tokens: Array,
                       max_new_tokens: int, rng: Array,
                       temperature: float | Array = 1.0) -> Array:
  buffer, prompt_len = _check_generate_args(model, prompt_tokens, max_new_tokens)
  temperature = jnp.asarray(temperature, jnp.float32)

  def step(i, buf):
    pos = prompt_len + i
    logits = model.apply({"params": params}, buf)
    last = jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1,
                                        keepdims=False)
    token = _next_token(last, rng, i, temperature)
    return jax.lax.dynamic_update_slice(buf, token[:, None], (0, pos))

  return jax.lax.fori_loop(0, int(max_new_tokens), step, buffer)


def _compiled(impl):
  """``impl`` jit-compiled with the model and the number of new tokens static."""
  jitted = jax.jit(impl, static_argnums=(0, 3))

  def call(model, params, prompt_tokens, max_new_tokens, rng, temperature=1.0):
    n = int(max_new_tokens)
    try:
      hash(model)
    except TypeError:  # an unhashable attribute: it cannot be a static argument
      return impl(model, params, prompt_tokens, n, rng, temperature)
    return jitted(model, params, prompt_tokens, n, rng, temperature)

  call.jitted = jitted
  return call


_generate_compiled = _compiled(_generate)
_generate_uncached_compiled = _compiled(_generate_uncached)


def generate(model: Llama, params: Any, prompt_tokens: Array,
             max_new_tokens: int, rng: Array,
             temperature: float | Array = 1.0) -> Array:
  """Autoregressive sampling with a KV cache.

  The prompt (P tokens) runs once through ``model`` with ``decode=True``,
  filling the cache (``init_cache``); each of the N = max_new_tokens steps
  then runs one token and draws y_i ~ softmax(logits / temperature) with key
  fold_in(rng, i), or argmax when temperature <= 0 (greedy): the same draws
  as ``generate_uncached``, at O(1) tokens of work per step instead of a
  full forward.  Compiled once per model, prompt shape and N (a model whose
  attributes cannot be hashed runs it uncompiled); inside a caller's jit, N
  must be static and temperature may be traced.

  Returns:
    int32[batch, P + N]: the prompt followed by the sampled tokens.
  """
  return _generate_compiled(model, params, prompt_tokens, max_new_tokens, rng, temperature)


def generate_uncached(model: Llama, params: Any, prompt_tokens: Array,
                      max_new_tokens: int, rng: Array,
                      temperature: float | Array = 1.0) -> Array:
  """Autoregressive sampling without a KV cache (the reference of ``generate``).

  A fixed buffer int32[batch, P + N] is filled one token per
  ``lax.fori_loop`` step; each step runs the full forward pass (causality
  makes the unfilled tail irrelevant) and draws the token as ``generate``;
  compiled as ``generate`` is.
  """
  return _generate_uncached_compiled(model, params, prompt_tokens, max_new_tokens, rng,
                                     temperature)
