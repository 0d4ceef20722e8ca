r"""One SALAAD run against baselines trained for each memory budget, at
matched training compute, with equally tuned baselines, fresh seeds and the
controls that isolate what SALAAD's parts contribute; and fine-tuning
methods from one dense run.

    python -m benchmarks.compare --source=../shared/data/english.txt \
        --budgets=0.4,0.5,0.6 --steps=1000 --out=/tmp/compare

The protocol (``benchmarks.compare_protocol``; every default is it):

1. *Compute.* SALAAD trains ``--steps`` steps; with ``--match=flops`` every
   other run trains for the same training FLOPs (``salaad_jax.train.compute``:
   forward and backward passes, the joint cut loss's second one included,
   and SALAAD's SVT and factor work), i.e. more steps of the same batch
   shape when its steps are cheaper, its schedule over its own steps.
   ``--match=tokens``: every run ``--steps`` steps.  The table gives each
   method's steps, tokens and FLOPs.
2. *Tuning.* Every method of ``--methods`` gets ``--tune_trials`` trials
   (trial 0 its defaults, then draws from its space) on ``--tune_seeds``,
   scored on ``--selection_split``; the chosen settings go to
   ``<out>/tuned.json`` (``--save_tuned=NAME``: also
   ``benchmarks/tuned/NAME.json``) and are used for every reported run.
   ``--tuned=NAME|PATH`` takes settings chosen before instead.
3. *Seeds and evaluation.* The reported ``--seeds`` may be neither tuning
   seeds nor the seeds the SALAAD preset was chosen on (a one-line error;
   ``--allow_tuning_seeds`` lifts it).  Every model is evaluated on
   ``--eval_split`` (the half of the held-out tail the selection never
   saw) on ``--eval_batches`` batches spread over it (0: all of it), its
   weights rounded to ``--eval_dtype`` (bf16: the dtype the bytes are
   priced in).
4. *Controls* (``--controls``, SALAAD runs at the same compute and tuned
   settings that differ in one thing, rows ``salaad_<control>``):
   ``compare_protocol.CONTROLS``.
5. *The curve.* The SALAAD run is also deployed at every ``--curve_step``
   of the dense bytes from ``--curve_from`` up to what its structure fills,
   with the allocator it trained for and with ``global`` (rows
   ``salaad_curve_<allocator>``, the line in ``results.png``).

For every seed the script trains ONE dense and ONE SALAAD run and, for
every budget of ``--budgets`` (fractions of the dense model in ``--unit``:
parameters, or deployment bytes with bf16 values and int32 indices),
low-rank, SLTrain and LOST *at that budget*: the largest global rank whose
model fits, counted by the method's own accounting
(``benchmarks.compare_budgets``; GaLore, with ``--methods`` naming it,
trains the dense model at the low-rank rank).  Runs live in
``--out/runs/seed_<s>/<method>`` (baselines ``<method>_r<rank>``), tuning
trials in ``--out/tuning/seed_<s>/<method>_t<k>``.  The SALAAD run is then
*deployed at every budget* (``deploy.capacity_spectrum``), next to the "no
training" floor: the dense run split post hoc (truncated SVD + magnitude
pruning at SALAAD's r*, d*) and allocated the same way.

Sparse storage (``--sparse_format``): one format for a whole model.  'auto'
(the default) lets each model take the best of COO / CSR / bitmap: a
baseline the one admitting the largest rank, a SALAAD or post-hoc
deployment the one whose allocation keeps the smallest error (a property
of the spectra, not of validation data).  SALAAD's rank target r* is the one
at which its surrogate fills one of the budgets (``--salaad_fill``, default
the largest; ``compare_budgets.salaad_rank_target``) unless
``--salaad_rank_target`` or ``--salaad_option=rank_target=...`` sets it; its
other settings are ``--salaad_preset``'s (default ``recommended``, the
project's rule ``presets.recommended_fields`` for --model, --steps and
--budgets: the authors' controller for the first 1 % of training chooses
the structure, then the surrogate is trained in its own factors; ``reference``
the authors' settings; ``short`` this command's earlier settings,
``SALAAD_SHORT_RUN``), the ``--salaad_*`` flags, then ``--salaad_option
key=value`` (any TrainConfig field, SALAAD's pretraining run only).  With
consolidation in factors the run also trains the cuts it will be deployed
at (``--salaad_cuts``, default ``budgets`` with the recommended preset:
each step the global allocator's cut at one of the ``--budgets`` below the
one its structure fills, or the whole structure, drawn equally often;
``--consolidate_cut_budgets``).

Outputs in ``--out``:

* ``results.csv``: one line per (method, seed, budget), with each run's
  steps, tokens, passes, training FLOPs and wall time: ``dense`` and
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
crash or a kill continues where it stopped and redoes no finished run or
trial, and re-evaluates nothing (every evaluation and deployment is kept in
the run's ``evaluations.json``, ``benchmarks.compare_eval``).

The comparison before this protocol (every run ``--steps`` steps, untuned
baselines, seeds 0-2, the first 10 batches of the held-out tail in float32,
no controls, no curve): ``--match=tokens --tune_trials=0
--allow_tuning_seeds --seeds=0,1,2 --controls= --curve_step=0
--eval_split=validation --eval_batches=10 --noeval_spread --eval_dtype=float32``.
"""

