"""Pretraining methods by name, and matching a method's rank (or SALAAD's rank
target) to a budget."""

from __future__ import annotations

import inspect
from typing import Callable

from salaad_jax.baselines import accounting, dense, galore, lost, lowrank, sltrain
from salaad_jax.baselines.spec import MethodSpec
from salaad_jax.models.configs import LlamaConfig

PRETRAIN_METHODS: dict[str, Callable[..., MethodSpec]] = {
    "dense": dense.method,
    "lowrank": lowrank.method,
    "sltrain": sltrain.method,
    "lost": lost.method,
    "galore": galore.method,
}


def make_method(name: str, **hparams) -> MethodSpec:
  """The MethodSpec of `name` with `hparams` (see each module's `method`).

  Raises:
    ValueError: for an unknown name or a hyperparameter the method lacks.
  """
  if name not in PRETRAIN_METHODS:
    raise ValueError(f"Unknown pretraining method {name!r}; valid names: "
                     f"{sorted(PRETRAIN_METHODS)}.")
  factory = PRETRAIN_METHODS[name]
  valid = set(inspect.signature(factory).parameters)
  unknown = sorted(set(hparams) - valid)
  if unknown:
    raise ValueError(f"method {name!r} has no hyperparameter(s) {unknown}; "
                     f"valid: {sorted(valid)}.")
  return factory(**hparams)


UNITS = ("params", "bytes")


def _check_unit(unit: str) -> None:
  if unit not in UNITS:
    raise ValueError(f"budget unit must be one of {UNITS}, got {unit!r}.")


def match_rank(name: str, config: LlamaConfig, target_params: int, *, unit: str = "params",
               costs: accounting.ByteCosts = accounting.ByteCosts(), **hparams) -> int:
  """Largest global rank r at which method `name` (other hyperparameters
  fixed) has at most `target_params` trained parameters, or with
  unit='bytes' at most that many deployment bytes stored with `costs`.

  Raises:
    ValueError: if the method has no rank, if its size does not depend on
      the rank (GaLore trains a dense model), or if the budget is too small.
  """
  if "rank" not in inspect.signature(PRETRAIN_METHODS.get(name, dense.method)
                                     ).parameters:
    raise ValueError(f"method {name!r} has no rank to match a budget with.")
  _check_unit(unit)
  max_rank = accounting.model_blocks(config).min_dim

  def count(r):
    return getattr(make_method(name, rank=r, **hparams).footprint(config, costs), unit)

  if count(1) == count(max_rank):
    raise ValueError(f"the {unit} count of method {name!r} does not "
                     "depend on its rank; there is no rank to match.")
  return accounting.largest_rank_within(count, int(target_params), max_rank)


def cheapest_sparse_format(config: LlamaConfig, density: float, fmt: str = "auto") -> str:
  """The sparse format SALAAD's structure is priced in: ``fmt``, or for
  'auto' the one of COO / CSR / bitmap whose sparse parts at density
  ``density`` take the fewest bytes over the blocks of ``config``."""
  if fmt != "auto":
    return fmt
  shapes = accounting.model_blocks(config).shapes.values()

  def cost(f):
    costs = accounting.ByteCosts(sparse_format=f)
    return sum(accounting.sparse_footprint(m, n, accounting.kept_count(m * n, density),
                                           costs).bytes for m, n in shapes)

  return min(accounting.SPARSE_FORMATS, key=cost)


def fill_rank_target(config: LlamaConfig, fraction: float, density: float,
                     sparse_format: str = "auto") -> float:
  """SALAAD's r* at which its surrogate at density ``density`` fills
  ``fraction`` of the dense model's deployment bytes (bf16 values, S in
  ``sparse_format``, 'auto': :func:`cheapest_sparse_format`)."""
  from salaad_jax.deploy.allocation import resolve_budget  # pylint: disable=import-outside-toplevel
  blocks = accounting.model_blocks(config)
  b_w = accounting.ByteCosts().b_w
  full = b_w * (blocks.rest + sum(m * n for m, n in blocks.shapes.values()))
  target = resolve_budget(float(fraction), full, b_w * blocks.rest, "bytes")
  costs = accounting.ByteCosts(sparse_format=cheapest_sparse_format(config, density,
                                                                    sparse_format))
  return match_rank_target(config, target, density, unit="bytes", costs=costs)


def match_rank_target(config: LlamaConfig, target_params: int, density: float, *,
                      unit: str = "params",
                      costs: accounting.ByteCosts = accounting.ByteCosts()) -> float:
  """SALAAD's rank target r* at which its surrogate L + S, with every block at
  its targets (rank r_i = r* min(m_i, n_i), nnz_i = d* m_i n_i; SALAAD.md
  §6), has `target_params` parameters:

      P_rest + sum_i [ r* min(m_i, n_i) (m_i + n_i) + d* m_i n_i ] = target

  over the default blocks of `Llama(config)`; with unit='bytes', that many
  deployment bytes stored with `costs` (b_w per value, the sparse parts of
  nnz_i = floor(d* m_i n_i) entries in `costs.sparse_format`):

      b_w P_rest + sum_i [ r* min(m_i, n_i) (m_i + n_i) b_w + sparse_bytes_i ] = target.

  Raises:
    ValueError: if no r* in (0, 1] meets the budget at density d*.
  """
  _check_unit(unit)
  blocks = accounting.model_blocks(config)
  b_w = 1 if unit == "params" else costs.b_w
  lowrank_per_rate = b_w * sum(min(m, n) * (m + n) for m, n in blocks.shapes.values())
  if unit == "params":
    sparse = float(density) * sum(m * n for m, n in blocks.shapes.values())
  else:
    sparse = sum(accounting.sparse_footprint(m, n, accounting.kept_count(m * n, density),
                                             costs).bytes for m, n in blocks.shapes.values())
  rate = (int(target_params) - b_w * blocks.rest - sparse) / lowrank_per_rate
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"no rank target in (0, 1] gives {int(target_params):,} {unit} at "
                     f"density {density:g} (it would be {rate:.3f}).")
  return rate
