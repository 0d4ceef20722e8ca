"""LLaMA model configurations and the named presets of the reference setup.

The presets `60m`, `130m`, `350m` and `1b` follow SALAAD.md section 7 (LLaMA
on C4, sequence length 256, T5 vocabulary of 32000). `tiny` and `small` are
byte-level (vocabulary 256) models for tests, examples and CPU smoke runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["LlamaConfig", "CONFIGS", "get_config"]


def _as_float_dtype(value: Any, field: str) -> np.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(
        f"LlamaConfig.{field}={value!r} is not a dtype; use e.g. "
        "'float32' or 'bfloat16'.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"LlamaConfig.{field}={value!r} must be a floating dtype "
        "(float32, bfloat16, float16).")
  return dtype


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-style decoder.

  Attributes:
    vocab_size: V, number of token ids; embedding is (V, d_model).
    d_model: width d of the residual stream.
    d_ff: hidden width of the SwiGLU MLP.
    n_heads: number of attention heads h; head_dim = d / h (must be even,
      rotary embeddings rotate pairs of channels).
    n_layers: number of decoder blocks L.
    max_len: longest sequence the model accepts.
    rope_theta: base theta of the rotary frequencies theta^(-2i/head_dim).
    norm_eps: epsilon inside the RMSNorm square root.
    tie_embeddings: if True the output head reuses the embedding matrix E
      (logits = x E^T) and there is no `lm_head` parameter.
    dtype: compute dtype of activations and matmuls (strings accepted).
    param_dtype: storage dtype of the parameters (strings accepted).
  """

  vocab_size: int
  d_model: int
  d_ff: int
  n_heads: int
  n_layers: int
  max_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "d_ff", "n_heads", "n_layers",
                  "max_len"):
      value = getattr(self, field)
      if (isinstance(value, bool) or
          not isinstance(value, (int, np.integer)) or value <= 0):
        raise ValueError(
            f"LlamaConfig.{field} must be a positive integer, got {value!r}.")
      object.__setattr__(self, field, int(value))
    for field in ("rope_theta", "norm_eps"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(
          value, (int, float, np.number)) or not value > 0:
        raise ValueError(
            f"LlamaConfig.{field} must be a positive number, got {value!r}.")
      object.__setattr__(self, field, float(value))
    if self.d_model % self.n_heads:
      raise ValueError(
          f"LlamaConfig.d_model={self.d_model} must be divisible by "
          f"n_heads={self.n_heads}.")
    if self.head_dim % 2:
      raise ValueError(
          f"LlamaConfig head_dim = d_model / n_heads = {self.head_dim} must be "
          "even for rotary position embeddings (change d_model or n_heads).")
    if not isinstance(self.tie_embeddings, (bool, np.bool_)):
      raise ValueError(
          "LlamaConfig.tie_embeddings must be a bool, got "
          f"{self.tie_embeddings!r}.")
    object.__setattr__(self, "tie_embeddings", bool(self.tie_embeddings))
    object.__setattr__(self, "dtype", _as_float_dtype(self.dtype, "dtype"))
    object.__setattr__(self, "param_dtype",
                       _as_float_dtype(self.param_dtype, "param_dtype"))

  @property
  def head_dim(self) -> int:
    """d_model / n_heads."""
    return self.d_model // self.n_heads

  def replace(self, **overrides) -> "LlamaConfig":
    """A copy with some fields changed (validated again)."""
    return _replace(self, overrides)


def _replace(config: LlamaConfig, overrides: dict) -> LlamaConfig:
  names = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(
        f"Unknown LlamaConfig field(s) {unknown}; valid fields: "
        f"{sorted(names)}.")
  return dataclasses.replace(config, **overrides)


_T5_VOCAB = 32000

CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, d_model=64, d_ff=172, n_heads=4,
                        n_layers=2, max_len=128),
    "small": LlamaConfig(vocab_size=256, d_model=128, d_ff=344, n_heads=4,
                         n_layers=4),
    "60m": LlamaConfig(vocab_size=_T5_VOCAB, d_model=512, d_ff=1376,
                       n_heads=8, n_layers=8),
    "130m": LlamaConfig(vocab_size=_T5_VOCAB, d_model=768, d_ff=2048,
                        n_heads=12, n_layers=12),
    "350m": LlamaConfig(vocab_size=_T5_VOCAB, d_model=1024, d_ff=2736,
                        n_heads=16, n_layers=24),
    "1b": LlamaConfig(vocab_size=_T5_VOCAB, d_model=2048, d_ff=5461,
                      n_heads=32, n_layers=24),
}


def get_config(name: str, **overrides) -> LlamaConfig:
  """The preset `name` (case-insensitive), with `overrides` applied.

  Raises:
    ValueError: for an unknown preset name or an unknown/invalid field.
  """
  key = str(name).lower()
  if key not in CONFIGS:
    raise ValueError(
        f"Unknown model config {name!r}; valid names: {list(CONFIGS)}.")
  return _replace(CONFIGS[key], overrides)
