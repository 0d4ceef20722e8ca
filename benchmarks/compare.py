r"""One SALAAD run against baselines trained for each memory budget, and
fine-tuning methods from one dense run: perplexity against bytes, over seeds.

    python -m benchmarks.compare --source=/path/to/tinyshakespeare.txt \
        --seeds=0,1,2 --steps=1000 --budgets=0.4,0.5,0.6 --unit=bytes \
        --out=/tmp/compare

For every seed (``--seeds``; the seed of the initialisation, of SLTrain's
support and of the data order) the script trains, on ``--source`` for
``--steps`` steps with the training harness, ONE dense and ONE SALAAD run,
and for every budget of ``--budgets`` (fractions of the dense model in
``--unit``: parameters, or deployment bytes with bf16 values and int32
indices) low-rank, SLTrain and LOST *at that budget*: the largest global
rank whose model fits, counted by the method's own accounting
(``benchmarks.compare_budgets``; GaLore, with ``--methods`` naming it,
trains the dense model at the low-rank rank).  Runs live in
``--out/runs/seed_<s>/<method>`` (baselines ``<method>_r<rank>``) with
their ``summary.json``.  The SALAAD run is then *deployed at every budget*
(the global allocation of its L, S priced in the same units,
``deploy.capacity_spectrum``), next to the "no training" floor: the dense
run split post hoc (truncated SVD + magnitude pruning at SALAAD's r*, d*)
and allocated the same way.

Sparse storage (``--sparse_format``): one format for a whole model.  'auto'
(the default) lets each model take the best of COO / CSR / bitmap: a
baseline the one admitting the largest rank, a SALAAD or post-hoc
deployment the one whose allocation keeps the smallest error (a property
of the spectra, not of validation data).  SALAAD's rank target r* is the one
at which its surrogate fills one of the budgets (``--salaad_fill``: the
middle one with the recommended preset, the largest otherwise;
``compare_budgets.salaad_rank_target``) unless ``--salaad_rank_target`` or
``--salaad_option=rank_target=...`` sets it; its other settings are
``--salaad_preset``'s (default ``recommended``, the project's measured best:
the authors' controller for the first 1 % of training chooses the
structure, then the surrogate is trained in its own factors; ``reference``
the authors' settings; ``short`` this command's earlier settings,
``SALAAD_SHORT_RUN``), the ``--salaad_*`` flags, then ``--salaad_option
key=value`` (any TrainConfig field, SALAAD's pretraining run only).  With
consolidation in factors the run also trains the cuts it will be deployed
at (``--salaad_cuts``, default ``budgets`` with the recommended preset:
each step the global allocator's cut at one of the ``--budgets`` below the
one its structure fills, or the whole structure, drawn equally often;
``--consolidate_cut_budgets``).

Outputs in ``--out``:

* ``results.csv``: one line per (method, seed, budget): ``dense`` and
  ``salaad_trained`` (the surrogate at its trained size; ``x_perplexity`` its
  dense iterate X) have an empty budget; ``salaad`` (deployed), ``sltrain``,
  ``lowrank``, ``lost``, ``galore`` and ``posthoc`` one line per budget.
  ``rank`` is a baseline's global rank (SALAAD's r* on its trained row),
  ``kept_rank`` / ``kept_nnz`` a deployment's total over the blocks,
  ``format`` the sparse storage the bytes are counted in;
* ``results.md``: mean ± std over seeds per method and budget, the paired
  difference to dense and SALAAD's paired difference to each method at the
  same budget (mean ± standard error over seeds);
* ``results.png``: perplexity against bytes, SALAAD one curve, every other
  method points;
* ``spectrum/`` (with ``--spectrum_budgets``): the first seed's SALAAD
  capacity spectrum (global and HPA) with the baselines as points.

With ``--finetune_source``, every seed's dense run is then fine-tuned on
that text for ``--finetune_steps`` steps by every method of
``--finetune_methods``: full (dense AdamW on all weights), LoRA, SALR, LoSA
(its rounds in sequence) and SALAAD, each in
``--out/finetune/seed_<s>/<method>``, and ``finetune.md`` / ``.csv`` /
``.png`` list validation perplexity on the new text against trained and
deployed parameters, bytes and sparsity; the pretrained model before
fine-tuning is the first row.

Every run resumes from its workdir, so rerunning the same command after a
crash or a kill continues where it stopped and redoes no finished run (the
deployments are re-evaluated, which takes seconds).
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmarks import compare_budgets as budgets_lib
from benchmarks import compare_finetune as ft
from benchmarks import compare_tables as tables
from experiments import common
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy import spectrum_report as report
from salaad_jax.deploy.summary import write_summary as write_point
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import config as config_lib
from salaad_jax.train import presets
from salaad_jax.train.flags import parse_field_overrides
from salaad_jax.train.state import model_config

METHODS = ("dense", "salaad", "lowrank", "sltrain", "lost", "galore")
DEFAULT_METHODS = ("dense", "salaad", "lowrank", "sltrain", "lost")
BUDGETED = ("sltrain", "lowrank", "lost", "galore")  # trained once per budget

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
_BUDGETS = flags.DEFINE_list("budgets", ["0.4", "0.5", "0.6"],
                             "budgets, fractions in (0, 1] of the dense model in --unit; "
                             "the baselines are trained at each, SALAAD deployed at each")
_UNIT = flags.DEFINE_enum("unit", "bytes", list(budgets_lib.UNITS),
                          "what a budget counts: deployment bytes (bf16 values, int32 "
                          "indices) or parameters")
_FORMAT = flags.DEFINE_enum("sparse_format", "auto", list(budgets_lib.FORMATS),
                            "storage of unstructured sparse parts, one format per model; "
                            "auto: the best of coo/csr/bitmap for each model")
_FRACTION = flags.DEFINE_float("budget_fraction", None,
                               "old form of one parameter budget: the same as "
                               "--budgets=F --unit=params", lower_bound=0.0, upper_bound=1.0)
_DENSITY = flags.DEFINE_float("density", 0.03, "SLTrain / LOST density", lower_bound=0.0,
                              upper_bound=1.0)
_METHODS = flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                             f"methods to train, of {list(METHODS)}; the post-hoc rows need "
                             "dense and salaad")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 10, "validation batches", lower_bound=1)
_SPECTRUM = flags.DEFINE_list("spectrum_budgets", [],
                              "budgets (fractions of the dense model in --unit) of the first "
                              "seed's SALAAD capacity spectrum in --out/spectrum ('': none); "
                              "those below the share of the parameters outside the blocks "
                              "are left out")
_SALAAD_RANK = flags.DEFINE_float("salaad_rank_target", None,
                                  "SALAAD's r*; unset: the r* at which its surrogate fills "
                                  "the budget of --salaad_fill", lower_bound=0.0, upper_bound=1.0)
_SALAAD_FILL = flags.DEFINE_enum(
    "salaad_fill", None, list(budgets_lib.FILLS),
    "which of --budgets SALAAD's trained structure (r* at its d*) fills: 'largest', or "
    "'middle' (the median; the lower one of an even count). A consolidated structure is cut "
    "for the budgets below it and cannot use those above, and filling the middle one "
    "measured best with the recommended preset (benchmarks/RESULTS.md); unset: 'middle' "
    "for --salaad_preset=recommended, 'largest' otherwise")
_SALAAD_PRESET = flags.DEFINE_enum(
    "salaad_preset", "recommended", [*presets.PRESETS, "short"],
    "SALAAD's settings under the --salaad_* flags and --salaad_option: a preset of "
    "salaad_jax/train/presets.py ('recommended': the measured best, 'reference': the "
    "authors'), or 'short' (SALAAD_SHORT_RUN, this command's settings before the presets: "
    "the tiny model's fast controller)")
_SALAAD_DENSITY = flags.DEFINE_float("salaad_density_target", None,
                                     "SALAAD's d*; unset: the preset's (0.05 with 'short')",
                                     lower_bound=0.0, upper_bound=1.0)
_SALAAD_RHO = flags.DEFINE_float("salaad_rho", None, "SALAAD's rho (blocks and embedding); "
                                 "unset: the preset's", lower_bound=0.0)
_SALAAD_OPTION = flags.DEFINE_multi_string(
    "salaad_option", [], "a TrainConfig field of SALAAD's pretraining run, key=value "
    "(repeatable; applied after the --salaad_* flags), e.g. k_alpha=0.2; "
    "salaad_preset=recommended puts that preset's fields under the other settings")
_SALAAD_CUTS = flags.DEFINE_enum(
    "salaad_cuts", None, ["budgets", "none"],
    "with consolidation in factors, which cuts of its structure SALAAD trains "
    "(--consolidate_cut_budgets): 'budgets' the global allocator's cut at each of --budgets "
    "below the one its structure fills, and the whole structure, one drawn per step; 'none' "
    "the whole structure only; unset: 'budgets' with "
    "--salaad_preset=recommended, 'none' otherwise (--salaad_option="
    "consolidate_cut_budgets=... wins)")
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


def _check_budgets(values, allow_empty=False):
  try:
    ok = all(0.0 < float(v) <= 1.0 for v in values)
  except ValueError:
    ok = False
  if not ok or (not values and not allow_empty):
    raise flags.ValidationError(f"must be fractions in (0, 1], got {values}")
  if len({float(v) for v in values}) < len(values):
    raise flags.ValidationError(f"must be distinct, got {values}")
  return True


def _check_subset(known):
  def check(values):
    unknown = sorted(set(values) - set(known))
    if unknown or not values:
      raise flags.ValidationError(f"unknown {unknown}; known {list(known)}")
    return True
  return check


flags.register_validator("seeds", _check_seeds)
flags.register_validator("budgets", _check_budgets)
flags.register_validator("spectrum_budgets", lambda v: _check_budgets(v, allow_empty=True))
flags.register_validator("methods", _check_subset(METHODS))
flags.register_validator("finetune_methods", _check_subset(ft.FINETUNE_METHODS))


def budget_flags() -> tuple[list[float], str]:
  """(budget fractions, ascending; unit) of --budgets/--unit, or of the old
  --budget_fraction."""
  if _FRACTION.value is not None:
    if flags.FLAGS["budgets"].present or flags.FLAGS["unit"].present:
      common.fail("--budget_fraction=F is the old form of --budgets=F --unit=params; give "
                  "one or the other")
    return [_FRACTION.value], "params"
  return sorted(float(b) for b in _BUDGETS.value), _UNIT.value


def budget_text(fraction: float) -> str:
  return f"{fraction:g}"


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


def salaad_fill() -> str:
  """--salaad_fill, or its default for --salaad_preset."""
  if _SALAAD_FILL.value:
    return _SALAAD_FILL.value
  return "middle" if _SALAAD_PRESET.value == "recommended" else "largest"


def _workdir(kind: str, seed: int, name: str) -> str:
  return os.path.join(_OUT.value, kind, f"seed_{seed}", name)


def salaad_settings(**overrides) -> dict:
  """SALAAD's TrainConfig fields: --salaad_preset's (for --model), the
  --salaad_* flags, then ``overrides``."""
  if _SALAAD_PRESET.value == "short":
    settings = dict(SALAAD_SHORT_RUN) if _MODEL.value == "tiny" else {}
    settings.setdefault("density_target", 0.05)
  else:
    settings = presets.preset_fields(_SALAAD_PRESET.value, _MODEL.value)
    settings["salaad_preset"] = _SALAAD_PRESET.value
  if _SALAAD_DENSITY.value is not None:
    settings["density_target"] = _SALAAD_DENSITY.value
  if _SALAAD_RHO.value is not None:
    settings.update(rho=_SALAAD_RHO.value, rho_embed=_SALAAD_RHO.value)
  if _SALAAD_RANK.value is not None:
    settings["rank_target"] = _SALAAD_RANK.value
  settings.update(overrides)
  return settings


def pretrain_salaad_settings(mcfg, targets: dict[float, int], unit: str) -> dict:
  """SALAAD's pretraining settings: ``salaad_settings`` and --salaad_option,
  r* matched to the budget of --salaad_fill unless set, the cuts of
  --salaad_cuts; checked like a run's config."""
  try:
    options = parse_field_overrides(_SALAAD_OPTION.value, "salaad_option")
  except TrainError as e:
    common.fail(str(e))
  try:  # --salaad_option=salaad_preset=NAME: the preset's fields under the others
    options = presets.with_preset(options, _MODEL.value)
  except TrainError as e:
    common.fail(str(e))
  settings = salaad_settings(**options)
  if _SALAAD_RANK.value is None and "rank_target" not in options:
    try:
      settings["rank_target"] = budgets_lib.salaad_rank_target(
          mcfg, [budgets_lib.fill_target(list(targets.values()), salaad_fill())], unit,
          settings["density_target"], _FORMAT.value)
    except ValueError as e:
      common.fail(f"--budgets={','.join(_BUDGETS.value)}: SALAAD's rank target: {e}")
  cuts = _SALAAD_CUTS.value or ("budgets" if _SALAAD_PRESET.value == "recommended" else "none")
  in_factors = (settings.get("consolidate_from", 0) > 0
                and settings.get("consolidate_params") == "factors"
                and not settings.get("consolidate_global_dropout"))
  if "consolidate_cut_budgets" not in options:  # this command's budgets, not the preset's
    fill = budgets_lib.fill_target(list(targets.values()), salaad_fill())
    fill_fraction = next(f for f, v in targets.items() if v == fill)
    cut = (budgets_lib.cut_budgets(mcfg, list(targets), fill_fraction, unit)
           if cuts == "budgets" and in_factors else [])
    settings["consolidate_cut_budgets"] = ",".join(f"{b:.6g}" for b in cut)
  try:
    config_lib.validate(base_config("salaad", 0, **settings))
  except TrainError as e:
    common.fail(f"SALAAD's settings: {e}")
  return settings


