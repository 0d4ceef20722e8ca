"""Comparison systems for SALAAD, built on the same LLaMA and operators.

Pretraining (each a `MethodSpec`: a `dense_cls` for `Llama`, an optimiser
factory and the §6 parameter/byte accounting; `make_method(name, **hparams)`):
`dense`, `lowrank`, `sltrain`, `lost`, `galore`.

Fine-tuning (pure functions on a dense pretrained params tree): `lora`,
`salr`, `losa`, with `calibration` (activation statistics from a Llama),
`pruning` (magnitude / Wanda masks), `cka` (layer similarity) and `bitmap`
(bitmap-plus-values storage).
"""

from salaad_jax.baselines import (accounting, bitmap, calibration, cka, dense, galore, lora,
                                  losa, lost, lowrank, pruning, salr, sltrain, spec)
from salaad_jax.baselines.accounting import ByteCosts, Footprint
from salaad_jax.baselines.registry import (PRETRAIN_METHODS, make_method, match_rank,
                                           match_rank_target)
from salaad_jax.baselines.spec import MethodSpec, reference_adamw, split_variables

__all__ = [
    "ByteCosts", "Footprint", "MethodSpec", "PRETRAIN_METHODS", "accounting", "bitmap",
    "calibration", "cka", "dense", "galore", "lora", "losa", "lost", "lowrank",
    "make_method", "match_rank", "match_rank_target", "pruning", "reference_adamw", "salr", "sltrain", "spec",
    "split_variables",
]
