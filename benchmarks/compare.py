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

    python -m benchmarks.compare --source=/work/shared/data/tinyshakespeare.txt \
        --steps=300 --out=/tmp/compare
"""

from __future__ import annotations

import csv
import os

from absl import app, flags

import jax
import numpy as np

import salaad_jax as sj
from salaad_jax.baselines import accounting, harness, match_rank
from salaad_jax.deploy import accounting as deploy_accounting
from salaad_jax.train import TrainConfig, train_and_evaluate
from salaad_jax.train import config as cfg_lib
from salaad_jax.train.run import load_run
from salaad_jax.train.state import model_config

METHODS = ("dense", "salaad", "lowrank", "sltrain", "lost", "galore")

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


def salaad_footprint(workdir: str) -> accounting.Footprint:
  """(params, bytes) of SALAAD's final surrogate L + S: per block
  (m + n) rank + nnz values (COO, bf16), the rest dense."""
  run = load_run(workdir)
  factors = sj.low_rank_factors(run.opt_state)
  sparse = sj.sparse_parts(run.opt_state)
  total = sum(int(x.size) for x in jax.tree.leaves(run.params))
  b_w = accounting.ByteCosts().b_w
  params, nbytes, block_total = 0, 0, 0
  for path, f in factors.items():
    m, n = int(f.u.shape[0]), int(f.v.shape[0])
    rank = int(np.sum(np.asarray(f.s) > 0))
    nnz = int(np.count_nonzero(np.asarray(sparse[path])))
    block_total += m * n
    params += deploy_accounting.block_params(m, n, rank, nnz)
    nbytes += deploy_accounting.block_bytes("coo", m, n, rank, nnz, b_w)
  rest = total - block_total
  return accounting.Footprint(rest + params, rest * b_w + nbytes)


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
  resolved = cfg_lib.read_config(wd)
  row = {"method": method, "rank": rank if options.get("rank") else "",
         "x_perplexity": result["eval_perplexity"], "steps": result["step"],
         "wall_s": result["wall_time_sec"]}
  if method == "salaad":
    fp = salaad_footprint(wd)
    ppl = result["eval_surrogate/perplexity"]
    sj_summary = dict(method=method, params=int(fp.params), bytes=int(fp.bytes),
                      perplexity=float(ppl), step=int(result["step"]),
                      extra={"dense_iterate_perplexity": result["eval_perplexity"]})
    from salaad_jax.deploy.summary import write_summary  # pylint: disable=import-outside-toplevel
    write_summary(wd, **sj_summary)
    row.update(params=int(fp.params), bytes=int(fp.bytes), perplexity=float(ppl))
  else:
    s = harness.write_run_summary(resolved, wd, result)
    row.update(params=s["params"], bytes=s["bytes"], perplexity=s["perplexity"])
  return row


def write_outputs(rows: list[dict], dense_params: int, target: int) -> str:
  """results.md / .csv / .png in ``--out``; returns the markdown table."""
  out = _OUT.value
  keys = ["method", "rank", "params", "bytes", "perplexity", "x_perplexity", "wall_s"]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
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
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["bytes"], r["perplexity"])
    ax.annotate(r["method"], (r["bytes"], r["perplexity"]), textcoords="offset points",
                xytext=(4, 4))
  ax.set_xlabel("deployment bytes")
  ax.set_ylabel("validation perplexity")
  ax.set_title(f"{_MODEL.value}, {_STEPS.value} steps, budget {_FRACTION.value:g} x dense")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "results.png"), dpi=120)
  plt.close(fig)
  return table


def main(argv):
  del argv
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; known {list(METHODS)}")
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


if __name__ == "__main__":
  app.run(main)
