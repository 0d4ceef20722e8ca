"""The fine-tuning part of ``benchmarks.compare``: every seed's dense run
fine-tuned on ``--finetune_source`` by every method of
``--finetune_methods`` (full = dense AdamW on all weights, LoRA, SALR, LoSA
with its rounds in sequence, SALAAD), each in
``<out>/finetune/seed_<s>/<method>``; ``finetune.md`` / ``.csv`` / ``.png``
list validation perplexity on the new text against trained and deployed
parameters, bytes and sparsity, with the paired difference to full
fine-tuning; the pretrained model before fine-tuning is the first row."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from absl import flags

from benchmarks import compare_tables as tables
from experiments import common
from salaad_jax.baselines import finetune, harness
from salaad_jax.train import evaluate, make_eval_dataset
from salaad_jax.train.run import load_run

FINETUNE_METHODS = ("full", "lora", "salr", "losa", "salaad")

SOURCE = flags.DEFINE_string("finetune_source", "", "text to fine-tune the dense run "
                             "on ('': no fine-tuning comparison)")
STEPS = flags.DEFINE_integer("finetune_steps", 200, "fine-tuning steps of every method",
                             lower_bound=1)
LR = flags.DEFINE_float("finetune_lr", 1e-3, "peak fine-tuning learning rate")
METHODS = flags.DEFINE_list("finetune_methods", list(FINETUNE_METHODS),
                            "fine-tuning methods ('full': dense AdamW on all weights)")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the pretraining comparison hands over: its config factory
  (method, seed, **overrides), workdir (kind, seed, name), SALAAD settings,
  output directory, validation batches and the table's header parts."""

  base_config: Callable
  workdir: Callable[[str, int, str], str]
  salaad_settings: Callable[[], dict]
  out: str
  eval_batches: int
  pretrained: str
  tokens: str
  seeds: str
  model: str


def _finetune_row(name: str, seed: int, summary: dict, wall: float) -> dict:
  extra = summary.get("extra", {})
  # Full fine-tuning and SALAAD train every weight.
  trainable = extra.get("trainable_params", summary["dense_params"])
  return {"method": name, "seed": seed, "params": summary["params"],
          "bytes": summary["bytes"], "perplexity": summary["perplexity"],
          "sparsity": summary.get("sparsity"), "trainable": trainable, "wall_s": wall}


def run_finetune(setup: Setup, method: str, seed: int, init_wd: str) -> dict:
  """Fine-tunes the dense run ``init_wd`` with ``method`` on
  ``--finetune_source``; returns its run row."""
  wd = setup.workdir("finetune", seed, method)
  steps = STEPS.value
  overrides = dict(source=SOURCE.value, steps=steps, lr=LR.value,
                   warmup_steps=max(1, steps // 20), init_from=os.path.abspath(init_wd),
                   log_every=max(1, steps // 5))
  if method == "salaad":
    overrides.update(setup.salaad_settings())
  config = setup.base_config("dense" if method == "full" else method, seed, **overrides)
  runs = finetune.losa_rounds(config, wd) if method == "losa" else [(config, wd)]
  wall = 0.0
  for run_config, run_wd in runs:
    result = common.train(run_config, run_wd)
    wall += result["wall_time_sec"]
  summary = common.write_summary(run_wd, result)
  return _finetune_row(method, seed, summary, wall)


def pretrained_row(setup: Setup, seed: int, init_wd: str) -> dict:
  """The dense run before fine-tuning, evaluated on the fine-tuning text."""
  run = load_run(init_wd)
  config = run.config.replace(source=SOURCE.value)
  res = evaluate(run.model, run.params, make_eval_dataset(config), setup.eval_batches)
  fp = harness.run_footprint(run.config)
  return {"method": "pretrained (no fine-tuning)", "seed": seed, "params": fp.params,
          "bytes": fp.bytes, "perplexity": res["perplexity"], "sparsity": None,
          "trainable": 0, "wall_s": 0.0}


def _optional(fmt: str):
  return lambda v: "" if v is None else format(v, fmt)


def write_finetune_outputs(setup: Setup, runs: list[dict], dense_params: int) -> str:
  """finetune.md / .csv / .png in ``setup.out``; returns the markdown table."""
  out = setup.out
  tables.write_csv(os.path.join(out, "finetune.csv"), runs,
                   ["method", "seed", "trainable", "params", "bytes", "sparsity",
                    "perplexity", "wall_s"])
  rows = tables.aggregate(runs, reference="full")
  header = (f"{setup.pretrained}, fine-tuned {STEPS.value} steps of {setup.tokens} tokens on "
            f"`{SOURCE.value}`, {setup.seeds}; validation perplexity on the fine-tuning "
            "text.")
  columns = [
      ("method", "", lambda r: r["method"]),
      ("trained params", ":", lambda r: f"{r['trainable']:,}"),
      ("deployed params", ":", lambda r: f"{r['params']:,}"),
      ("params / dense", ":", lambda r: f"{r['params'] / dense_params:.3f}"),
      ("bytes", ":", lambda r: f"{r['bytes']:,}"),
      ("sparsity", ":", lambda r: _optional(".3f")(r["sparsity"])),
      ("val. perplexity", ":", tables.ppl_cell),
      ("vs full (paired)", ":", tables.delta_cell),
      ("time (s)", ":", lambda r: f"{r['wall_s']:.0f}"),
  ]
  table = tables.markdown(header, columns, rows)
  with open(os.path.join(out, "finetune.md"), "w") as f:
    f.write(table)
  tables.scatter_plot(rows, os.path.join(out, "finetune.png"),
                      f"fine-tuning {setup.model}, {STEPS.value} steps, {setup.seeds}")
  return table


def compare_finetuning(setup: Setup, seeds: list[int], dense_params: int) -> str:
  """Fine-tunes every seed's dense run with every method; the markdown table."""
  runs = []
  for seed in seeds:
    init_wd = setup.workdir("runs", seed, "dense")
    runs.append(pretrained_row(setup, seed, init_wd))
    for method in [m for m in FINETUNE_METHODS if m in METHODS.value]:
      print(f"== seed {seed}: fine-tune {method}", flush=True)
      runs.append(run_finetune(setup, method, seed, init_wd))
  return write_finetune_outputs(setup, runs, dense_params)
