r"""Pretraining methods at matched parameter budgets: perplexity vs bytes.

Trains dense, SALAAD, low-rank, SLTrain, LOST and GaLore on one data source
for the same number of steps with the training harness, the structured
methods at the largest rank whose parameter count stays within
``--budget_fraction`` of the dense model's (``baselines.match_rank``; GaLore,
which trains the dense model, uses the low-rank method's rank), and writes
into ``--out``: ``results.md`` (a markdown table), ``results.csv`` and
``results.png`` (validation perplexity vs deployment bytes).  Each run's
workdir (``--out/runs/<method>``) holds its ``summary.json``.

Bytes follow the §6 accounting (bf16 values, int32 indices, COO sparse
parts).  SALAAD is deployed as its surrogate L + S (rank and nonzeros of the
final per-block surrogates) and evaluated as such; its dense iterate X is
listed too.

With ``--finetune_source``, the dense run is then fine-tuned on that text for
``--finetune_steps`` steps by every method of ``--finetune_methods``: full
(dense AdamW on all weights), LoRA, SALR, LoSA (its rounds in sequence) and
SALAAD, each in ``--out/finetune/<method>``, and ``finetune.md`` / ``.csv`` /
``.png`` list validation perplexity on the new text against deployed params,
bytes and sparsity; the pretrained model before fine-tuning is the first row.

    python -m benchmarks.compare --source=/work/shared/data/tinyshakespeare.txt \
        --steps=300 --out=/tmp/compare \
        --finetune_source='text:/usr/lib/python3.11/*.py' --finetune_steps=200
"""

from __future__ import annotations

import csv
import os

from absl import app, flags

from experiments import common
from salaad_jax.baselines import finetune, harness, match_rank
from salaad_jax.train import TrainConfig, evaluate, make_eval_dataset, train_and_evaluate
from salaad_jax.train import config as cfg_lib
from salaad_jax.train.run import load_run
from salaad_jax.train.state import model_config

METHODS = ("dense", "salaad", "lowrank", "sltrain", "lost", "galore")
FINETUNE_METHODS = ("full", "lora", "salr", "losa", "salaad")

_SOURCE = flags.DEFINE_string("source", "/work/shared/data/tinyshakespeare.txt",
                              "training text (or a synthetic: source)")
_OUT = flags.DEFINE_string("out", "/tmp/salaad_compare", "output directory")
_STEPS = flags.DEFINE_integer("steps", 300, "training steps of every method")
_MODEL = flags.DEFINE_string("model", "tiny", "model preset")
_BATCH = flags.DEFINE_integer("batch_size", 8, "batch size")
_SEQ = flags.DEFINE_integer("seq_len", 64, "sequence length")
_LR = flags.DEFINE_float("lr", 3e-3, "peak learning rate")
_FRACTION = flags.DEFINE_float("budget_fraction", 0.5,
                               "parameter budget as a fraction of the dense model's")
_DENSITY = flags.DEFINE_float("density", 0.03, "SLTrain / LOST density")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "methods to train")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 10, "validation batches")
_FT_SOURCE = flags.DEFINE_string("finetune_source", "", "text to fine-tune the dense run "
                                 "on ('': no fine-tuning comparison)")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 200, "fine-tuning steps of every method")
_FT_LR = flags.DEFINE_float("finetune_lr", 1e-3, "peak fine-tuning learning rate")
_FT_METHODS = flags.DEFINE_list("finetune_methods", list(FINETUNE_METHODS),
                                "fine-tuning methods ('full': dense AdamW on all weights)")

# SALAAD settings of experiments/configs/tiny.flags (tuned for a few hundred
# steps of the tiny model on tinyshakespeare).
SALAAD_SHORT_RUN = dict(every_k=5, rho=0.003, rho_embed=0.003, rank_target=0.15,
                        density_target=0.05, k_alpha=1.0, k_beta=0.3, k_d=0.01,
                        deriv_start=1500, alpha_init="sigma_k", svt="fast")


