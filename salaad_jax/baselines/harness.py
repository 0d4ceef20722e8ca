"""The pretraining baselines as methods of the training harness.

Importing this module registers ``lowrank``, ``sltrain``, ``lost`` and
``galore`` in ``salaad_jax.train.methods`` (it is one of the registry's
plugin modules), so ``python -m experiments.pretrain --method=sltrain`` runs
them.  Each method's options (``--method_option key=value``) are its
MethodSpec hyperparameters; ``rank=0`` picks the reference rank of the model
preset, or a quarter of the smallest block dimension for presets without one.
The optimiser is the spec's (clip + AdamW, or GaLore) with the run's b1, b2,
eps, weight decay and clip norm.

:func:`run_footprint` gives a pretraining baseline's parameter count and
deployment bytes (the §6 accounting of ``MethodSpec.footprint``);
:func:`write_run_summary` leaves ``<workdir>/summary.json`` for a trained run
of any method: the baselines by their spec, SALAAD as its surrogate L + S
(:func:`surrogate_footprint`, evaluated as such), the fine-tuning methods as
deployed (``finetune.finetune_footprint``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from salaad_jax.baselines import accounting
from salaad_jax.baselines.registry import make_method
from salaad_jax.baselines.spec import REFERENCE_RANKS, MethodSpec
from salaad_jax.train.compute import train_compute
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
  # SLTrain's support is drawn from the seed as a Python int (spec_for).
  register_method(name, _optimizer, dense_cls=_dense_cls, options=options,
                  description=description,
                  runtime_fields=("lr",) if name == "sltrain" else ("lr", "seed"),
                  constant_collections=spec.constant_collections, overwrite=True)


for _name, (_options, _description) in HARNESS_METHODS.items():
  _register(_name, _options, _description)


def run_footprint(config: TrainConfig) -> accounting.Footprint:
  """(params, bytes) of the model ``config`` trains, by the method's
  accounting (dense and GaLore: the dense model)."""
  return spec_for(config).footprint(_model_config(config), accounting.ByteCosts())


def surrogate_footprint(params, opt_state,
                        costs: accounting.ByteCosts = accounting.ByteCosts()
                        ) -> accounting.Footprint:
  """(params, bytes) of SALAAD's current surrogate L + S: per block
  (m + n) rank + nnz values (``costs.sparse_format``), the rest dense."""
  import salaad_jax as sj  # pylint: disable=import-outside-toplevel
  from salaad_jax.deploy import accounting as deploy_accounting  # pylint: disable=import-outside-toplevel
  factors = sj.low_rank_factors(opt_state)
  sparse = sj.sparse_parts(opt_state)
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  n_params, n_bytes, block_total = 0, 0, 0
  for path, f in factors.items():
    m, n = int(f.u.shape[0]), int(f.v.shape[0])
    rank = int(np.sum(np.asarray(f.s) > 0))
    nnz = int(np.count_nonzero(np.asarray(sparse[path])))
    block_total += m * n
    n_params += deploy_accounting.block_params(m, n, rank, nnz)
    n_bytes += deploy_accounting.block_bytes(costs.sparse_format, m, n, rank, nnz, costs.b_w)
  rest = total - block_total
  return accounting.Footprint(rest + n_params, rest * costs.b_w + n_bytes)


def _dense_params(config: TrainConfig) -> int:
  return int(make_method("dense").footprint(_model_config(config)).params)


def _wall_time(workdir: str, result: dict) -> float:
  """The run's wall time: this process's, or for a finished run restored
  again, the one its summary already records."""
  from salaad_jax.deploy.summary import read_summary  # pylint: disable=import-outside-toplevel
  try:
    before = read_summary(workdir)
  except ValueError:
    before = {}
  if before.get("step") == int(result["step"]) and "wall_s" in before.get("extra", {}):
    return float(before["extra"]["wall_s"])
  return float(result.get("wall_time_sec", 0.0))


def write_run_summary(config: TrainConfig, workdir: str, result: dict, **extra: Any) -> dict:
  """Writes ``<workdir>/summary.json`` (method, params, bytes, validation
  perplexity and loss of the deployed model, step, dense_params, and for
  pruned models the sparsity) and returns it.  ``config`` must be resolved
  (``vocab_size`` set, e.g. ``config_lib.read_config(workdir)``); ``result``
  is what ``train_and_evaluate`` returned.

  SALAAD is deployed as its surrogate L + S: its numbers are the
  surrogate's, with the dense iterate's perplexity under
  ``extra.dense_iterate_perplexity``.  Every summary records the run's
  training compute under ``extra.compute`` (steps, tokens, passes, FLOPs:
  ``salaad_jax.train.compute``) and its wall time under ``extra.wall_s``.

  With several processes every one calls it (the checkpoint is restored
  collectively) and process 0 writes the file.
  """
  from salaad_jax.baselines import finetune  # pylint: disable=import-outside-toplevel
  from salaad_jax.deploy.summary import write_summary  # pylint: disable=import-outside-toplevel
  from salaad_jax.train.run import load_run  # pylint: disable=import-outside-toplevel
  ppl, loss, sparsity = result["eval_perplexity"], result["eval_loss"], None
  if config.method in finetune.FINETUNE_METHODS:
    run = load_run(workdir)
    fp, numbers = finetune.finetune_footprint(run.config, run.params)
    extra = {"trainable_params": numbers["trainable_params"], **extra}
    if config.method != "lora":
      sparsity = numbers["sparsity"]
  elif config.method == "salaad":
    run = load_run(workdir)
    fp = surrogate_footprint(run.params, run.opt_state)
    extra = {"dense_iterate_perplexity": float(ppl), **extra}
    ppl, loss = result["eval_surrogate/perplexity"], result["eval_surrogate/loss"]
  else:
    fp = run_footprint(config)
  if config.init_from:
    extra = {"init_from": os.path.abspath(config.init_from), **extra}
  if config.init_from_hf:
    extra = {"init_from_hf": os.path.abspath(config.init_from_hf), **extra}
  extra = {"compute": train_compute(config, _model_config(config)).as_dict(),
           "wall_s": _wall_time(workdir, result), **extra}
  return write_summary(workdir, method=config.method, params=int(fp.params),
                       bytes=int(fp.bytes), perplexity=float(ppl), loss=float(loss),
                       sparsity=sparsity, dense_params=_dense_params(config),
                       step=int(result["step"]), extra=extra or None,
                       write=jax.process_index() == 0)
