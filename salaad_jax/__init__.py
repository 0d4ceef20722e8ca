"""salaad_jax: SALAAD sparse plus low-rank training as an optax transformation."""

from salaad_jax import compact, consolidate, controller, prox, schedules, structure
from salaad_jax.compact import CompactSparse
from salaad_jax.prox import Factors
from salaad_jax.stats import (block_metrics, block_paths, find_state, low_rank_factors,
                              primal_residual, sparse_parts, summary, surrogate_blocks,
                              surrogate_params)
from salaad_jax.structure import BlockInfo, select_blocks
from salaad_jax.hparams import STATIC_ARGS
from salaad_jax.opt_state import SalaadState
from salaad_jax.transform import salaad, salaad_decoupled

__version__ = "0.1.0"

__all__ = [
    "BlockInfo", "CompactSparse", "Factors", "STATIC_ARGS", "SalaadState", "block_metrics", "block_paths",
    "compact", "consolidate", "controller",
    "find_state", "low_rank_factors", "primal_residual", "prox", "salaad",
    "salaad_decoupled", "schedules", "select_blocks", "sparse_parts", "structure", "summary",
    "surrogate_blocks", "surrogate_params",
]
