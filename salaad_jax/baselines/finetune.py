"""The fine-tuning methods LoRA, SALR and LoSA as methods of the training harness.

Importing this module registers ``lora``, ``salr`` and ``losa`` in
``salaad_jax.train.methods`` (it is one of the registry's plugin modules).
Each starts from the dense Llama of a trained run (``--init_from``) and
trains only its adapters (kept as plain ``{'a': A, 'b': B}`` dicts, see
:func:`plain`); the frozen weights live in the constant collection
``'frozen'`` of ``TrainState.params`` (checkpointed, never seen by the
optimiser), and the model applies the merged weights:

  * ``lora``: ``{'params': adapters, 'frozen': {'base': W}}``, applies
    ``W + (alpha / r) A B``;
  * ``salr``: ``{'params': adapters, 'frozen': {'base': W_s, 'residual':
    (A_res, B_res)}}``, applies ``W_s + A_res B_res + (alpha / r) A B``;
  * ``losa``: one round t of LoSA (``--method_option round=t``; calibration
    on training batches, per-layer Wanda pruning and ranks),
    ``{'params': adapters, 'frozen': {'base': M * W, 'masks': M}}``, applies
    ``W + M * (alpha / r) A B``.  ``experiments.finetune`` chains the rounds,
    each run starting from the previous one's merged weights.

SALAAD itself fine-tunes with ``--method=salaad --init_from=...``: the
transform starts from the pretrained weights.

:func:`finetune_footprint` gives the deployed size of a trained fine-tuning
run (§6 accounting): LoRA merges into the dense model; SALR keeps a bitmap
sparse base and one fused adapter pair; LoSA merges into a sparse model.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from salaad_jax.baselines import accounting, calibration, lora, losa, salr
from salaad_jax.train.config import TrainConfig, TrainError
from salaad_jax.train.methods import (dense_optimizer, get_method, method_options,
                                      register_method)

COLLECTION = "frozen"

FINETUNE_METHODS = {
    "lora": ({"rank": 8, "alpha": 16.0},
             "LoRA: rank-r adapters on the frozen pretrained model (needs --init_from)"),
    "salr": ({"lora_rank": 8, "residual_rank": 8, "sparsity": 0.5, "alpha": 16.0},
             "SALR: 50% magnitude-pruned frozen base, SVD residual adapter, LoRA "
             "(needs --init_from)"),
    "losa": ({"rank": 8, "alpha": 16.0, "sparsity": 0.5, "rounds": 5, "round": 1,
              "max_deviation": 0.02, "calib_batches": 2},
             "LoSA, one round: Wanda pruning to the round's cubic-schedule sparsity, "
             "per-layer sparsity and ranks, masked LoRA (needs --init_from)"),
}


def _options(config: TrainConfig) -> dict[str, Any]:
  return method_options(get_method(config.method), config)


def _frozen(variables: dict) -> dict:
  return variables[COLLECTION]


def plain(pairs: dict) -> dict:
  """Adapters with every ``LoraPair`` as ``{'a': A, 'b': B}``: the form kept
  in ``TrainState.params``, plain nested dicts as in any checkpoint's
  metadata (so a run restores from its own checkpoints alone)."""
  return lora.nest({path: {"a": pair.a, "b": pair.b}
                    for path, pair in lora.flat(pairs).items()})


def pairs(tree: dict) -> dict:
  """Inverse of :func:`plain`."""
  if isinstance(tree, lora.LoraPair):
    return tree
  if set(tree) == {"a", "b"}:
    return lora.LoraPair(tree["a"], tree["b"])
  return {k: pairs(v) for k, v in tree.items()}


# --------------------------------------------------------------------- LoRA


def _lora_start(config, params, rng, next_batch):
  del next_batch
  hp = _options(config)
  if hp["rank"] < 1:
    raise TrainError(f"--method_option rank={hp['rank']} must be >= 1")
  return {"params": plain(lora.init(params, hp["rank"], rng)), COLLECTION: {"base": params}}


def _lora_apply(variables: dict, alpha: float) -> dict:
  return {"params": lora.merge(_frozen(variables)["base"], pairs(variables["params"]), alpha)}


# --------------------------------------------------------------------- SALR


def _salr_start(config, params, rng, next_batch):
  del next_batch
  hp = _options(config)
  if not 0.0 <= hp["sparsity"] < 1.0:
    raise TrainError(f"--method_option sparsity={hp['sparsity']} must lie in [0, 1)")
  if hp["lora_rank"] < 1 or hp["residual_rank"] < 1:
    raise TrainError("--method_option lora_rank and residual_rank must be >= 1")
  tree = salr.init(params, rng, lora_rank=hp["lora_rank"],
                   residual_rank=hp["residual_rank"], sparsity=hp["sparsity"])
  return {"params": plain(tree["adapters"]),
          COLLECTION: {"base": tree["base"], "residual": plain(tree["residual"])}}


def _salr_tree(variables: dict) -> dict:
  """The ``salr`` module's training tree of the harness variables."""
  frozen = _frozen(variables)
  return {"base": frozen["base"], "residual": pairs(frozen["residual"]),
          "adapters": pairs(variables["params"])}


def _salr_apply(variables: dict, alpha: float) -> dict:
  return {"params": salr.effective_params(_salr_tree(variables), alpha)}


# --------------------------------------------------------------------- LoSA