from __future__ import annotations

import math
import os

from absl import app, flags

from benchmarks import compare_budgets as budgets_lib
from benchmarks import compare_eval as ev
from benchmarks import compare_finetune as ft
from benchmarks import compare_protocol as protocol
from benchmarks import compare_tables as tables
from experiments import common
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy import spectrum_report as report
from salaad_jax.deploy.summary import write_summary as write_point
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import compute as compute_lib
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
_STEPS = flags.DEFINE_integer("steps", 300, "training steps of the SALAAD run (with "
                              "--match=tokens: of every run)", lower_bound=1)
_SEEDS = flags.DEFINE_list("seeds", ["10", "11", "12", "13", "14"],
                           "reported seeds (fresh: neither --tune_seeds nor the seeds the "
                           "SALAAD preset was chosen on); every method is trained once per seed")
_MODEL = flags.DEFINE_string("model", "tiny", "model preset")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_BATCH = flags.DEFINE_integer("batch_size", 8, "batch size", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 64, "sequence length", lower_bound=2)
_LR = flags.DEFINE_float("lr", 3e-3, "peak learning rate before tuning (every method's "
                         "trial 0)", lower_bound=0.0)
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
_DENSITY = flags.DEFINE_float("density", 0.03, "SLTrain / LOST density before tuning",
                              lower_bound=0.0, upper_bound=1.0)
_METHODS = flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                             f"methods to train, of {list(METHODS)}; the post-hoc rows need "
                             "dense and salaad")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 100, "evaluation batches of every model, "
                                     "spread over --eval_split (--eval_spread); 0: the whole "
                                     "split", lower_bound=0)
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None,
                                  "the reported split; unset: the second half of the held-out "
                                  "tail, 'validation[50%:]' ('test' for the synthetic corpus)")
_SELECTION_SPLIT = flags.DEFINE_string("selection_split", None,
                                       "the split tuning trials are scored on (disjoint from "
                                       "--eval_split); unset: 'validation[:50%]' ('validation' "
                                       "for the synthetic corpus)")
_EVAL_SPREAD = flags.DEFINE_bool("eval_spread", True, "spread the evaluation batches evenly "
                                 "over the split (false: its first ones)")
_EVAL_DTYPE = flags.DEFINE_enum("eval_dtype", "bfloat16", ["bfloat16", "float32"],
                                "the dtype every evaluated model's weights are rounded to "
                                "(bfloat16: the one the bytes are priced in)")
_MATCH = flags.DEFINE_enum("match", "flops", ["flops", "tokens"],
                           "flops: every run trains for the SALAAD run's training FLOPs; "
                           "tokens: every run --steps steps")
_TRAIN_FLOPS = flags.DEFINE_float(
    "train_flops", None, "with --match=flops, the training FLOPs every run is matched to, "
    "SALAAD's own run included (unset: the SALAAD run's at --steps, or the dense run's "
    "without SALAAD); e.g. a lever's run at the FLOPs of the run it is compared with",
    lower_bound=1.0)
_TUNE_TRIALS = flags.DEFINE_integer("tune_trials", 4, "trials per method of --methods "
                                    "(0: no tuning, every method at its defaults)",
                                    lower_bound=0)
_TUNE_SEEDS = flags.DEFINE_list("tune_seeds", ["100"], "seeds of the tuning trials (never "
                                "reported)")
_TUNED = flags.DEFINE_string("tuned", None, "settings chosen before: a name in "
                             "benchmarks/tuned/ or a .json path (instead of tuning)")
_SAVE_TUNED = flags.DEFINE_string("save_tuned", None, "also save the chosen settings as "
                                  "benchmarks/tuned/<name>.json")
_ALLOW_TUNING_SEEDS = flags.DEFINE_bool("allow_tuning_seeds", False,
                                        "allow reported seeds that chose settings (the "
                                        "comparison before the fair protocol)")
_CONTROLS = flags.DEFINE_list("controls", list(protocol.CONTROLS),
                              f"SALAAD controls of {list(protocol.CONTROLS)} ('': none)")
_CURVE_FROM = flags.DEFINE_float("curve_from", 0.3, "the SALAAD curve's smallest budget",
                                 lower_bound=0.0, upper_bound=1.0)
