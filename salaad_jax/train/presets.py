"""Named SALAAD settings: ``--salaad_preset=NAME`` -> TrainConfig fields.

A preset is applied before the explicit flags (a flag given on the command
line or in a flag file wins over the preset) by
:func:`salaad_jax.train.flags.config_from_flags`, and programmatically by
:func:`config_with_preset`.

* ``reference`` — the authors' settings (SALAAD.md §2, §4, §5, §7): exact SVD,
  the reference gains, n_d 1500, alpha_0 = beta_0 = 0, e = 0.999, r* 0.15,
  d* 0.05, fixed rho (smaller on the embedding and head, and from 130M), K
  10 (25 at 350M, 5 at 1B), no schedules, no consolidation, S stored dense
  (``sparse_capacity='none'``: with these slow gains S's density stays far
  above d* for most of training, so a capacity of 3 d* would cut S all along).
  Data, with the authors' per-model exceptions.
* ``recommended`` — this project's rule, :func:`recommended_fields`: one
  function of the model's block shapes, the run's steps and the deployment
  budgets, with no per-model values.

Every choice, and what it was measured against, is in benchmarks/RESULTS.md
("Levers under the fair protocol"; "The reference preset").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from salaad_jax.models.configs import CONFIGS, LlamaConfig
from salaad_jax.train.config import TrainConfig, TrainError, fractions

_REFERENCE = dict(
    every_k=10, rho=1e-6, rho_embed=3e-7, rank_target=0.15, density_target=0.05,
    k_alpha=0.2, k_beta=0.002, k_d=0.01, k_d_embed=1.0, deriv_start=1500, energy=0.999,
    salaad_mode="adaptive", sparse_mode="soft", svt="exact", max_rank=0,
    alpha_init="zero", beta_init=0.0, coupling="coupled", rho_mode="fixed",
    target_schedule_end=0.0, consolidate_from=0.0, sparse_capacity="none",
    consolidate_params="projection", consolidate_support="largest", consolidate_factor_lr=1.0, consolidate_global_dropout=0.0,
    consolidate_cut_budgets="", consolidate_cut_bitmaps=False, consolidate_cut_jitter=0.0,
    consolidate_cut_joint=0.0)

# The deployment budgets (fractions of the dense model's bytes) the
# recommended rule sizes a run for when none are given.
DEPLOY_BUDGETS = (0.4, 0.5, 0.6)
# The recommended rule's fixed part: the fields that do not depend on the
# model, the steps or the budgets (see recommended_fields).
RULED = ("rank_target", "consolidate_cut_budgets", "consolidate_from")
RECOMMENDED_FIXED = {k: v for k, v in dict(
    _REFERENCE, svt="fast", svt_iters=1, density_target=0.08, rho=1e-3, rho_embed=1e-3,
    consolidate_structure="target", consolidate_dropout=0.0, consolidate_params="factors",
    consolidate_factor_lr=1.0, consolidate_cut_joint=0.0).items() if k not in RULED}
ADMM_SHARE = 0.01  # the share of the steps before consolidation


def recommended_fields(model: LlamaConfig, steps: int,
                       budgets: Sequence[float] = DEPLOY_BUDGETS,
                       sparse_format: str = "auto") -> dict[str, Any]:
  """The recommended preset's fields for ``model`` trained ``steps`` steps
  and deployed at ``budgets`` (fractions of its dense bytes, bf16 values).

  The rule (benchmarks/RESULTS.md, "Levers under the fair protocol"; each
  part is one measured lever):

  * the structure is chosen by ADMM with the reference controller (fast
    SVT) for the first 1 % of the steps, at least one controller period
    (``every_k`` steps) and at most half the run:
    ``consolidate_from = min(0.5, max(0.01, K / steps))``;
  * then L's factors and S's values on its support are trained directly
    (``consolidate_params='factors'``) at the run's learning rate
    (``consolidate_factor_lr=1``: 2x measured no better at the tiny model,
    3x diverged at ``small``);
  * the structure fills the *largest* budget: r* is the rank target at which
    L + S, every block at rank r* min(m, n) and density d* = 0.08, takes
    max(budgets) of the dense bytes, S priced in ``sparse_format`` ('auto':
    the format cheapest at d*);
  * the global allocator's cut at every smaller budget is trained too, one
    cut or the whole structure drawn per step (one pass per step, so the run
    costs what an SLTrain run of its size costs), the whole in half the
    steps and the cuts sharing the other half:
    ``consolidate_cut_budgets = sorted(smaller budgets) + [1] * (their
    count)`` (RESULTS.md, row G and "G on fresh seeds");
  * rho 1e-3 on every block (it only acts during the ADMM share).

  Measured at the tiny (132k) and small (857k) models for 1000-5000 steps;
  the values it gives larger models are an extrapolation.

  Raises:
    ValueError: no budget, a budget outside (0, 1], steps < 1, or no r* in
      (0, 1] fills the largest budget at d*.
  """
  from salaad_jax.baselines import registry  # pylint: disable=import-outside-toplevel

  fractions = sorted(float(b) for b in budgets)
  if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"deployment budgets must be fractions in (0, 1], got {list(budgets)}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  fields = dict(RECOMMENDED_FIXED)
  fields["rank_target"] = registry.fill_rank_target(model, fractions[-1],
                                                    fields["density_target"], sparse_format)
  below = [f for f in dict.fromkeys(fractions) if f < fractions[-1]]
  fields["consolidate_cut_budgets"] = ",".join(repr(b).removesuffix(".0")
                                               for b in cut_draws(below))
  fields["consolidate_from"] = min(0.5, max(ADMM_SHARE, fields["every_k"] / steps))
  return fields


def cut_draws(below: Sequence[float]) -> list[float]:
  """The recommended ``consolidate_cut_budgets`` for cuts at ``below`` (each
  < 1): those budgets, then 1.0 (the whole structure) once per cut, so a step
  draws the whole in half the steps and each cut in an equal share of the
  rest; [] when there is no cut."""
  below = list(below)
  return [*below, *[1.0] * len(below)]


PRESETS: dict[str, dict[str, Any]] = {"reference": _REFERENCE,
                                      "recommended": RECOMMENDED_FIXED}

# The reference preset's per-model exceptions (the authors'): {model: fields}.
REFERENCE_OVERRIDES: dict[str, dict[str, Any]] = {
    "130m": dict(k_beta=0.0013, rho=1e-8),
    "350m": dict(k_beta=0.0013, rho=1e-8, every_k=25),
    "1b": dict(k_beta=0.0013, rho=1e-8, every_k=5),
}

# The seeds the recommended preset's settings were chosen on (tinyshakespeare,
# benchmarks/RESULTS.md "Levers"): benchmarks.compare does not report them.
SELECTION_SEEDS = (0, 1, 2)

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
assert all(set(p) <= _FIELDS for p in PRESETS.values())


def preset_fields(name: str, model: str, steps: Optional[int] = None,
                  budgets: Optional[Sequence[float]] = None,
                  vocab_size: int = 0) -> dict[str, Any]:
  """The TrainConfig fields preset ``name`` sets for ``model`` ('' sets none):
  the reference's data, or the recommended rule for ``model`` (its preset's
  vocabulary unless ``vocab_size`` > 0) trained ``steps`` steps (default:
  TrainConfig's) for ``budgets`` (default DEPLOY_BUDGETS)."""
  if not name:
    return {}
  if name not in PRESETS:
    raise TrainError(f"--salaad_preset={name!r} is not a preset; known: {sorted(PRESETS)}")
  if name == "reference":
    return dict(_REFERENCE, **REFERENCE_OVERRIDES.get(model, {}))
  if model not in CONFIGS:
    raise TrainError(f"--model={model!r} is not a model preset; known: {sorted(CONFIGS)}")
  mcfg = CONFIGS[model]
  if vocab_size > 0:
    mcfg = dataclasses.replace(mcfg, vocab_size=int(vocab_size))
  try:
    return recommended_fields(mcfg, TrainConfig.steps if steps is None else int(steps),
                              DEPLOY_BUDGETS if budgets is None else budgets)
  except ValueError as e:
    raise TrainError(f"--salaad_preset=recommended for --model={model}: {e}") from None


def config_with_preset(name: str, **fields) -> TrainConfig:
  """A TrainConfig from preset ``name`` (for ``fields['model']``, default the
  TrainConfig default), overridden by ``fields``."""
  budgets = fields.get("deploy_budgets")
  preset = preset_fields(name, fields.get("model", TrainConfig.model), fields.get("steps"),
                         fractions(budgets, "deploy_budgets") if budgets else None,
                         fields.get("vocab_size", 0))
  return TrainConfig(**{**preset, **fields, "salaad_preset": name})


def with_preset(fields: dict[str, Any], model: str, steps: Optional[int] = None,
                budgets: Optional[Sequence[float]] = None) -> dict[str, Any]:
  """``fields`` with the preset it names in ``salaad_preset`` (if any)
  expanded underneath: the preset's fields for ``model`` (``steps``,
  ``budgets``: :func:`preset_fields`), then ``fields`` (which win)."""
  return {**preset_fields(fields.get("salaad_preset", ""), model, steps, budgets), **fields}
