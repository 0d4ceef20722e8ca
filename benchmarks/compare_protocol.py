"""The fair protocol of ``benchmarks.compare``: equal tuning, matched compute,
fresh seeds, and the controls that isolate what SALAAD's parts contribute.

* **Matched compute.** Every run trains for the same training FLOPs, those of
  the SALAAD run at ``--steps`` (``salaad_jax.train.compute``: every pass
  counted, the joint cut loss's second one included, and SALAAD's SVT and
  factor work): a method with cheaper steps trains more of them, over its
  own schedule (warm-up and consolidation are fractions of its steps).
* **Equal tuning.** Every method gets the same number of trials
  (``--tune_trials``): trial 0 is its default settings, trials 1.. are draws
  from its space (``SPACES``; log-uniform or uniform, from a generator
  seeded by the method's name, so the trials are the same in every
  invocation), each trained on the tuning seeds at matched compute and
  scored on the *selection* split, never the reported one.  A baseline
  trained per budget is tuned at the middle budget, its settings then used
  at every budget (SLTrain's low-rank scale is alpha / r, so alpha = scale
  r at each rank).  SALAAD is scored by the geometric mean of its deployed
  perplexities over the budgets (one run serves them all).
* **Fresh seeds.** The reported seeds may not be tuning seeds, nor seeds the
  preset was chosen on (``presets.SELECTION_SEEDS``).
* **Controls** (SALAAD runs that differ from the recipe in one thing, at the
  same compute): ``CONTROLS``.

The chosen settings are written to ``<out>/tuned.json`` and can be saved
under a name (``benchmarks/tuned/<name>.json``) that a later run takes with
``--tuned=<name>`` instead of tuning again.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")

# name -> (kind, low, high): 'log' (log-uniform) or 'uniform'.
SPACES: dict[str, dict[str, tuple[str, float, float]]] = {
    "dense": {"lr": ("log", 1e-3, 1e-2)},
    "lowrank": {"lr": ("log", 1e-3, 1e-2)},
    "lost": {"lr": ("log", 1e-3, 1e-2), "density": ("uniform", 0.01, 0.06)},
    "sltrain": {"lr": ("log", 1e-3, 1e-2), "scale": ("log", 0.25, 8.0),
                "density": ("uniform", 0.01, 0.06)},
    "salaad": {"lr": ("log", 1e-3, 1e-2), "consolidate_factor_lr": ("log", 1.0, 8.0),
               "consolidate_cut_joint": ("uniform", 0.3, 0.8), "rho": ("log", 1e-4, 1e-2)},
}
TUNED_METHODS = tuple(SPACES)

# Each control: what it isolates, and its TrainConfig fields over SALAAD's
# (tuned) settings.  consolidate_from 1e-6 rounds to step 0: the structure is
# chosen from the first iterate (the initial weights after one warm-up step
# of the smallest learning rate), before any ADMM round.
CONTROLS: dict[str, tuple[str, dict[str, Any]]] = {
    "reference": ("the authors' SALAAD (reference preset): ADMM all along, deployed by the "
                  "global allocator", {"salaad_preset": "reference"}),
    "no_admm": ("the recipe without ADMM: the structure from the truncated SVD of the initial "
                "weights and their largest residual entries", {"consolidate_from": 1e-6}),
    "no_admm_random": ("as no_admm with S's support drawn at random (SLTrain's kind of "
                       "support)", {"consolidate_from": 1e-6, "consolidate_support": "random"}),
    "one_pass": ("the recipe with one pass per step (the whole structure or a cut drawn per "
                 "step instead of both in every step's loss)", {"consolidate_cut_joint": 0.0}),
}



def distinct_controls(names, config_of) -> tuple[dict[str, dict[str, Any]], list[str]]:
  """The controls of ``names`` whose run differs from the recipe's, name ->
  fields, and those that do not (e.g. ``one_pass`` where the recipe already
  takes one pass per step): ``config_of(fields)`` is the run's config with
  ``fields`` over the recipe's, ``config_of({})`` the recipe's."""
  recipe = config_of({})
  kept, same = {}, []
  for name in names:
    if name not in CONTROLS:
      raise ValueError(f"unknown control {name!r}; known: {sorted(CONTROLS)}")
    fields = CONTROLS[name][1]
    if config_of(fields) == recipe:
      same.append(name)
    else:
      kept[name] = fields
  return kept, same

def defaults(method: str, lr: float, salaad: Optional[Mapping[str, Any]] = None,
             density: float = 0.03) -> dict:
  """Trial 0 of ``method``: its settings before tuning (SALAAD: its preset's,
  ``salaad``; SLTrain: the authors' scale alpha / r = 32 / 128 and
  ``density``; LOST: ``density``)."""
  if method not in SPACES:
    raise ValueError(f"no tuning space for {method!r}; known: {sorted(SPACES)}")
  out = {"lr": float(lr)}
  if method == "sltrain":
    out.update(scale=0.25, density=float(density))
  elif method == "lost":
    out.update(density=float(density))
  elif method == "salaad":
    salaad = salaad or {}
    out.update(consolidate_factor_lr=float(salaad.get("consolidate_factor_lr", 1.0)),
               consolidate_cut_joint=float(salaad.get("consolidate_cut_joint", 0.0)),
               rho=float(salaad.get("rho", 1e-3)))
  return out


def trials(method: str, n: int, first: Mapping[str, Any]) -> list[dict]:
  """``n`` settings of ``method``: ``first`` (its defaults), then draws from
  its space (the same draws for the same method in every invocation)."""
  if n < 1:
    raise ValueError(f"the number of trials must be >= 1, got {n}")
  space = SPACES[method]
  rng = np.random.default_rng(zlib.crc32(method.encode()))
  out = [dict(first)]
  for _ in range(n - 1):
    draw = {}
    for key, (kind, lo, hi) in space.items():
      u = rng.random()
      draw[key] = float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
                        if kind == "log" else lo + u * (hi - lo))
    out.append(draw)
  return out


def apply(method: str, settings: Mapping[str, Any], rank: Optional[int] = None) -> dict:
  """(TrainConfig fields, method options) of ``settings`` for ``method``
  (SLTrain at ``rank``: alpha = scale x rank)."""
  fields, options = {"lr": float(settings["lr"])}, {}
  if method == "sltrain":
    if rank is None:
      raise ValueError("SLTrain's settings need its rank (alpha = scale x rank)")
    options.update(alpha=f"{settings['scale'] * rank:.6g}", density=f"{settings['density']:.6g}")
  elif method == "lost":
    options.update(density=f"{settings['density']:.6g}")
  elif method == "salaad":
    for key in ("consolidate_factor_lr", "consolidate_cut_joint"):
      fields[key] = float(settings[key])
    fields.update(rho=float(settings["rho"]), rho_embed=float(settings["rho"]))
  return {"fields": fields, "options": options}


def score(perplexities: Sequence[float]) -> float:
  """A trial's selection score: the geometric mean of its perplexities (one
  per budget it is deployed or trained at)."""
  if not perplexities:
    raise ValueError("a trial needs at least one perplexity")
  return float(math.exp(np.mean(np.log(np.asarray(perplexities, np.float64)))))


def choose(results: Sequence[Mapping[str, Any]]) -> dict:
  """The trial of lowest score (the first on a tie): {settings, score, trial}."""
  if not results:
    raise ValueError("no trial to choose from")
  best = min(range(len(results)), key=lambda i: (results[i]["score"], i))
  return {"settings": dict(results[best]["settings"]), "score": results[best]["score"],
          "trial": best}


def tuned_path(name_or_path: str) -> str:
  """A tuned file: a path to a .json file, or a name in ``benchmarks/tuned/``."""
  if name_or_path.endswith(".json") or os.sep in name_or_path:
    return name_or_path
  return os.path.join(TUNED_DIR, f"{name_or_path}.json")


def write_tuned(path: str, record: Mapping[str, Any]) -> None:
  """Writes a tuned record atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(record, fh, indent=1, sort_keys=True)
    fh.write("\n")
  os.replace(tmp, path)


