"""Pretraining methods by name, and matching a method's rank to a budget."""

from __future__ import annotations

import inspect
from typing import Callable

from salaad_jax.baselines import accounting, dense, galore, lost, lowrank, sltrain
from salaad_jax.baselines.spec import MethodSpec
from salaad_jax.models.configs import LlamaConfig

PRETRAIN_METHODS: dict[str, Callable[..., MethodSpec]] = {
    "dense": dense.method,
    "lowrank": lowrank.method,
    "sltrain": sltrain.method,
    "lost": lost.method,
    "galore": galore.method,
}


def make_method(name: str, **hparams) -> MethodSpec:
  """The MethodSpec of `name` with `hparams` (see each module's `method`).

  Raises:
    ValueError: for an unknown name or a hyperparameter the method lacks.
  """
  if name not in PRETRAIN_METHODS:
    raise ValueError(f"Unknown pretraining method {name!r}; valid names: "
                     f"{sorted(PRETRAIN_METHODS)}.")
  factory = PRETRAIN_METHODS[name]
  valid = set(inspect.signature(factory).parameters)
  unknown = sorted(set(hparams) - valid)
  if unknown:
    raise ValueError(f"method {name!r} has no hyperparameter(s) {unknown}; "
                     f"valid: {sorted(valid)}.")
  return factory(**hparams)


def match_rank(name: str, config: LlamaConfig, target_params: int,
               **hparams) -> int:
  """Largest global rank r at which method `name` (other hyperparameters
  fixed) has at most `target_params` trained parameters.

  Raises:
    ValueError: if the method has no rank, if its size does not depend on
      the rank (GaLore trains a dense model), or if the budget is too small.
  """
  if "rank" not in inspect.signature(PRETRAIN_METHODS.get(name, dense.method)
                                     ).parameters:
    raise ValueError(f"method {name!r} has no rank to match a budget with.")
  max_rank = accounting.model_blocks(config).min_dim

  def count(r):
    return make_method(name, rank=r, **hparams).footprint(config).params

  if count(1) == count(max_rank):
    raise ValueError(f"the parameter count of method {name!r} does not "
                     "depend on its rank; there is no rank to match.")
  return accounting.largest_rank_within(count, int(target_params), max_rank)