_CURVE_STEP = flags.DEFINE_float("curve_step", 0.05, "the SALAAD curve's budget step (0: no "
                                 "curve)", lower_bound=0.0, upper_bound=1.0)
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
    "for the budgets below it and cannot use those above; with one pass per step and the "
    "cuts trained, filling the largest measured best (benchmarks/RESULTS.md); unset: "
    "'largest'")
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


def _check_subset(known, allow_empty=False):
  def check(values):
    unknown = sorted(set(values) - set(known))
    if unknown or (not values and not allow_empty):
      raise flags.ValidationError(f"unknown {unknown}; known {list(known)}")
    return True
  return check


flags.register_multi_flags_validator(
    ["train_flops", "match"], lambda v: v["train_flops"] is None or v["match"] == "flops",
    "--train_flops matches FLOPs: it needs --match=flops")
flags.register_validator("seeds", _check_seeds)
flags.register_validator("tune_seeds", _check_seeds)
flags.register_validator("budgets", _check_budgets)
flags.register_validator("spectrum_budgets", lambda v: _check_budgets(v, allow_empty=True))
flags.register_validator("methods", _check_subset(METHODS))
flags.register_validator("controls", _check_subset(protocol.CONTROLS, allow_empty=True))
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


def splits() -> tuple[str, str]:
  """(selection split, reported split): the flags, or the halves of the
  held-out tail (the synthetic corpus: its 'validation' and 'test' streams)."""
  synthetic = _SOURCE.value.startswith("synthetic")
  selection = _SELECTION_SPLIT.value or ("validation" if synthetic else "validation[:50%]")
  reported = _EVAL_SPLIT.value or ("test" if synthetic else "validation[50%:]")
  if selection == reported and _TUNE_TRIALS.value > 0 and not _TUNED.value:
    common.fail(f"--selection_split and --eval_split are both {reported!r}: settings would be "
                "chosen on the reported batches")
  return selection, reported


def budget_text(fraction: float) -> str:
  return f"{fraction:g}"


