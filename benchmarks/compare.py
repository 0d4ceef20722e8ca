r"""Pretraining methods at matched parameter budgets, and fine-tuning methods
from one dense run: perplexity against parameters and bytes, over seeds.

    python -m benchmarks.compare --source=/path/to/tinyshakespeare.txt \
        --steps=300 --seeds=0,1,2 --out=/tmp/compare \
        --finetune_source='text:/usr/lib/python3.11/*.py' --finetune_steps=200

For every seed (``--seeds``; the seed of the initialisation, of SLTrain's
support and of the data order) the script trains dense, SALAAD, low-rank,
SLTrain, LOST and GaLore on ``--source`` for ``--steps`` steps with the
training harness, each in ``--out/runs/seed_<s>/<method>`` (whose
``summary.json`` it leaves).  The structured baselines run at the largest
rank whose parameter count stays within ``--budget_fraction`` of the dense
model's (``baselines.match_rank``); GaLore, which trains the dense model,
uses the low-rank method's rank.  SALAAD's controller drives every block to
the rank target r* at which its surrogate L + S fills the budget
(``baselines.match_rank_target``, density target ``--salaad_density_target``; or
``--salaad_rank_target``), so its trained size is near the budget; the same
run is then *deployed at the matched budget* exactly (global and HPA
allocation of its L, S; ``deploy.capacity_spectrum``), next to the
"no training" floor: the dense run split post hoc (truncated SVD + magnitude
pruning) and allocated the same way.  Bytes follow the §6 accounting (bf16
values, int32 indices, COO sparse parts).

Outputs in ``--out``:

* ``results.md`` (mean ± std over seeds of the validation perplexity, and
  the per-seed paired difference to dense, mean ± standard error),
  ``results.csv`` (one line per method and seed) and ``results.png``
  (perplexity against bytes);
* ``spectrum/``: the capacity spectrum of the first seed's SALAAD run at
  ``--spectrum_budgets`` with every baseline as a point
  (``spectrum.md``/``.csv``/``.json``/``.png``).

With ``--finetune_source``, every seed's dense run is then fine-tuned on
that text for ``--finetune_steps`` steps by every method of
``--finetune_methods``: full (dense AdamW on all weights), LoRA, SALR, LoSA
(its rounds in sequence) and SALAAD, each in
``--out/finetune/seed_<s>/<method>``, and ``finetune.md`` / ``.csv`` /
``.png`` list validation perplexity on the new text against trained and
deployed parameters, bytes and sparsity; the pretrained model before
fine-tuning is the first row.

Every run resumes from its workdir, so rerunning the same command after a
crash or a kill continues where it stopped and redoes no finished run.
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmarks import compare_tables as tables
from experiments import common
from salaad_jax.baselines import accounting, finetune, harness, match_rank, match_rank_target
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy import spectrum_report as report
from salaad_jax.train import TrainConfig, evaluate, make_eval_dataset
from salaad_jax.train.run import load_run
from salaad_jax.train.state import model_config

METHODS = ("dense", "salaad", "lowrank", "sltrain", "lost", "galore")
FINETUNE_METHODS = ("full", "lora", "salr", "losa", "salaad")

_SOURCE = flags.DEFINE_string("source", None, "training text: a file or glob, tfds:<name> "
                              "or synthetic[:...]", required=True)
_OUT = flags.DEFINE_string("out", "/tmp/salaad_compare", "output directory")
_STEPS = flags.DEFINE_integer("steps", 300, "training steps of every method", lower_bound=1)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds; every method is trained once per seed")
_MODEL = flags.DEFINE_string("model", "tiny", "model preset")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_BATCH = flags.DEFINE_integer("batch_size", 8, "batch size", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 64, "sequence length", lower_bound=2)
_LR = flags.DEFINE_float("lr", 3e-3, "peak learning rate", lower_bound=0.0)
_FRACTION = flags.DEFINE_float("budget_fraction", 0.5,
                               "parameter budget as a fraction of the dense model's",
                               lower_bound=0.0, upper_bound=1.0)
_DENSITY = flags.DEFINE_float("density", 0.03, "SLTrain / LOST density", lower_bound=0.0,
                              upper_bound=1.0)
_METHODS = flags.DEFINE_list("methods", list(METHODS), "methods to train")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 10, "validation batches", lower_bound=1)
_SPECTRUM = flags.DEFINE_list("spectrum_budgets", ["0.3", "0.4", "0.5", "0.6", "0.8", "1.0"],
                              "budgets (fractions of the dense parameters) of the first "
                              "seed's SALAAD capacity spectrum; those below the share of "
                              "the parameters outside the blocks are left out")
_SALAAD_RANK = flags.DEFINE_float("salaad_rank_target", None,
                                  "SALAAD's r*; unset: the r* at which its surrogate fills "
                                  "the budget (baselines.match_rank_target)",
                                  lower_bound=0.0, upper_bound=1.0)
_SALAAD_DENSITY = flags.DEFINE_float("salaad_density_target", 0.05, "SALAAD's d*",
                                     lower_bound=0.0, upper_bound=1.0)
_SALAAD_RHO = flags.DEFINE_float("salaad_rho", None, "SALAAD's rho (blocks and embedding); "
                                 "unset: 0.003 for the tiny model, the reference otherwise",
                                 lower_bound=0.0)
_FT_SOURCE = flags.DEFINE_string("finetune_source", "", "text to fine-tune the dense run "
                                 "on ('': no fine-tuning comparison)")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 200, "fine-tuning steps of every method",
                                 lower_bound=1)
_FT_LR = flags.DEFINE_float("finetune_lr", 1e-3, "peak fine-tuning learning rate")
_FT_METHODS = flags.DEFINE_list("finetune_methods", list(FINETUNE_METHODS),
                                "fine-tuning methods ('full': dense AdamW on all weights)")

# SALAAD settings of experiments/configs/tiny.flags (tuned for a few hundred
# steps of the tiny model on tinyshakespeare).
SALAAD_SHORT_RUN = dict(every_k=5, rho=0.003, rho_embed=0.003, rank_target=0.15,
                        density_target=0.05, k_alpha=1.0, k_beta=0.3, k_d=0.01,
                        deriv_start=1500, alpha_init="sigma_k", svt="fast")


def _check_seeds(values):
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise flags.ValidationError(f"must be integers, got {values}") from None
  if not seeds or len(set(seeds)) < len(seeds) or min(seeds) < 0:
    raise flags.ValidationError(f"must be distinct non-negative integers, got {values}")
  return True


def _check_budgets(values):
  try:
    ok = all(0.0 < float(v) <= 1.0 for v in values)
  except ValueError:
    ok = False
  if not ok:
    raise flags.ValidationError(f"must be fractions in (0, 1], got {values}")
  return True


def _check_subset(known):
  def check(values):
    unknown = sorted(set(values) - set(known))
    if unknown or not values:
      raise flags.ValidationError(f"unknown {unknown}; known {list(known)}")
    return True
  return check


flags.register_validator("seeds", _check_seeds)
flags.register_validator("spectrum_budgets", _check_budgets)
flags.register_validator("methods", _check_subset(METHODS))
flags.register_validator("finetune_methods", _check_subset(FINETUNE_METHODS))


def base_config(method: str, seed: int, **overrides) -> TrainConfig:
  """The shared run settings of every method."""
  steps = _STEPS.value
  base = dict(method=method, model=_MODEL.value, dtype=_DTYPE.value, source=_SOURCE.value,
              tokenizer="byte", seq_len=_SEQ.value, batch_size=_BATCH.value, steps=steps,
              lr=_LR.value, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
              schedule="cosine", log_every=max(1, steps // 5), eval_every=0,
              eval_batches=_EVAL_BATCHES.value, checkpoint_every=0, async_checkpoint=False,
              seed=seed, data_seed=seed)
  base.update(overrides)
  return TrainConfig(**base)


def _workdir(kind: str, seed: int, method: str) -> str:
  return os.path.join(_OUT.value, kind, f"seed_{seed}", method)


def salaad_settings(**overrides) -> dict:
  """SALAAD's TrainConfig fields: the tiny-model settings for ``tiny``, the
  --salaad_* flags, then ``overrides``."""
  settings = dict(SALAAD_SHORT_RUN) if _MODEL.value == "tiny" else {}
  settings["density_target"] = _SALAAD_DENSITY.value
  if _SALAAD_RHO.value is not None:
    settings.update(rho=_SALAAD_RHO.value, rho_embed=_SALAAD_RHO.value)
  settings.update(overrides)
  return settings


def run_method(method: str, rank, seed: int) -> dict:
  """Trains one method at one seed (``rank``: the baselines' rank, SALAAD's
  r*); returns its run row."""
  wd = _workdir("runs", seed, method)
  options, overrides = {}, {}
  if method in ("lowrank", "sltrain", "lost", "galore"):
    options["rank"] = str(rank)
  if method in ("sltrain", "lost"):
    options["density"] = str(_DENSITY.value)
  if method == "galore":
    options["update_proj_gap"] = str(max(10, _STEPS.value // 10))
  if method == "salaad":
    overrides = salaad_settings(rank_target=rank)
  config = base_config(method, seed, method_options=options, **overrides)
  result = common.train(config, wd)
  summary = common.write_summary(wd, result)
  shown = f"r* {rank:.3f}" if method == "salaad" else rank if options.get("rank") else ""
  return {"method": method, "seed": seed, "rank": shown,
          "x_perplexity": result["eval_perplexity"] if method == "salaad" else None,
          "steps": result["step"], "wall_s": result["wall_time_sec"],
          "params": summary["params"], "bytes": summary["bytes"],
          "perplexity": summary["perplexity"], "workdir": wd}


def deployed_rows(seed: int, target: int, dirs: dict[str, str], curve: list[float]) -> list:
  """SALAAD's run of ``seed`` deployed at ``target`` parameters (global and
  HPA), with the post-hoc split of the dense run (of its own X without a
  dense run) at the same budget; run rows.  With ``curve`` budgets the
  whole spectrum, with the other methods' summaries as points, goes to
  ``--out/spectrum``."""
  baselines = [dirs[m] for m in dirs if m not in ("dense", "salaad")] if curve else []
  try:
    rows = sp.capacity_spectrum(dirs["salaad"], [target, *curve], methods=("global", "hpa"),
                                dense_workdir=dirs.get("dense"), baseline_workdirs=baselines,
                                progress=lambda line: print(line, flush=True))
  except sp.SpectrumError as e:
    common.fail(str(e))
  if curve:
    out = os.path.join(_OUT.value, "spectrum")
    paths = report.write_table(rows, out)
    report.plot(rows, os.path.join(out, "spectrum.png"),
                title=f"{_MODEL.value}, seed {seed}, {_STEPS.value} steps (coo, bf16)")
    print(f"wrote {paths['md']}", flush=True)
  return [{"method": f"{r['series']} @ {_FRACTION.value:g}", "seed": seed, "rank": "",
           "x_perplexity": None, "steps": r["step"], "wall_s": None, "params": r["params"],
           "bytes": r["bytes"], "perplexity": r["perplexity"], "workdir": r["workdir"]}
          for r in rows if r.get("budget_value") == target and r["source"] != "baseline"]


def _finetune_row(name: str, seed: int, summary: dict, wall: float) -> dict:
  extra = summary.get("extra", {})
  # Full fine-tuning and SALAAD train every weight.
  trainable = extra.get("trainable_params", summary["dense_params"])
  return {"method": name, "seed": seed, "params": summary["params"],
          "bytes": summary["bytes"], "perplexity": summary["perplexity"],
          "sparsity": summary.get("sparsity"), "trainable": trainable, "wall_s": wall}


def run_finetune(method: str, seed: int, init_wd: str) -> dict:
  """Fine-tunes the dense run ``init_wd`` with ``method`` on
  ``--finetune_source``; returns its run row."""
  wd = _workdir("finetune", seed, method)
  steps = _FT_STEPS.value
  overrides = dict(source=_FT_SOURCE.value, steps=steps, lr=_FT_LR.value,
                   warmup_steps=max(1, steps // 20), init_from=os.path.abspath(init_wd),
                   log_every=max(1, steps // 5))
  if method == "salaad":
    overrides.update(salaad_settings())
  config = base_config("dense" if method == "full" else method, seed, **overrides)
  runs = finetune.losa_rounds(config, wd) if method == "losa" else [(config, wd)]
  wall = 0.0
  for run_config, run_wd in runs:
    result = common.train(run_config, run_wd)
    wall += result["wall_time_sec"]
  summary = common.write_summary(run_wd, result)
  return _finetune_row(method, seed, summary, wall)


def pretrained_row(seed: int, init_wd: str) -> dict:
  """The dense run before fine-tuning, evaluated on the fine-tuning text."""
  run = load_run(init_wd)
  config = run.config.replace(source=_FT_SOURCE.value)
  res = evaluate(run.model, run.params, make_eval_dataset(config), _EVAL_BATCHES.value)
  fp = harness.run_footprint(run.config)
  return {"method": "pretrained (no fine-tuning)", "seed": seed, "params": fp.params,
          "bytes": fp.bytes, "perplexity": res["perplexity"], "sparsity": None,
          "trainable": 0, "wall_s": 0.0}


def _seeds_text() -> str:
  seeds = _SEEDS.value
  return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(seeds)})"


def _optional(fmt: str):
  return lambda v: "" if v is None else format(v, fmt)


def write_outputs(runs: list[dict], dense_params: int, target: int) -> str:
  """results.md / .csv / .png in ``--out``; returns the markdown table."""
  out = _OUT.value
  tables.write_csv(os.path.join(out, "results.csv"), runs,
                   ["method", "seed", "rank", "params", "bytes", "perplexity", "x_perplexity",
                    "wall_s"])
  rows = tables.aggregate(runs)
  header = (f"Model `{_MODEL.value}`, {_STEPS.value} steps of {_BATCH.value}x{_SEQ.value} "
            f"tokens on `{os.path.basename(_SOURCE.value)}`, {_seeds_text()}; parameter "
            f"budget {target:,} ({_FRACTION.value:g} x dense {dense_params:,}).")
  columns = [
      ("method", "", lambda r: r["method"]),
      ("rank", ":", lambda r: r["rank"]),
      ("params", ":", lambda r: f"{r['params']:,}"),
      ("params / dense", ":", lambda r: f"{r['params'] / dense_params:.3f}"),
      ("bytes", ":", lambda r: f"{r['bytes']:,}"),
      ("val. perplexity", ":", lambda r: tables.ppl_cell(r) + (
          f" (X: {r['x_perplexity']:.3f})" if r.get("x_perplexity") else "")),
      ("vs dense (paired)", ":", tables.delta_cell),
      ("time (s)", ":", lambda r: _optional(".0f")(r["wall_s"])),
  ]
  table = tables.markdown(header, columns, rows)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  tables.scatter_plot(rows, os.path.join(out, "results.png"),
                      f"{_MODEL.value}, {_STEPS.value} steps, budget {_FRACTION.value:g} x "
                      f"dense, {_seeds_text()}")
  return table


def write_finetune_outputs(runs: list[dict], dense_params: int) -> str:
  """finetune.md / .csv / .png in ``--out``; returns the markdown table."""
  out = _OUT.value
  tables.write_csv(os.path.join(out, "finetune.csv"), runs,
                   ["method", "seed", "trainable", "params", "bytes", "sparsity",
                    "perplexity", "wall_s"])
  rows = tables.aggregate(runs, reference="full")
  header = (f"Model `{_MODEL.value}` pretrained (dense, {_STEPS.value} steps) on "
            f"`{os.path.basename(_SOURCE.value)}`, fine-tuned {_FT_STEPS.value} steps of "
            f"{_BATCH.value}x{_SEQ.value} tokens on `{_FT_SOURCE.value}`, {_seeds_text()}; "
            "validation perplexity on the fine-tuning text.")
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
                      f"fine-tuning {_MODEL.value}, {_FT_STEPS.value} steps, {_seeds_text()}")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  methods = [m for m in METHODS if m in _METHODS.value]
  if _FT_SOURCE.value and "dense" not in methods:
    common.fail("--finetune_source fine-tunes the dense run: keep dense in --methods")
  seeds = [int(s) for s in _SEEDS.value]
  probe = base_config("dense", seeds[0], vocab_size=256)
  mcfg = model_config(probe)
  dense_params = int(harness.run_footprint(probe).params)
  rest = accounting.model_blocks(mcfg).rest / dense_params
  if "salaad" in methods and _FRACTION.value < rest:
    common.fail(f"--budget_fraction={_FRACTION.value:g} is below the share of the "
                f"parameters outside the blocks ({rest:.3f}); SALAAD cannot be deployed "
                "that small")
  curve = [float(b) for b in _SPECTRUM.value if float(b) >= rest]
  target = int(_FRACTION.value * dense_params)
  try:
    lowrank_rank = match_rank("lowrank", mcfg, target)
    ranks = {"lowrank": lowrank_rank, "galore": lowrank_rank,
             "sltrain": match_rank("sltrain", mcfg, target, density=_DENSITY.value),
             "lost": match_rank("lost", mcfg, target, density=_DENSITY.value),
             "salaad": _SALAAD_RANK.value}
    if ranks["salaad"] is None:
      ranks["salaad"] = match_rank_target(mcfg, target, _SALAAD_DENSITY.value)
  except ValueError as e:
    common.fail(f"--budget_fraction={_FRACTION.value:g}: {e}")
  os.makedirs(_OUT.value, exist_ok=True)

  runs = []
  for i, seed in enumerate(seeds):
    dirs = {}
    for method in methods:
      rank = ranks.get(method)
      what = ("" if rank is None else f" (r* {rank:.3f})" if method == "salaad"
              else f" (rank {rank})")
      print(f"== seed {seed}: {method}{what}", flush=True)
      runs.append(run_method(method, rank, seed))
      dirs[method] = runs[-1]["workdir"]
    if "salaad" in dirs:
      print(f"== seed {seed}: SALAAD deployed at {target:,} params", flush=True)
      after = next(j for j, r in enumerate(runs)
                   if r["seed"] == seed and r["method"] == "salaad") + 1
      runs[after:after] = deployed_rows(seed, target, dirs, curve if i == 0 else [])
  print(write_outputs(runs, dense_params, target), flush=True)

  if _FT_SOURCE.value:
    ft_runs = []
    for seed in seeds:
      init_wd = _workdir("runs", seed, "dense")
      ft_runs.append(pretrained_row(seed, init_wd))
      for method in [m for m in FINETUNE_METHODS if m in _FT_METHODS.value]:
        print(f"== seed {seed}: fine-tune {method}", flush=True)
        ft_runs.append(run_finetune(method, seed, init_wd))
    print(write_finetune_outputs(ft_runs, dense_params), flush=True)


if __name__ == "__main__":
  app.run(main)
