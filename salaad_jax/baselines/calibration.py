"""Calibration statistics of a dense Llama for pruning-based fine-tuning.

One forward pass over calibration tokens records

  * per block (projection kernel) the input energy per feature,
    sq_norms[path][i] = sum over tokens of x_i^2 (so ||x_i||_2 = sqrt of it),
    which Wanda needs;
  * the residual stream entering every decoder layer, H_0 (embedding output)
    ... H_{L-1}, plus the final H_L, each (tokens, d) in float32, which the
    layer-similarity (CKA) allocation needs.

The model code is untouched: a recording `dense_cls` sows the statistics and
Flax's `capture_intermediates` returns the block outputs.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from salaad_jax.models.configs import LlamaConfig
from salaad_jax.models.llama import Block, Llama

_COLLECTION = "calibration"


class Calibration(NamedTuple):
  """sq_norms: kernel path -> (in,) float32; hidden: [H_0, ..., H_L]."""

  sq_norms: dict[str, jax.Array]
  hidden: list[jax.Array]


class RecordingDense(nn.Dense):
  """nn.Dense that also accumulates sum_tokens x_i^2 of its input."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    x = jnp.asarray(inputs, jnp.float32)
    energy = jnp.sum(x * x, axis=tuple(range(x.ndim - 1)))
    self.sow(_COLLECTION, "sq_norm", energy,
             init_fn=lambda: jnp.zeros_like(energy),
             reduce_fn=lambda total, new: total + new)
    return super().__call__(inputs)


def _is_recorded(module: nn.Module, method_name: str) -> bool:
  return method_name == "__call__" and isinstance(module, (Block, nn.Embed))


@functools.lru_cache(maxsize=8)
def _recording_apply(config: LlamaConfig):
  """The jitted recording forward pass of `Llama(config)` (one per config)."""
  model = Llama(config, dense_cls=RecordingDense)

  @jax.jit
  def run(params, tokens):
    _, state = model.apply({"params": params}, tokens,
                           mutable=[_COLLECTION, "intermediates"],
                           capture_intermediates=_is_recorded)
    return state

  return run


def collect(config: LlamaConfig, params: Any, tokens: jax.Array) -> Calibration:
  """Calibration statistics of `Llama(config)` with dense `params` on
  int tokens (batch, seq)."""
  state = _recording_apply(config)(params, tokens)
  sq_norms = {
      path[: -len("/sq_norm")] + "/kernel": value
      for path, value in traverse_util.flatten_dict(
          state[_COLLECTION], sep="/").items()}
  inter = state["intermediates"]
  hidden = [inter["embed"]["__call__"][0]]
  hidden += [inter[f"layers_{i}"]["__call__"][0]
             for i in range(config.n_layers)]
  hidden = [h.astype(jnp.float32).reshape(-1, h.shape[-1]) for h in hidden]
  return Calibration(sq_norms, hidden)