def base_config(method: str, seed: int, steps=None, **overrides) -> TrainConfig:
  """The shared run settings of every method (``steps``: default --steps;
  warm-up and logging scale with it)."""
  steps = steps or _STEPS.value
  base = dict(method=method, model=_MODEL.value, dtype=_DTYPE.value, source=_SOURCE.value,
              tokenizer="byte", seq_len=_SEQ.value, batch_size=_BATCH.value, steps=steps,
              lr=_LR.value, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1,
              schedule="cosine", log_every=max(1, steps // 5), eval_every=0,
              eval_batches=min(10, _EVAL_BATCHES.value or 10), eval_split=splits()[0],
              checkpoint_every=0, async_checkpoint=False, seed=seed, data_seed=seed)
  base.update(overrides)
  return TrainConfig(**base)


def salaad_fill() -> str:
  """--salaad_fill, or its default ('largest')."""
  return _SALAAD_FILL.value or "largest"


def _workdir(kind: str, seed: int, name: str) -> str:
  return os.path.join(_OUT.value, kind, f"seed_{seed}", name)


def salaad_settings(**overrides) -> dict:
  """SALAAD's TrainConfig fields: --salaad_preset's (for --model), the
  --salaad_* flags, then ``overrides``."""
  if _SALAAD_PRESET.value == "short":
    settings = dict(SALAAD_SHORT_RUN) if _MODEL.value == "tiny" else {}
    settings.setdefault("density_target", 0.05)
  else:
    try:
      settings = presets.preset_fields(_SALAAD_PRESET.value, _MODEL.value, _STEPS.value,
                                       [float(b) for b in _BUDGETS.value])
    except TrainError as e:
      common.fail(str(e))
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
    options = presets.with_preset(options, _MODEL.value, _STEPS.value,
                                  [float(b) for b in _BUDGETS.value])
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


def _row(method: str, seed: int, *, budget="", unit="", fmt=None, rank="", summary=None,
         params: int, bytes_: int, perplexity: float, workdir: str, dense: dict,
         x_perplexity=None) -> dict:
  extra = (summary or {}).get("extra", {})
  comp = extra.get("compute", {})
  return {"method": method, "seed": seed, "budget": budget, "unit": unit, "format": fmt or "",
          "rank": rank, "params": int(params), "bytes": int(bytes_),
          "params_fraction": params / dense["params"], "bytes_fraction": bytes_ / dense["bytes"],
          "perplexity": perplexity, "x_perplexity": x_perplexity,
          "steps": comp.get("steps"), "tokens": comp.get("tokens"), "passes": comp.get("passes"),
          "train_flops": comp.get("train_flops"), "wall_s": extra.get("wall_s"),
          "workdir": workdir}


def train_run(config: TrainConfig, wd: str) -> dict:
  """Trains (or restores) one run; its summary (with its compute)."""
  result = common.train(config, wd)
  return common.write_summary(wd, result)


class Plan:
  """What every seed trains: budgets (fraction -> absolute target in
  ``unit``), each budgeted baseline matched at each budget (at its tuned
  density), SALAAD's settings (tuned), the dense model's size and the
  training FLOPs every run is matched to."""

  def __init__(self, mcfg, methods: list[str], fractions: list[float], unit: str,
               tuned: dict, flops=None):
    self.mcfg, self.methods, self.unit, self.fmt = mcfg, methods, unit, _FORMAT.value
    self.tuned = tuned  # method -> chosen settings (compare_protocol)
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
        self.matched[f, method] = self.match(method, f, self.settings(method))
    self.salaad = (pretrain_salaad_settings(mcfg, self.targets, unit)
                   if "salaad" in methods else None)
    if self.salaad is not None and "salaad" in tuned:
      self.salaad.update(protocol.apply("salaad", tuned["salaad"])["fields"])
    self.flops = flops if flops is not None else self.reference_flops()

  def settings(self, method: str) -> dict:
    """``method``'s tuned settings, or its defaults."""
    if method in self.tuned:
      return self.tuned[method]
    if method not in protocol.SPACES:
      return {"lr": _LR.value}
    return protocol.defaults(method, _LR.value, self.salaad if method == "salaad" else None,
                             density=_DENSITY.value)

  def match(self, method: str, fraction: float, settings: dict) -> budgets_lib.Matched:
    density = settings.get("density", _DENSITY.value)
    try:
      return budgets_lib.match(method, self.mcfg, self.targets[fraction], self.unit, density,
                               self.fmt)
    except ValueError as e:
      common.fail(f"--budgets: {budget_text(fraction)} of the dense {self.unit}: {method}: {e}")

  def reference_flops(self) -> float:
    """The FLOPs every run is matched to: --train_flops, or the SALAAD run's
    at --steps (the dense run's without SALAAD)."""
    if _TRAIN_FLOPS.value is not None:
      return float(_TRAIN_FLOPS.value)
    config = (base_config("salaad", 0, **self.salaad) if self.salaad is not None
              else base_config("dense", 0))
    return compute_lib.train_compute(config.replace(vocab_size=256), self.mcfg).train_flops

  def matched_config(self, method: str, seed: int, **overrides) -> TrainConfig:
    """The config of ``method`` at --steps, then (--match=flops) at the step
    count whose FLOPs match ``self.flops``."""
    config = base_config(method, seed, **overrides)
    if _MATCH.value == "tokens":
      return config
    probe = config.replace(vocab_size=self.mcfg.vocab_size)
    steps = compute_lib.steps_for_flops(probe, self.mcfg, self.flops)
    return base_config(method, seed, steps=steps, **overrides)

  def dense_config(self, seed: int, settings=None) -> TrainConfig:
    return self.matched_config("dense", seed, **protocol.apply(
        "dense", settings or self.settings("dense"))["fields"])

  def salaad_config(self, seed: int, settings=None, **control) -> TrainConfig:
    fields = dict(self.salaad)
    if settings is not None:
      fields.update(protocol.apply("salaad", settings)["fields"])
    if control.get("salaad_preset") == "reference":
      # the authors' settings: their preset with this command's r* and d* rules
      ref = presets.preset_fields("reference", _MODEL.value)
      fields = dict(ref, salaad_preset="reference", lr=fields.get("lr", _LR.value))
    else:
      fields.update(control)
    return self.matched_config("salaad", seed, **fields)

  def baseline_config(self, method: str, fraction: float, seed: int,
                      settings=None) -> tuple[TrainConfig, int]:
    """The config of ``method`` at ``fraction`` and its rank (GaLore: the
    low-rank method's)."""
    key = "lowrank" if method == "galore" else method
    settings = settings or self.settings(key if key in protocol.SPACES else method)
    rank = self.match(key, fraction, settings).rank
    applied = protocol.apply(key, settings, rank) if key in protocol.SPACES else {
        "fields": {"lr": settings["lr"]}, "options": {}}
    options = {"rank": str(rank), **applied["options"]}
    if method == "galore":
      options["update_proj_gap"] = str(max(10, _STEPS.value // 10))
    return self.matched_config(method, seed, method_options=options,
                               **applied["fields"]), rank


def _summary_row(method: str, seed: int, wd: str, summary: dict, ppl: float, plan: Plan,
                 **kw) -> dict:
  return _row(method, seed, summary=summary, params=kw.pop("params", summary["params"]),
              bytes_=kw.pop("bytes_", summary["bytes"]), perplexity=ppl, workdir=wd,
              dense=plan.dense, **kw)


def salaad_runs(plan: Plan) -> dict[str, dict]:
  """The SALAAD runs of a seed: 'salaad' and each control of --controls,
  name -> control fields."""
  if plan.salaad is None:
    return {}
  kept, _ = same_controls(plan)
  return {"salaad": {}, **{f"salaad_{name}": fields for name, fields in kept.items()}}


def same_controls(plan: Plan) -> tuple[dict[str, dict], list[str]]:
  """(the controls of --controls that differ from the recipe, name -> fields;
  those whose run would be the recipe's own, which are not run)."""
  return protocol.distinct_controls(_CONTROLS.value,
                                    lambda fields: plan.salaad_config(0, **fields))


def train_seed(plan: Plan, seed: int, evaluation: ev.Evaluation
               ) -> tuple[list[dict], dict[str, str], dict[str, dict]]:
  """Every run of one seed: dense, SALAAD and its controls (their trained
  surrogates), then each budgeted baseline at each budget (a run shared by
  budgets that match the same rank); (rows, workdirs, summaries)."""
  rows, dirs, summaries = [], {}, {}
  if "dense" in plan.methods:
    wd = dirs["dense"] = _workdir("runs", seed, "dense")
    config = plan.dense_config(seed)
    print(f"== seed {seed}: dense ({config.steps} steps)", flush=True)
    summaries["dense"] = s = train_run(config, wd)
    rows.append(_summary_row("dense", seed, wd, s, ev.run_perplexity(wd, evaluation, s["step"]),
                             plan))
  for name, control in salaad_runs(plan).items():
    wd = dirs[name] = _workdir("runs", seed, name)
    config = plan.salaad_config(seed, **control)
    print(f"== seed {seed}: {name} (r* {config.rank_target:.3f}, {config.steps} steps)",
          flush=True)
    summaries[name] = train_run(config, wd)
  done = {}
  for fraction in plan.targets:
    for method in [m for m in BUDGETED if m in plan.methods]:
      config, rank = plan.baseline_config(method, fraction, seed)
      name = f"{method}_r{rank}"
      wd = _workdir("runs", seed, name)
      if name not in done:
        print(f"== seed {seed}: {method} at {budget_text(fraction)} of the dense {plan.unit} "
              f"(rank {rank}, {config.steps} steps)", flush=True)
        s = train_run(config, wd)
        done[name] = (s, ev.run_perplexity(wd, evaluation, s["step"]))
      summary, ppl = done[name]
      key = "lowrank" if method == "galore" else method
      m = plan.match(key, fraction, plan.settings(key))
      params, size, fmt = ((summary["params"], summary["bytes"], None) if method == "galore"
                           else (m.params, m.bytes, m.fmt))
      rows.append(_summary_row(method, seed, wd, summary, ppl, plan,
                               budget=budget_text(fraction), unit=plan.unit, fmt=fmt,
                               rank=rank, params=params, bytes_=size))
  return rows, dirs, summaries


def _curve(fill: float) -> list[float]:
  """The curve's budgets: every --curve_step from --curve_from up to ``fill``."""
  if _CURVE_STEP.value <= 0:
    return []
  n = int(math.floor((fill - _CURVE_FROM.value) / _CURVE_STEP.value + 1e-9)) + 1
  return [round(_CURVE_FROM.value + i * _CURVE_STEP.value, 6) for i in range(max(0, n))]


def deploy_seed(plan: Plan, seed: int, dirs: dict[str, str], summaries: dict[str, dict],
                evaluation: ev.Evaluation) -> list[dict]:
  """SALAAD's runs of ``seed`` deployed at every budget (at the cuts a run
  trained, ``compare_budgets.salaad_allocation``, or by the global
  allocation), the main run also on the curve with both allocators and the
  post-hoc split of the dense run (global allocation); rows."""
  out = []
  for name in salaad_runs(plan):
    wd, summary = dirs[name], summaries[name]
    alloc = budgets_lib.salaad_allocation(config_lib.read_config(wd), plan.unit, plan.fmt)
    curve = _curve(1.0) if name == "salaad" else []  # those above the structure: cached
    posthoc = name == "salaad" and "dense" in dirs  # the dense run split (global allocation)
    fractions = sorted({*plan.targets, *curve, 1.0})
    print(f"== seed {seed}: {name} deployed at {len(fractions)} budgets ({alloc})", flush=True)
    try:
      spectrum = ev.deployments(
          wd, fractions, (alloc, "global") if curve or posthoc else (alloc,), evaluation,
          unit=plan.unit, fmt=plan.fmt, dense_workdir=dirs.get("dense") if posthoc else None,
          progress=lambda line: print(line, flush=True))
    except sp.SpectrumError as e:
      common.fail(str(e))
    by_value = {budgets_lib.target(plan.mcfg, f, plan.unit): f for f in fractions}
    whole = next(r for r in spectrum if r["source"] == "salaad" and r["allocation"] == alloc
                 and by_value[r["budget_value"]] == 1.0)
    fill = whole[f"{plan.unit}_fraction"]  # what the structure fills
    curve = [f for f in curve if f <= fill + 1e-9]
    for r in spectrum:
      f = by_value[r["budget_value"]]
      kept = dict(kept_rank=r["kept_rank"], kept_nnz=r["kept_nnz"])
      common_kw = dict(unit=plan.unit, fmt=r["fmt"], params=r["params"], bytes_=r["bytes"],
                       perplexity=r["perplexity"], workdir=wd, dense=plan.dense,
                       summary=summary)
      if r["source"] == "posthoc":  # the dense run split: its workdir and compute
        if f in plan.targets:
          out.append(dict(_row("posthoc", seed, budget=budget_text(f),
                               **dict(common_kw, workdir=dirs["dense"],
                                      summary=summaries.get("dense"))), **kept))
        continue
      if f == 1.0 and r["allocation"] == alloc:
        out.append(dict(_row(f"{name}_trained" if name == "salaad" else name, seed,
                             rank=f"r* {config_lib.read_config(wd).rank_target:.3f}",
                             **common_kw), **kept))
      if f in plan.targets and r["allocation"] == alloc:
        out.append(dict(_row(name, seed, budget=budget_text(f), **common_kw), **kept))
      if f in curve:
        out.append(dict(_row(f"salaad_curve_{r['allocation']}", seed, budget=budget_text(f),
                             **common_kw), **kept))
  return out


def write_spectrum(plan: Plan, seed: int, dirs: dict[str, str], rows: list[dict],
                   rest: float, evaluation: ev.Evaluation) -> None:
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
                                    progress=lambda line: print(line, flush=True),
                                    **evaluation.spectrum_kwargs())
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


# ---------------------------------------------------------------------------
# Tuning.
# ---------------------------------------------------------------------------


def _trial_perplexities(plan: Plan, method: str, settings: dict, seed: int, k: int,
                        selection: ev.Evaluation) -> list[float]:
  """Trains trial ``k`` of ``method`` on tuning seed ``seed``; its
  perplexities on the selection split (SALAAD: deployed at every budget)."""
  if method == "dense":
    config, name = plan.dense_config(seed, settings), f"dense_t{k}"
  elif method == "salaad":
    config, name = plan.salaad_config(seed, settings), f"salaad_t{k}"
  else:
    middle = sorted(plan.targets)[(len(plan.targets) - 1) // 2]
    config, rank = plan.baseline_config(method, middle, seed, settings)
    name = f"{method}_t{k}_r{rank}"
  wd = _workdir("tuning", seed, name)
  print(f"== tuning {method}, trial {k} on seed {seed} ({config.steps} steps): "
        + ", ".join(f"{key} {v:.4g}" for key, v in settings.items()), flush=True)
  summary = train_run(config, wd)
  if method != "salaad":
    return [ev.run_perplexity(wd, selection, summary["step"])]
  alloc = budgets_lib.salaad_allocation(config_lib.read_config(wd), plan.unit, plan.fmt)
  try:
    rows = ev.deployments(wd, sorted(plan.targets), (alloc,), selection, unit=plan.unit,
                          fmt=plan.fmt, progress=None)
  except sp.SpectrumError as e:
    common.fail(str(e))
  return [r["perplexity"] for r in rows]


def tune(plan: Plan, seeds: list[int], n: int, selection: ev.Evaluation) -> dict:
  """Every tunable method of ``plan`` tried ``n`` times on ``seeds``, scored
  on the selection split (``compare_protocol``); the tuned record."""
  record = {"model": _MODEL.value, "source": os.path.basename(_SOURCE.value),
            "steps": _STEPS.value, "match": _MATCH.value, "tune_seeds": seeds, "trials": n,
            "selection": selection.describe(), "budgets": [budget_text(f) for f in plan.targets],
            "unit": plan.unit, "methods": {}}
  for method in [m for m in plan.methods if m in protocol.SPACES]:
    first = plan.settings(method)
    results = []
    for k, settings in enumerate(protocol.trials(method, n, first)):
      per_seed = [protocol.score(_trial_perplexities(plan, method, settings, s, k, selection))
                  for s in seeds]
      results.append({"settings": settings, "score": protocol.score(per_seed),
                      "per_seed": per_seed})
      print(f"   {method} trial {k}: selection perplexity {results[-1]['score']:.3f}",
            flush=True)
    record["methods"][method] = {"trials": results, "chosen": protocol.choose(results)}
    chosen = record["methods"][method]["chosen"]
    print(f"== tuned {method}: trial {chosen['trial']} ({chosen['score']:.3f})", flush=True)
  return record


def tuned_settings(plan: Plan, evaluation: ev.Evaluation) -> tuple[dict, dict]:
  """(method -> chosen settings, the tuned record): from --tuned, or by
  tuning (--tune_trials), or nothing (every method at its defaults)."""
  if _TUNED.value:
    try:
      record = protocol.read_tuned(_TUNED.value)
    except ValueError as e:
      common.fail(f"--tuned: {e}")
  elif _TUNE_TRIALS.value > 0:
    selection = ev.Evaluation(splits()[0], evaluation.batches, evaluation.spread,
                              evaluation.weight_dtype)
    record = tune(plan, [int(s) for s in _TUNE_SEEDS.value], _TUNE_TRIALS.value, selection)
  else:
    return {}, {}
  out = os.path.join(_OUT.value, "tuned.json")
  protocol.write_tuned(out, record)
  if _SAVE_TUNED.value:
    protocol.write_tuned(protocol.tuned_path(_SAVE_TUNED.value), record)
  return {m: r["chosen"]["settings"] for m, r in record["methods"].items()}, record


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------


def _flops_cell(r, plan: Plan) -> str:
  return "" if not r.get("train_flops") else f"{r['train_flops'] / plan.flops:.3f}"


def tuning_table(record: dict) -> str:
  """Trials and chosen settings per method."""
  if not record:
    return "No tuning (every method at its defaults: `--tune_trials=0`).\n"
  lines = [f"Tuning: {record['trials']} trials per method on seed(s) "
           f"{', '.join(map(str, record['tune_seeds']))}, scored on the {record['selection']} "
           "(SALAAD: geometric mean over its deployments at the budgets; a per-budget baseline "
           "at the middle budget).", "",
           "| method | trials | chosen trial | selection ppl | chosen settings |",
           "|---|---:|---:|---:|---|"]
  for method, r in record["methods"].items():
    c = r["chosen"]
    settings = ", ".join(f"{k} {v:.4g}" for k, v in c["settings"].items())
    lines.append(f"| {method} | {len(r['trials'])} | {c['trial']} | {c['score']:.3f} | "
                 f"{settings} |")
  return "\n".join(lines) + "\n"


def write_outputs(plan: Plan, runs: list[dict], record: dict, evaluation: ev.Evaluation) -> str:
  """results.md / .csv / .png in ``--out``; returns the markdown."""
  out = _OUT.value
  tables.write_csv(os.path.join(out, "results.csv"), tables.ordered(runs),
                   tables.BUDGET_CSV_COLUMNS)
  rows = tables.summarize(runs)
  seeds = _seeds_text(dict.fromkeys(r["seed"] for r in runs))
  budgets = ", ".join(f"{budget_text(f)} ({v:,} {plan.unit})" for f, v in plan.targets.items())
  match = ("every run trained for the SALAAD run's training FLOPs "
           f"({plan.flops:.3e}, `--match=flops`)" if _MATCH.value == "flops"
           else f"every run {_STEPS.value} steps (`--match=tokens`)")
  header = (f"Model `{_MODEL.value}`, batches of {_BATCH.value}x{_SEQ.value} tokens on "
            f"`{os.path.basename(_SOURCE.value)}`, {seeds}; {match}; budgets "
            f"{budgets} of the dense model ({plan.dense['params']:,} params, "
            f"{plan.dense['bytes']:,} bytes in bf16); sparse storage `{plan.fmt}`; "
            f"evaluated on {evaluation.describe()}.  Perplexity: mean ± std over seeds; "
            "differences: paired per seed, mean ± standard error.  FLOPs ×: training FLOPs "
            "over the matched budget.")
  columns = [
      ("budget", "", lambda r: r["budget"] or "-"),
      ("method", "", lambda r: r["method"]),
      ("rank", ":", lambda r: r["rank"] if r.get("kept_rank") is None else
       f"Σ {r['kept_rank']:.0f}, nnz {r['kept_nnz']:,.0f}"),
      ("format", "", lambda r: r["format"]),
      ("params", ":", lambda r: f"{r['params']:,}"),
      ("bytes / dense", ":", lambda r: f"{r['bytes'] / plan.dense['bytes']:.3f}"),
      ("steps", ":", lambda r: f"{r['steps']:,.0f}" if r.get("steps") else ""),
      ("FLOPs ×", ":", lambda r: _flops_cell(r, plan)),
      ("val. perplexity", ":", tables.ppl_cell),
      ("minus dense", ":", tables.delta_cell),
      ("salaad minus it", ":", lambda r: tables.delta_cell(r, "vs_salaad")),
  ]
  main = [r for r in rows if not r["method"].startswith("salaad_curve_")]
  curve = [r for r in rows if r["method"].startswith("salaad_curve_")]
  text = tables.markdown(header, columns, main)
  if curve:
    text += "\n" + tables.markdown(
        "The SALAAD run's curve (every budget up to what its structure fills), by the "
        "allocator it trained for and by `global`:", columns[:3] + columns[4:6] + columns[8:10],
        curve)
  text += "\n" + tuning_table(record)
  if _CONTROLS.value and plan.salaad is not None:
    kept, same = same_controls(plan)
    text += "\nControls (SALAAD runs that differ from the recipe in one thing, same compute " \
            "and tuned settings):\n\n" + "".join(
                f"- `salaad_{c}`: {protocol.CONTROLS[c][0]}\n" for c in kept) + "".join(
                f"- `salaad_{c}`: not run, its settings are the recipe's here "
                f"({protocol.CONTROLS[c][0]})\n" for c in same)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  tables.budget_plot([r for r in rows if not r["method"].endswith("_trained")
                      and r["method"] != "salaad_trained"],
                     os.path.join(out, "results.png"),
                     f"{_MODEL.value}, {seeds}; budgets in {plan.unit}, sparse storage "
                     f"{plan.fmt}; {'matched FLOPs' if _MATCH.value == 'flops' else 'matched tokens'}",
                     curve=("salaad_curve_cut", "salaad_curve_global") if curve else ("salaad",))
  return text


def check_seeds(seeds: list[int], record_seeds: list[int]) -> None:
  """Fails (one line) when a reported seed chose settings."""
  if _ALLOW_TUNING_SEEDS.value:
    return
  tuning = [*record_seeds, *(int(s) for s in _TUNE_SEEDS.value if _TUNE_TRIALS.value > 0
                             and not _TUNED.value)]
  selection = presets.SELECTION_SEEDS if "salaad" in _METHODS.value else ()
  try:
    protocol.check_fresh(seeds, tuning, selection)
  except ValueError as e:
    common.fail(f"--seeds: {e} (--allow_tuning_seeds reports them anyway)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  methods = [m for m in METHODS if m in _METHODS.value]
  if ft.SOURCE.value and "dense" not in methods:
    common.fail("--finetune_source fine-tunes the dense run: keep dense in --methods")
  fractions, unit = budget_flags()
  seeds = [int(s) for s in _SEEDS.value]
  record_seeds = []
  if _TUNED.value:
    try:
      record_seeds = list(protocol.read_tuned(_TUNED.value).get("tune_seeds", []))
    except ValueError as e:
      common.fail(f"--tuned: {e}")
  check_seeds(seeds, record_seeds)
  probe = base_config("dense", seeds[0], vocab_size=256)
  mcfg = model_config(probe)
  evaluation = ev.Evaluation(splits()[1], _EVAL_BATCHES.value, _EVAL_SPREAD.value,
                             None if _EVAL_DTYPE.value == "float32" else _EVAL_DTYPE.value)
  os.makedirs(_OUT.value, exist_ok=True)
  untuned = Plan(mcfg, methods, fractions, unit, {})
  tuned, record = tuned_settings(untuned, evaluation)
  plan = Plan(mcfg, methods, fractions, unit, tuned, flops=untuned.flops)
  full, rest = budgets_lib.dense_size(mcfg, unit)

  if plan.salaad is not None:
    for name in same_controls(plan)[1]:
      print(f"control {name}: its settings are the recipe's here; not run", flush=True)
  runs = []
  for i, seed in enumerate(seeds):
    rows, dirs, summaries = train_seed(plan, seed, evaluation)
    rows += deploy_seed(plan, seed, dirs, summaries, evaluation)
    runs += rows
    if i == 0:
      write_spectrum(plan, seed, dirs, rows, rest / full, evaluation)
    table = write_outputs(plan, runs, record, evaluation)  # the seeds so far
  print(table, flush=True)

  if ft.SOURCE.value:
    setup = ft.Setup(base_config=base_config, workdir=_workdir, salaad_settings=salaad_settings,
                     out=_OUT.value, eval_batches=_EVAL_BATCHES.value or 10,
                     pretrained=(f"Model `{_MODEL.value}` pretrained (dense) on "
                                 f"`{os.path.basename(_SOURCE.value)}`"),
                     tokens=f"{_BATCH.value}x{_SEQ.value}", seeds=_seeds_text(),
                     model=_MODEL.value)
    print(ft.compare_finetuning(setup, seeds, plan.dense["params"]), flush=True)


if __name__ == "__main__":
  app.run(main)