def _losa_start(config, params, rng, next_batch):
  hp = _options(config)
  if not 1 <= hp["round"] <= hp["rounds"]:
    raise TrainError(f"--method_option round={hp['round']} must lie in "
                     f"[1, rounds={hp['rounds']}]")
  if not 0.0 <= hp["sparsity"] < 1.0:
    raise TrainError(f"--method_option sparsity={hp['sparsity']} must lie in [0, 1)")
  from salaad_jax.train.state import model_config  # pylint: disable=import-outside-toplevel
  tokens = np.concatenate([np.asarray(next_batch()["inputs"])
                           for _ in range(max(1, hp["calib_batches"]))])
  calib = calibration.collect(model_config(config), params, jnp.asarray(tokens))
  state = losa.init(params)._replace(round=hp["round"] - 1)
  state = losa.next_round(state, calib, rng, target=hp["sparsity"], alpha=hp["alpha"],
                          mean_rank=hp["rank"], rounds=hp["rounds"],
                          max_deviation=hp["max_deviation"])
  return {"params": plain(state.adapters),
          COLLECTION: {"base": state.base, "masks": state.masks}}


def _losa_apply(variables: dict, alpha: float) -> dict:
  frozen = _frozen(variables)
  return {"params": lora.merge(frozen["base"], pairs(variables["params"]), alpha,
                               frozen["masks"])}


# --------------------------------------------------------------------- registry

_STARTS: dict[str, Callable] = {"lora": _lora_start, "salr": _salr_start, "losa": _losa_start}
_APPLIES: dict[str, Callable] = {"lora": _lora_apply, "salr": _salr_apply, "losa": _losa_apply}


def _model_variables(name: str) -> Callable[[TrainConfig], Callable[[dict], dict]]:
  def make(config: TrainConfig):
    return functools.partial(_APPLIES[name], alpha=float(_options(config)["alpha"]))
  return make


for _name, (_opts, _description) in FINETUNE_METHODS.items():
  register_method(_name, dense_optimizer, options=_opts, description=_description,
                  constant_collections=(COLLECTION,), from_pretrained=_STARTS[_name],
                  model_variables=_model_variables(_name), overwrite=True)


def losa_rounds(config: TrainConfig, workdir: str) -> list[tuple[TrainConfig, str]]:
  """(config, workdir) of every round of a LoSA fine-tuning ``config``
  (``method='losa'``, ``init_from`` set): round t runs in
  ``<workdir>/round_<t>`` from round t - 1's merged model (round 1 from
  ``config.init_from``) for ``steps // rounds`` steps (the remainder in the
  last round), on its own data order.

  Raises:
    TrainError: ``round`` set by hand, or fewer steps than rounds.
  """
  if "round" in config.method_options:
    raise TrainError("--method_option round=... is set per round; give only rounds")
  rounds = method_options(get_method("losa"), config)["rounds"]
  if rounds < 1 or config.steps < rounds:
    raise TrainError(f"--method_option rounds={rounds} needs 1 <= rounds <= --steps="
                     f"{config.steps}")
  out, previous = [], config.init_from
  for t in range(1, rounds + 1):
    steps = config.steps // rounds + (config.steps % rounds if t == rounds else 0)
    round_config = config.replace(
        method_options={**config.method_options, "round": str(t)}, init_from=previous,
        steps=steps, warmup_steps=min(config.warmup_steps, steps),
        data_seed=config.data_seed + t - 1)
    round_dir = os.path.join(workdir, f"round_{t}")
    out.append((round_config, round_dir))
    previous = round_dir
  return out


# --------------------------------------------------------------------- accounting


def _kernel_nnz(params) -> dict[str, tuple[int, int, int]]:
  """path -> (m, n, nnz) of every 2-D leaf."""
  return {p: (*w.shape, int(jnp.count_nonzero(w))) for p, w in lora.flat(params).items()
          if np.ndim(w) == 2}


def finetune_footprint(config: TrainConfig, variables: dict,
                       costs: accounting.ByteCosts = accounting.ByteCosts()
                       ) -> tuple[accounting.Footprint, dict[str, Any]]:
  """(deployed params and bytes, extra numbers) of a fine-tuning run's
  ``TrainState.params`` ``variables``.

  LoRA: the merged dense model.  SALR: ``salr.footprint`` (bitmap base plus
  the fused adapter pair).  LoSA: the merged model with every adapted kernel
  stored sparse as a bitmap plus packed values, like SALR's base (the merge
  keeps the mask).  The extra numbers are the
  trainable adapter count and the sparsity of the adapted kernels.
  """
  name = config.method
  adapters = int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))
  frozen = _frozen(variables)
  targets = set(lora.flat(pairs(variables["params"])))
  if name == "salr":
    fp = salr.footprint(_salr_tree(variables), costs)
    base = frozen["base"]
  else:
    base = _APPLIES[name](variables, alpha=float(_options(config)["alpha"]))["params"]
    parts = []
    for path, w in lora.flat(base).items():
      if name == "losa" and path in targets:
        m, n, nnz = _kernel_nnz({path: w})[path]
        parts.append(accounting.sparse_footprint(m, n, nnz,
                                                 costs._replace(sparse_format="bitmap")))
      else:
        parts.append(accounting.dense_footprint(int(np.size(w)), costs.b_w))
    fp = accounting.total(*parts)
  shapes = _kernel_nnz({p: w for p, w in lora.flat(base).items() if p in targets})
  size = sum(m * n for m, n, _ in shapes.values())
  kept = sum(nnz for _, _, nnz in shapes.values())
  return fp, {"trainable_params": adapters,
              "sparsity": 1.0 - kept / size if size else 0.0}