def _row(method: str, seed: int, *, budget="", unit="", fmt=None, rank="", result=None,
         params: int, bytes_: int, perplexity: float, workdir: str, dense: dict,
         x_perplexity=None) -> dict:
  return {"method": method, "seed": seed, "budget": budget, "unit": unit, "format": fmt or "",
          "rank": rank, "params": int(params), "bytes": int(bytes_),
          "params_fraction": params / dense["params"], "bytes_fraction": bytes_ / dense["bytes"],
          "perplexity": perplexity, "x_perplexity": x_perplexity,
          "steps": result["step"] if result else None,
          "wall_s": result["wall_time_sec"] if result else None, "workdir": workdir}


def train_run(config: TrainConfig, wd: str) -> tuple[dict, dict]:
  """Trains (or restores) one run; (training result, summary)."""
  result = common.train(config, wd)
  return result, common.write_summary(wd, result)


class Plan:
  """What one seed trains and deploys: budgets (fraction -> absolute target in
  ``unit``), each budgeted baseline matched at each budget, SALAAD's settings
  and the dense model's size."""

  def __init__(self, mcfg, methods: list[str], fractions: list[float], unit: str):
    self.methods, self.unit, self.fmt = methods, unit, _FORMAT.value
    full, _ = budgets_lib.dense_size(mcfg, "params")
    self.dense = {"params": full, "bytes": full * 2}
    self.targets, self.matched = {}, {}
    for f in fractions:
      try:
        self.targets[f] = budgets_lib.target(mcfg, f, unit)
      except ValueError as e:
        common.fail(f"--budgets: {budget_text(f)}: {e}")
      for method in [m for m in budgets_lib.RANKED if m in methods or
                     (m == "lowrank" and "galore" in methods)]:
        try:
          self.matched[f, method] = budgets_lib.match(method, mcfg, self.targets[f], unit,
                                                      _DENSITY.value, self.fmt)
        except ValueError as e:
          common.fail(f"--budgets: {budget_text(f)} of the dense {unit}: {method}: {e}")
    self.salaad = (pretrain_salaad_settings(mcfg, self.targets, unit)
                   if "salaad" in methods else None)

  def baseline_config(self, method: str, fraction: float, seed: int) -> tuple[TrainConfig, int]:
    """The config of ``method`` at ``fraction`` and its rank (GaLore: the
    low-rank method's)."""
    rank = self.matched[fraction, "lowrank" if method == "galore" else method].rank
    options = {"rank": str(rank)}
    if method in ("sltrain", "lost"):
      options["density"] = str(_DENSITY.value)
    if method == "galore":
      options["update_proj_gap"] = str(max(10, _STEPS.value // 10))
    return base_config(method, seed, method_options=options), rank


def train_seed(plan: Plan, seed: int) -> tuple[list[dict], dict[str, str]]:
  """Every run of one seed: dense, SALAAD (its trained surrogate), then each
  budgeted baseline at each budget (a run shared by budgets that match the
  same rank); (rows, workdirs of the dense and SALAAD runs)."""
  rows, dirs = [], {}
  if "dense" in plan.methods:
    wd = dirs["dense"] = _workdir("runs", seed, "dense")
    print(f"== seed {seed}: dense", flush=True)
    result, summary = train_run(base_config("dense", seed), wd)
    rows.append(_row("dense", seed, result=result, params=summary["params"],
                     bytes_=summary["bytes"], perplexity=summary["perplexity"], workdir=wd,
                     dense=plan.dense))
  if plan.salaad is not None:
    wd = dirs["salaad"] = _workdir("runs", seed, "salaad")
    r_star = plan.salaad["rank_target"]
    print(f"== seed {seed}: salaad (r* {r_star:.3f})", flush=True)
    result, summary = train_run(base_config("salaad", seed, **plan.salaad), wd)
    rows.append(_row("salaad_trained", seed, rank=f"r* {r_star:.3f}", fmt="coo",
                     result=result, params=summary["params"], bytes_=summary["bytes"],
                     perplexity=summary["perplexity"], workdir=wd, dense=plan.dense,
                     x_perplexity=result["eval_perplexity"]))
  done = {}
  for fraction in plan.targets:
    for method in [m for m in BUDGETED if m in plan.methods]:
      config, rank = plan.baseline_config(method, fraction, seed)
      name = f"{method}_r{rank}"
      if name not in done:
        print(f"== seed {seed}: {method} at {budget_text(fraction)} of the dense {plan.unit} "
              f"(rank {rank})", flush=True)
        done[name] = train_run(config, _workdir("runs", seed, name))
      result, summary = done[name]
      m = plan.matched[fraction, "lowrank" if method == "galore" else method]
      params, size, fmt = ((summary["params"], summary["bytes"], None) if method == "galore"
                           else (m.params, m.bytes, m.fmt))
      rows.append(_row(method, seed, budget=budget_text(fraction), unit=plan.unit, fmt=fmt,
                       rank=rank, result=result, params=params, bytes_=size,
                       perplexity=summary["perplexity"], workdir=_workdir("runs", seed, name),
                       dense=plan.dense))
  return rows, dirs


def deploy_seed(plan: Plan, seed: int, dirs: dict[str, str]) -> list[dict]:
  """SALAAD's run of ``seed`` deployed at every budget (global allocation, or
  at the cuts it trained: ``compare_budgets.salaad_allocation``), with the post-hoc split of
  the dense run at the same budgets (global allocation); rows."""
  if "salaad" not in dirs:
    return []
  print(f"== seed {seed}: SALAAD deployed at {len(plan.targets)} budgets", flush=True)
  by_value = {v: f for f, v in plan.targets.items()}
  method = budgets_lib.salaad_allocation(config_lib.read_config(dirs["salaad"]), plan.unit,
                                         plan.fmt)
  series = {f"salaad/{method}": "salaad", "posthoc[dense]/global": "posthoc"}
  try:
    spectrum = sp.capacity_spectrum(
        dirs["salaad"], list(by_value), methods=tuple(dict.fromkeys(("global", method))),
        dense_workdir=dirs.get("dense"),
        posthoc="dense" in dirs, unit=plan.unit, fmt=plan.fmt,
        progress=lambda line: print(line, flush=True))
  except sp.SpectrumError as e:
    common.fail(str(e))
  return [dict(_row(series[r["series"]], seed, budget=budget_text(by_value[r["budget_value"]]),
                    unit=plan.unit, fmt=r["fmt"], params=r["params"], bytes_=r["bytes"],
                    perplexity=r["perplexity"], workdir=r["workdir"], dense=plan.dense),
               kept_rank=r["kept_rank"], kept_nnz=r["kept_nnz"])
          for r in spectrum if r["series"] in series]


def write_spectrum(plan: Plan, seed: int, dirs: dict[str, str], rows: list[dict],
                   rest: float) -> None:
  """The capacity spectrum of ``seed``'s SALAAD run at --spectrum_budgets in
  ``--out/spectrum``, every baseline row of the seed a point."""
  curve = [float(b) for b in _SPECTRUM.value if float(b) >= rest]
  if not curve or "salaad" not in dirs:
    return
  points = []
  for r in rows:
    if r["method"] in BUDGETED:
      label = f"{r['method']} r={r['rank']}"
      path = os.path.join(_OUT.value, "points", f"seed_{seed}",
                          f"{r['method']}_{r['budget']}.json")
      write_point(path, method=r["method"], label=label, params=r["params"],
                  bytes=r["bytes"], perplexity=r["perplexity"],
                  dense_params=plan.dense["params"], fmt=r["format"] or None,
                  dtype="bfloat16")
      points.append(path)
  try:
    spectrum = sp.capacity_spectrum(dirs["salaad"], curve, methods=("global", "hpa"),
                                    dense_workdir=dirs.get("dense"), baseline_workdirs=points,
                                    unit=plan.unit, fmt=plan.fmt,
                                    progress=lambda line: print(line, flush=True))
  except sp.SpectrumError as e:
    common.fail(str(e))
  out = os.path.join(_OUT.value, "spectrum")
  paths = report.write_table(spectrum, out)
  report.plot(spectrum, os.path.join(out, "spectrum.png"),
              title=f"{_MODEL.value}, seed {seed}, {_STEPS.value} steps "
                    f"({plan.fmt} sparse storage, bf16)")
  print(f"wrote {paths['md']}", flush=True)


def _seeds_text(seeds=None) -> str:
  seeds = [str(s) for s in (_SEEDS.value if seeds is None else seeds)]
  return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(seeds)})"


