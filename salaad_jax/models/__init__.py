"""Flax models: a LLaMA-style decoder, its configurations and helpers."""

from salaad_jax.models.configs import CONFIGS, LlamaConfig, get_config
from salaad_jax.models.llama import (
    Llama,
    count_params,
    cross_entropy_loss,
    generate,
    generate_uncached,
    init_cache,
    init_params,
)

__all__ = [
    "CONFIGS",
    "Llama",
    "LlamaConfig",
    "count_params",
    "cross_entropy_loss",
    "generate",
    "generate_uncached",
    "get_config",
    "init_cache",
    "init_params",
]
from salaad_jax.models.structured import BlockLayout, StructuredDense, structured_dense

__all__ += ["BlockLayout", "StructuredDense", "structured_dense"]
