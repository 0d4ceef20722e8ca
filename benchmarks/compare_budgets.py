"""Budgets of ``benchmarks.compare``: what every method gets at each budget.

A budget is a fraction f of the dense model, in parameters (P_tgt =
floor(f P_model)) or in deployment bytes (B_tgt = floor(f b_w P_model), bf16
values b_w = 2, int32 indices; ``deploy.allocation.resolve_budget``).  At
each budget:

* every structured baseline (low-rank, SLTrain, LOST) is trained at the
  largest global rank r whose model fits, P(r) <= P_tgt or bytes(r) <=
  B_tgt, counted by the method's own accounting (``baselines.match_rank``).
  A sparse part is stored in one format for the whole model: the given one,
  or with 'auto' the one of COO / CSR / bitmap that admits the largest rank
  (ties: the fewest bytes).  GaLore trains the dense model at the low-rank
  method's rank;
* SALAAD's one run is deployed by the global allocation priced in the same
  units and format ('auto': per budget, the format whose allocation keeps
  the smallest error, ``deploy.allocation.best_format``).

SALAAD's rank target r* is the one at which its surrogate L + S, at the
density target d*, fills the *largest* budget (``baselines.match_rank_target``
in the same units and, for 'auto', in the format cheapest at d*): the run is
trained at the largest size and every deployment only cuts.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from salaad_jax.baselines import accounting, make_method, match_rank, match_rank_target
from salaad_jax.baselines.registry import cheapest_sparse_format
from salaad_jax.deploy import accounting as deploy_accounting
from salaad_jax.deploy.allocation import AUTO_FORMAT, resolve_budget
from salaad_jax.models.configs import LlamaConfig
from salaad_jax.train.config import TrainConfig, cut_budgets as config_cut_budgets
from salaad_jax.train import presets

UNITS = ("params", "bytes")
FORMATS = (*deploy_accounting.SPARSE_FORMATS, AUTO_FORMAT)
RANKED = ("lowrank", "sltrain", "lost")  # trained at a rank matched to the budget
SPARSE = ("sltrain",)  # methods with an unstructured sparse part (whose format matters)


class Matched(NamedTuple):
  """One baseline at one budget: its rank, sparse format (None: no
  unstructured sparse part) and footprint (bytes in that format)."""

  method: str
  rank: int
  fmt: Optional[str]
  params: int
  bytes: int


def dense_size(mcfg: LlamaConfig, unit: str) -> tuple[int, int]:
  """(the dense model in ``unit``, what the parameters outside the blocks take)."""
  blocks = accounting.model_blocks(mcfg)
  total = blocks.rest + sum(m * n for m, n in blocks.shapes.values())
  scale = 1 if unit == "params" else accounting.BF16_BYTES
  return total * scale, blocks.rest * scale


def cut_budgets(mcfg: LlamaConfig, fractions: Sequence[float], fill: float,
                unit: str) -> list[float]:
  """``--consolidate_cut_budgets`` (fractions of the dense bytes, bf16 and a
  bitmap S) for a run whose structure fills the budget ``fill`` and is
  deployed at ``fractions`` of the dense model in ``unit``: the budgets below
  ``fill`` (in bytes themselves; in parameters p plus the blocks' bitmaps'
  share of the dense bytes, the harness's conversion back), then 1.0 (the
  whole structure) once per cut, so that the whole is drawn in half the
  steps (``presets.cut_draws``); [] when none is below."""
  below = sorted(float(f) for f in fractions if f < fill)
  if not below:
    return []
  if unit != "bytes":
    blocks = accounting.model_blocks(mcfg)
    full, _ = dense_size(mcfg, "bytes")
    bitmaps = sum(deploy_accounting.sparse_overhead_bytes("bitmap", m, n)
                  for m, n in blocks.shapes.values())
    below = [min(1.0, f + bitmaps / full) for f in below]
  return presets.cut_draws(below)


def target(mcfg: LlamaConfig, fraction: float, unit: str) -> int:
  """The absolute budget floor(fraction x dense) in ``unit``.

  Raises:
    ValueError: a fraction outside (0, 1] or below the share of the
      parameters outside the blocks.
  """
  full, rest = dense_size(mcfg, unit)
  return resolve_budget(float(fraction), full, rest, unit)


def _hparams(method: str, density: float) -> dict:
  return {"density": density} if method in ("sltrain", "lost") else {}


def footprint(method: str, mcfg: LlamaConfig, rank: int, density: float,
              fmt: Optional[str]) -> accounting.Footprint:
  """The trained model's params and bytes (sparse part stored as ``fmt``)."""
  costs = accounting.ByteCosts(sparse_format=fmt or "coo")
  return make_method(method, rank=rank, **_hparams(method, density)).footprint(mcfg, costs)


def match(method: str, mcfg: LlamaConfig, budget: int, unit: str, density: float,
          fmt: str) -> Matched:
  """``method`` at the largest rank that fits ``budget`` (see the module
  docstring).

  Raises:
    ValueError: even rank 1 does not fit (in every format tried).
  """
  if method not in RANKED:
    raise ValueError(f"method {method!r} has no rank to match to a budget")
  formats = ((deploy_accounting.SPARSE_FORMATS if fmt == AUTO_FORMAT else (fmt,))
             if method in SPARSE else (None,))
  found, error = [], None
  for i, f in enumerate(formats):
    costs = accounting.ByteCosts(sparse_format=f or "coo")
    try:
      rank = match_rank(method, mcfg, budget, unit=unit, costs=costs,
                        **_hparams(method, density))
    except ValueError as e:
      error = e
      continue
    fp = footprint(method, mcfg, rank, density, f)
    found.append((-rank, fp.bytes, i, Matched(method, rank, f, int(fp.params), int(fp.bytes))))
  if not found:
    raise error
  return min(found)[-1]


def salaad_format(mcfg: LlamaConfig, density: float, fmt: str) -> str:
  """The sparse format SALAAD's r* is priced in: ``fmt``, or for 'auto' the
  one whose sparse parts at density d* take the fewest bytes."""
  return cheapest_sparse_format(mcfg, density, fmt)


FILLS = ("largest", "middle")


def fill_target(targets: Sequence[int], fill: str) -> int:
  """The budget SALAAD's structure fills: the largest of ``targets`` or the
  middle one (the lower median)."""
  if fill not in FILLS:
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
  ordered = sorted(targets)
  return ordered[-1] if fill == "largest" else ordered[(len(ordered) - 1) // 2]


def salaad_rank_target(mcfg: LlamaConfig, budgets: Sequence[int], unit: str, density: float,
                       fmt: str) -> float:
  """r* at which SALAAD's surrogate fills the largest of ``budgets``."""
  costs = accounting.ByteCosts(sparse_format=salaad_format(mcfg, density, fmt))
  return match_rank_target(mcfg, max(budgets), density, unit=unit, costs=costs)


def salaad_allocation(config: TrainConfig, unit: str, fmt: str) -> str:
  """How a SALAAD run of ``config`` is deployed: 'cut' (the cuts it trained)
  for a run with --consolidate_cut_budgets priced with every bitmap kept,
  deployed in bytes with a bitmap S (or 'auto'); 'global' otherwise."""
  trained = (bool(config_cut_budgets(config)) and not config.consolidate_cut_bitmaps
             and config.consolidate_from > 0 and config.consolidate_params == "factors")
  return "cut" if trained and unit == "bytes" and fmt in ("bitmap", "auto") else "global"