def write_outputs(plan: Plan, runs: list[dict]) -> str:
  """results.md / .csv / .png in ``--out``; returns the markdown table."""
  out = _OUT.value
  tables.write_csv(os.path.join(out, "results.csv"), tables.ordered(runs),
                   tables.BUDGET_CSV_COLUMNS)
  rows = tables.summarize(runs)
  seeds = _seeds_text(dict.fromkeys(r["seed"] for r in runs))
  budgets = ", ".join(f"{budget_text(f)} ({v:,} {plan.unit})" for f, v in plan.targets.items())
  header = (f"Model `{_MODEL.value}`, {_STEPS.value} steps of {_BATCH.value}x{_SEQ.value} "
            f"tokens on `{os.path.basename(_SOURCE.value)}`, {seeds}; budgets "
            f"{budgets} of the dense model ({plan.dense['params']:,} params, "
            f"{plan.dense['bytes']:,} bytes in bf16); sparse storage "
            f"`{plan.fmt}`.  Perplexity: mean ± std over seeds; differences: paired "
            "per seed, mean ± standard error.")
  columns = [
      ("budget", "", lambda r: r["budget"] or "-"),
      ("method", "", lambda r: r["method"]),
      ("rank", ":", lambda r: r["rank"] if r.get("kept_rank") is None else
       f"Σ {r['kept_rank']:.0f}, nnz {r['kept_nnz']:,.0f}"),
      ("format", "", lambda r: r["format"]),
      ("params", ":", lambda r: f"{r['params']:,}"),
      ("bytes", ":", lambda r: f"{r['bytes']:,}"),
      ("bytes / dense", ":", lambda r: f"{r['bytes'] / plan.dense['bytes']:.3f}"),
      ("val. perplexity", ":", lambda r: tables.ppl_cell(r) + (
          f" (X: {r['x_perplexity']:.3f})" if r.get("x_perplexity") else "")),
      ("minus dense", ":", tables.delta_cell),
      ("salaad minus it", ":", lambda r: tables.delta_cell(r, "vs_salaad")),
  ]
  table = tables.markdown(header, columns, rows)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  tables.budget_plot([r for r in rows if r["method"] != "salaad_trained"],
                     os.path.join(out, "results.png"),
                     f"{_MODEL.value}, {_STEPS.value} steps, {seeds}; budgets in "
                     f"{plan.unit}, sparse storage {plan.fmt}")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  methods = [m for m in METHODS if m in _METHODS.value]
  if ft.SOURCE.value and "dense" not in methods:
    common.fail("--finetune_source fine-tunes the dense run: keep dense in --methods")
  fractions, unit = budget_flags()
  seeds = [int(s) for s in _SEEDS.value]
  probe = base_config("dense", seeds[0], vocab_size=256)
  mcfg = model_config(probe)
  plan = Plan(mcfg, methods, fractions, unit)
  full, rest = budgets_lib.dense_size(mcfg, unit)
  os.makedirs(_OUT.value, exist_ok=True)

  runs = []
  for i, seed in enumerate(seeds):
    rows, dirs = train_seed(plan, seed)
    rows += deploy_seed(plan, seed, dirs)
    runs += rows
    if i == 0:
      write_spectrum(plan, seed, dirs, rows, rest / full)
    table = write_outputs(plan, runs)  # the seeds so far, should a later one be stopped
  print(table, flush=True)

  if ft.SOURCE.value:
    setup = ft.Setup(base_config=base_config, workdir=_workdir, salaad_settings=salaad_settings,
                     out=_OUT.value, eval_batches=_EVAL_BATCHES.value,
                     pretrained=(f"Model `{_MODEL.value}` pretrained (dense, {_STEPS.value} "
                                 f"steps) on `{os.path.basename(_SOURCE.value)}`"),
                     tokens=f"{_BATCH.value}x{_SEQ.value}", seeds=_seeds_text(),
                     model=_MODEL.value)
    print(ft.compare_finetuning(setup, seeds, plan.dense["params"]), flush=True)


if __name__ == "__main__":
  app.run(main)