def base_config(method: str, **overrides) -> TrainConfig:
  """The shared run settings of every method."""
  steps = _STEPS.value
  base = dict(method=method, model=_MODEL.value, dtype="float32", source=_SOURCE.value,
              tokenizer="byte", seq_len=_SEQ.value, batch_size=_BATCH.value, steps=steps,
              lr=_LR.value, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
              schedule="cosine", log_every=max(1, steps // 5), eval_every=0,
              eval_batches=_EVAL_BATCHES.value, checkpoint_every=0, async_checkpoint=False)
  base.update(overrides)
  return TrainConfig(**base)


def run_method(method: str, rank: int) -> dict:
  """Trains one method in ``--out/runs/<method>``; returns its table row."""
  wd = os.path.join(_OUT.value, "runs", method)
  options = {}
  overrides = {}
  if method in ("lowrank", "sltrain", "lost", "galore"):
    options["rank"] = str(rank)
  if method in ("sltrain", "lost"):
    options["density"] = str(_DENSITY.value)
  if method == "galore":
    options["update_proj_gap"] = str(max(10, _STEPS.value // 10))
  if method == "salaad" and _MODEL.value == "tiny":
    overrides = dict(SALAAD_SHORT_RUN)
  config = base_config(method, method_options=options, **overrides)
  result = train_and_evaluate(config, wd)
  summary = harness.write_run_summary(cfg_lib.read_config(wd), wd, result)
  return {"method": method, "rank": rank if options.get("rank") else "",
          "x_perplexity": result["eval_perplexity"], "steps": result["step"],
          "wall_s": result["wall_time_sec"], "params": summary["params"],
          "bytes": summary["bytes"], "perplexity": summary["perplexity"]}


def _finetune_row(name: str, summary: dict, wall: float) -> dict:
  extra = summary.get("extra", {})
  # Full fine-tuning and SALAAD train every weight.
  trainable = extra.get("trainable_params", summary["dense_params"])
  return {"method": name, "params": summary["params"], "bytes": summary["bytes"],
          "perplexity": summary["perplexity"], "sparsity": summary.get("sparsity"),
          "trainable": trainable, "wall_s": wall}


def run_finetune(method: str, init_wd: str) -> dict:
  """Fine-tunes the dense run ``init_wd`` with ``method`` on
  ``--finetune_source`` in ``--out/finetune/<method>``; returns its row."""
  wd = os.path.join(_OUT.value, "finetune", method)
  steps = _FT_STEPS.value
  overrides = dict(source=_FT_SOURCE.value, steps=steps, lr=_FT_LR.value,
                   warmup_steps=max(1, steps // 20), init_from=os.path.abspath(init_wd),
                   log_every=max(1, steps // 5))
  if method == "salaad" and _MODEL.value == "tiny":
    overrides.update(SALAAD_SHORT_RUN)
  config = base_config("dense" if method == "full" else method, **overrides)
  runs = (finetune.losa_rounds(config, wd) if method == "losa" else [(config, wd)])
  wall = 0.0
  for run_config, run_wd in runs:
    result = train_and_evaluate(run_config, run_wd)
    wall += result["wall_time_sec"]
  summary = harness.write_run_summary(cfg_lib.read_config(run_wd), run_wd, result)
  return _finetune_row(method, summary, wall)


def pretrained_row(init_wd: str) -> dict:
  """The dense run before fine-tuning, evaluated on the fine-tuning text."""
  run = load_run(init_wd)
  config = run.config.replace(source=_FT_SOURCE.value)
  res = evaluate(run.model, run.params, make_eval_dataset(config), _EVAL_BATCHES.value)
  fp = harness.run_footprint(run.config)
  return {"method": "pretrained (no fine-tuning)", "params": fp.params, "bytes": fp.bytes,
          "perplexity": res["perplexity"], "sparsity": None, "trainable": 0, "wall_s": 0.0}


def write_finetune_outputs(rows: list[dict], dense_params: int) -> str:
  """finetune.md / .csv / .png in ``--out``; returns the markdown table."""
  out = _OUT.value
  write_csv(os.path.join(out, "finetune.csv"), rows,
            ["method", "trainable", "params", "bytes", "sparsity", "perplexity", "wall_s"])
  lines = [f"Model `{_MODEL.value}` pretrained (dense, {_STEPS.value} steps) on "
           f"`{os.path.basename(_SOURCE.value)}`, fine-tuned {_FT_STEPS.value} steps of "
           f"{_BATCH.value}x{_SEQ.value} tokens on `{_FT_SOURCE.value}`; validation "
           "perplexity on the fine-tuning text.",
           "",
           "| method | trained params | deployed params | params / dense | bytes | sparsity "
           "| val. perplexity | time (s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['trainable']:,} | {r['params']:,} | "
                 f"{r['params'] / dense_params:.3f} | {r['bytes']:,} | "
                 f"{'' if r['sparsity'] is None else format(r['sparsity'], '.3f')} | "
                 f"{r['perplexity']:.3f} | {r['wall_s']:.0f} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(out, "finetune.md"), "w") as f:
    f.write(table)
  scatter_plot(rows, os.path.join(out, "finetune.png"),
               f"fine-tuning {_MODEL.value}, {_FT_STEPS.value} steps")
  return table


def write_csv(path: str, rows: list[dict], keys: list[str]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def scatter_plot(rows: list[dict], path: str, title: str) -> None:
  """Validation perplexity against deployment bytes, one labelled point per row."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for r in rows:
    ax.scatter(r["bytes"], r["perplexity"])
    ax.annotate(r["method"], (r["bytes"], r["perplexity"]), textcoords="offset points",
                xytext=(4, 4))
  ax.set_xlabel("deployment bytes")
  ax.set_ylabel("validation perplexity")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_outputs(rows: list[dict], dense_params: int, target: int) -> str:
  """results.md / .csv / .png in ``--out``; returns the markdown table."""
  out = _OUT.value
  write_csv(os.path.join(out, "results.csv"), rows,
            ["method", "rank", "params", "bytes", "perplexity", "x_perplexity", "wall_s"])
  lines = [f"Model `{_MODEL.value}`, {_STEPS.value} steps of {_BATCH.value}x{_SEQ.value} "
           f"tokens on `{os.path.basename(_SOURCE.value)}`; parameter budget "
           f"{target:,} ({_FRACTION.value:g} x dense {dense_params:,}).",
           "",
           "| method | rank | params | params / dense | bytes | val. perplexity | time (s) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ppl = f"{r['perplexity']:.3f}"
    if r["method"] == "salaad":
      ppl += f" (X: {r['x_perplexity']:.3f})"
    lines.append(f"| {r['method']} | {r['rank']} | {r['params']:,} | "
                 f"{r['params'] / dense_params:.3f} | {r['bytes']:,} | {ppl} | "
                 f"{r['wall_s']:.0f} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  scatter_plot(rows, os.path.join(out, "results.png"),
               f"{_MODEL.value}, {_STEPS.value} steps, budget {_FRACTION.value:g} x dense")
  return table


def main(argv):
  del argv
  common.quiet_logging()
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; known {list(METHODS)}")
  unknown = sorted(set(_FT_METHODS.value) - set(FINETUNE_METHODS))
  if unknown:
    raise app.UsageError(f"--finetune_methods: unknown {unknown}; known "
                         f"{list(FINETUNE_METHODS)}")
  if _FT_SOURCE.value and "dense" not in _METHODS.value:
    raise app.UsageError("--finetune_source fine-tunes the dense run: keep dense in --methods")
  os.makedirs(_OUT.value, exist_ok=True)
  probe = base_config("dense", vocab_size=256)
  mcfg = model_config(probe)
  dense_params = int(harness.run_footprint(probe).params)
  target = int(_FRACTION.value * dense_params)
  lowrank_rank = match_rank("lowrank", mcfg, target)
  ranks = {"lowrank": lowrank_rank, "galore": lowrank_rank,
           "sltrain": match_rank("sltrain", mcfg, target, density=_DENSITY.value),
           "lost": match_rank("lost", mcfg, target, density=_DENSITY.value)}
  rows = []
  for method in [m for m in METHODS if m in _METHODS.value]:
    print(f"== {method} (rank {ranks.get(method, '-')})", flush=True)
    rows.append(run_method(method, ranks.get(method, 0)))
  print(write_outputs(rows, dense_params, target), flush=True)
  if _FT_SOURCE.value:
    init_wd = os.path.join(_OUT.value, "runs", "dense")
    ft_rows = [pretrained_row(init_wd)]
    for method in [m for m in FINETUNE_METHODS if m in _FT_METHODS.value]:
      print(f"== fine-tune: {method}", flush=True)
      ft_rows.append(run_finetune(method, init_wd))
    print(write_finetune_outputs(ft_rows, dense_params), flush=True)


if __name__ == "__main__":
  app.run(main)
