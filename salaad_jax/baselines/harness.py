"""The pretraining baselines as methods of the training harness.

Importing this module registers ``lowrank``, ``sltrain``, ``lost`` and
``galore`` in ``salaad_jax.train.methods`` (it is one of the registry's
plugin modules), so ``python -m experiments.pretrain --method=sltrain`` runs
them.  Each method's options (``--method_option key=value``) are its
MethodSpec hyperparameters; ``rank=0`` picks the reference rank of the model
preset, or a quarter of the smallest block dimension for presets without one.
The optimiser is the spec's (clip + AdamW, or GaLore) with the run's b1, b2,
eps, weight decay and clip norm.

:func:`run_footprint` and :func:`write_run_summary` give a trained run's
parameter count and deployment bytes (the §6 accounting of
``MethodSpec.footprint``) and leave ``<workdir>/summary.json``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from salaad_jax.baselines import accounting
from salaad_jax.baselines.registry import make_method
from salaad_jax.baselines.spec import REFERENCE_RANKS, MethodSpec
from salaad_jax.train.config import TrainConfig, TrainError
from salaad_jax.train.methods import get_method, method_options, register_method

HARNESS_METHODS = {
    "lowrank": ({"rank": 0}, "low-rank factors A B in every block"),
    "sltrain": ({"rank": 0, "alpha": 32.0, "density": 0.03},
                "SLTrain: low-rank plus a fixed random sparse support"),
    "lost": ({"rank": 0, "density": 0.03},
             "LOST: low-rank plus column-sparse complement from the SVD"),
    "galore": ({"rank": 0, "update_proj_gap": 200, "scale": 0.25},
               "GaLore: dense model, gradient projected on a rank-r subspace"),
}


def _model_config(config: TrainConfig):
  from salaad_jax.train.state import model_config  # pylint: disable=import-outside-toplevel
  return model_config(config)


def default_rank(config: TrainConfig) -> int:
  """The reference rank of ``config.model``, capped at a quarter of the
  smallest block dimension (at least 1)."""
  min_dim = accounting.model_blocks(_model_config(config)).min_dim
  return max(1, min(REFERENCE_RANKS.get(config.model, min_dim), min_dim // 4))


def spec_for(config: TrainConfig) -> MethodSpec:
  """The MethodSpec of ``config.method`` with its ``--method_option`` values
  (SLTrain's support seed is the run's seed)."""
  name = config.method
  if name == "dense":
    return make_method("dense")
  if name not in HARNESS_METHODS:
    raise TrainError(f"--method={name}: not a baseline with a MethodSpec")
  hp = method_options(get_method(name), config)
  if hp.get("rank", 1) <= 0:
    hp["rank"] = default_rank(config)
  if name == "sltrain":
    hp["seed"] = config.seed
  try:
    return make_method(name, **hp)
  except ValueError as e:
    raise TrainError(f"--method={name}: {e}") from None


def _optimizer(config: TrainConfig, schedule):
  return spec_for(config).optimizer(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps,
      weight_decay=config.weight_decay, clip_norm=config.clip_norm or None)


def _dense_cls(config: TrainConfig):
  return spec_for(config).dense_cls(_model_config(config))


def _register(name: str, options: dict, description: str) -> None:
  spec = make_method(name)
  register_method(name, _optimizer, dense_cls=_dense_cls, options=options,
                  description=description,
                  constant_collections=spec.constant_collections, overwrite=True)


for _name, (_options, _description) in HARNESS_METHODS.items():
  _register(_name, _options, _description)


def run_footprint(config: TrainConfig) -> accounting.Footprint:
  """(params, bytes) of the model ``config`` trains, by the method's
  accounting (dense and GaLore: the dense model)."""
  return spec_for(config).footprint(_model_config(config), accounting.ByteCosts())


def write_run_summary(config: TrainConfig, workdir: str, result: dict, **extra: Any) -> dict:
  """Writes ``<workdir>/summary.json`` (method, params, bytes, final validation
  perplexity and loss, step) and returns it; ``config`` must be resolved
  (``vocab_size`` set, e.g. ``config_lib.read_config(workdir)``)."""
  fp = run_footprint(config)
  summary = {"method": config.method, "params": int(fp.params), "bytes": int(fp.bytes),
             "perplexity": float(result["eval_perplexity"]),
             "loss": float(result["eval_loss"]), "step": int(result["step"])}
  if extra:
    summary["extra"] = extra
  try:
    from salaad_jax.deploy.summary import write_summary  # pylint: disable=import-outside-toplevel
  except ImportError:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    return summary
  return write_summary(workdir, **summary)