def read_tuned(name_or_path: str) -> dict:
  """The tuned record of a name or path.

  Raises:
    ValueError: no such file, or not a tuned record.
  """
  path = tuned_path(name_or_path)
  if not os.path.isfile(path):
    raise ValueError(f"no tuned settings {name_or_path!r} ({path} does not exist)")
  with open(path) as fh:
    record = json.load(fh)
  if not isinstance(record, dict) or not isinstance(record.get("methods"), dict) or not all(
      isinstance(m, dict) and "settings" in m.get("chosen", {})
      for m in record["methods"].values()):
    raise ValueError(f"{path} is not a tuned record (methods -> chosen -> settings)")
  return record


def check_fresh(reported: Sequence[int], tuning: Sequence[int],
                selection: Sequence[int] = ()) -> None:
  """Raises ValueError (one line) when a reported seed was a tuning seed or a
  seed the preset was chosen on."""
  for seed in reported:
    if seed in set(tuning):
      raise ValueError(f"seed {seed} was a tuning seed: report on fresh seeds (tuning seeds "
                       f"{sorted(set(tuning))})")
    if seed in set(selection):
      raise ValueError(f"seed {seed} chose the SALAAD preset: report on fresh seeds (seeds "
                       f"the preset was chosen on: {sorted(set(selection))})")
