"""Named SALAAD settings: ``--salaad_preset=NAME`` -> TrainConfig fields.

A preset is data: the fields it sets, with per-model exceptions.  It is
applied before the explicit flags (a flag given on the command line or in a
flag file wins over the preset) by :func:`salaad_jax.train.flags.config_from_flags`,
and programmatically by :func:`config_with_preset`.

* ``reference`` — the authors' settings (SALAAD.md §2, §4, §5, §7): exact SVD,
  the reference gains, n_d 1500, alpha_0 = beta_0 = 0, e = 0.999, r* 0.15,
  d* 0.05, fixed rho (smaller on the embedding and head, and from 130M), K
  10 (25 at 350M, 5 at 1B), no schedules, no consolidation, S stored dense
  (``sparse_capacity='none'``: with these slow gains S's density stays far
  above d* for most of training, so a capacity of 3 d* would cut S all along).
* ``recommended`` — this project's measured best on the tiny model: the
  structure is chosen by the first 1 % of training (the reference's
  controller, fast SVT), then the surrogate is trained in its own
  coordinates (*consolidation in factors*: L's factors B, A and S's values
  on its support, at rank ceil(r* min(m, n)) and density 0.08) with the
  factors' learning rate 3x the run's (SLTrain's alpha / r plays that role);
  L stays an SVD, so the run deploys at any budget.  r* sizes the structure
  for the *middle* of the budgets it will be deployed at
  (``benchmarks.compare --salaad_fill``).  The tiny model also trains its
  cut at 40 % of the dense bytes with the joint loss
  (``consolidate_cut_joint``); the small model keeps projected
  consolidation late in training.

Every choice, and what it was measured against, is in benchmarks/RESULTS.md
("Levers"; "The reference preset").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from salaad_jax.train.config import TrainConfig, TrainError

_REFERENCE = dict(
    every_k=10, rho=1e-6, rho_embed=3e-7, rank_target=0.15, density_target=0.05,
    k_alpha=0.2, k_beta=0.002, k_d=0.01, k_d_embed=1.0, deriv_start=1500, energy=0.999,
    salaad_mode="adaptive", sparse_mode="soft", svt="exact", max_rank=0,
    alpha_init="zero", beta_init=0.0, coupling="coupled", rho_mode="fixed",
    target_schedule_end=0.0, consolidate_from=0.0, sparse_capacity="none",
    consolidate_params="projection", consolidate_support="largest", consolidate_factor_lr=1.0, consolidate_global_dropout=0.0,
    consolidate_cut_budgets="", consolidate_cut_bitmaps=False, consolidate_cut_jitter=0.0,
    consolidate_cut_joint=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "reference": _REFERENCE,
    # The first 1 % of training chooses the structure; the rest trains the
    # surrogate in its own factors at r*, d* 0.08, the factors at 3x the lr.
    "recommended": dict(_REFERENCE, svt="fast", svt_iters=1, rank_target=0.2,
                        density_target=0.08, consolidate_from=0.01,
                        consolidate_structure="target", consolidate_dropout=0.0,
                        consolidate_params="factors", consolidate_factor_lr=3.0),
}

# Per-model exceptions: {preset: {model: fields}}.
MODEL_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {
        "130m": dict(k_beta=0.0013, rho=1e-8),
        "350m": dict(k_beta=0.0013, rho=1e-8, every_k=25),
        "1b": dict(k_beta=0.0013, rho=1e-8, every_k=5),
    },
}
# rho: the reference's 1e-6 is for 10k+ steps of 60M+ models; 1e-3 is the
# measured choice for 1000-3000 steps of the tiny and small models.
# r* 0.12: the tiny model's structure fills 50 % of its dense bytes (bitmap S);
# the run also trains its 40 % cut: every step's loss is 0.4 the whole
# structure's plus 0.6 the cut's (--consolidate_cut_joint, two passes a step).
MODEL_OVERRIDES["recommended"] = dict(
    MODEL_OVERRIDES["reference"], tiny=dict(rho=1e-3, rho_embed=1e-3, rank_target=0.12,
                                            consolidate_cut_budgets="0.4,1.0",
                                            consolidate_cut_joint=0.6),
    # small: consolidation in factors at 3x lr measured worse (5000 steps: 7.04
    # against 5.14 at 50-60 % of the bytes), so it keeps the late projection.
    small=dict(rho=1e-3, rho_embed=1e-3, consolidate_from=0.8, consolidate_params="projection",
               consolidate_factor_lr=1.0))

# The seeds the recommended preset's settings were chosen on (tinyshakespeare,
# benchmarks/RESULTS.md "Levers"): benchmarks.compare does not report them.
SELECTION_SEEDS = (0, 1, 2)

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
assert all(set(p) <= _FIELDS for p in PRESETS.values())


def preset_fields(name: str, model: str) -> dict[str, Any]:
  """The TrainConfig fields preset ``name`` sets for ``model`` ('' sets none)."""
  if not name:
    return {}
  if name not in PRESETS:
    raise TrainError(f"--salaad_preset={name!r} is not a preset; known: {sorted(PRESETS)}")
  return dict(PRESETS[name], **MODEL_OVERRIDES.get(name, {}).get(model, {}))


def config_with_preset(name: str, **fields) -> TrainConfig:
  """A TrainConfig from preset ``name`` (for ``fields['model']``, default the
  TrainConfig default), overridden by ``fields``."""
  model = fields.get("model", TrainConfig.model)
  return TrainConfig(**{**preset_fields(name, model), **fields, "salaad_preset": name})


def with_preset(fields: dict[str, Any], model: str) -> dict[str, Any]:
  """``fields`` with the preset it names in ``salaad_preset`` (if any)
  expanded underneath: the preset's fields for ``model``, then ``fields``
  (which win)."""
  return {**preset_fields(fields.get("salaad_preset", ""), model), **fields}
