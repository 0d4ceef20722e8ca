"""Hyperparameters of the SALAAD transform: checks of the user's values,
static (Python-number) arguments, and per-block values (SALAAD.md §2, §4)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

SPARSE_MODES = ("soft", "topk", "rows", "cols")  # plus "N:M", e.g. "2:4"




def _concrete_float(x) -> Optional[float]:
  """float(x) for Python/NumPy/concrete JAX scalars; None for tracers."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(x))
  except (TypeError, ValueError):
    return None


def _check_value(name: str, value, path: str, low, high, low_open=True):
  v = _concrete_float(value)
  if v is None:
    return
  where = f" for block '{path}'" if path else ""
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}{where}")
  if low is not None and (v <= low if low_open else v < low):
    op = ">" if low_open else ">="
    raise ValueError(f"{name} must be {op} {low}, got {v}{where}")
  if high is not None and v > high:
    raise ValueError(f"{name} must be <= {high}, got {v}{where}")


# Arguments that shape the computation (loop counts, factor shapes, which
# phases run): they must be Python numbers, so ``optax.inject_hyperparams``
# takes them as static_args.
STATIC_ARGS = ("svt_iters", "init_iters", "max_rank", "consolidate_from",
               "consolidate_dropout", "consolidate_factor_lr", "consolidate_global_dropout",
               "consolidate_cut_budgets", "consolidate_cut_overhead",
               "consolidate_cut_jitter", "consolidate_cut_joint", "sparse_capacity")


def _static_float(name: str, value) -> float:
  v = _concrete_float(value)
  if v is None:
    raise ValueError(
        f"{name} is static (it fixes the computation's loops, shapes or phases) and "
        "cannot be traced or injected; with optax.inject_hyperparams pass "
        "static_args=salaad_jax.STATIC_ARGS")
  return v


def _static_budgets(value) -> tuple[float, ...]:
  """``consolidate_cut_budgets`` as a tuple of Python floats in (0, 1]."""
  if isinstance(value, (int, float)) or (hasattr(value, "shape") and not np.shape(value)):
    value = (value,)
  try:
    budgets = tuple(_static_float("consolidate_cut_budgets", v) for v in value)
  except TypeError:
    raise ValueError("consolidate_cut_budgets must be a sequence of fractions in (0, 1], "
                     f"got {value!r}") from None
  for v in budgets:
    _check_value("consolidate_cut_budgets", v, "", 0.0, 1.0)
  return budgets


def _static_int(name: str, value) -> int:
  return int(_static_float(name, value))


class _BlockHparams(NamedTuple):
  rho: Any
  rank_target: Any
  density_target: Any
  k_alpha: Any
  k_beta: Any
  k_d: Any


_HPARAM_RULES = {
    # name: (low, high, low_open)
    "rho": (0.0, None, True),
    "rank_target": (0.0, 1.0, True),
    "density_target": (0.0, 1.0, True),
    "k_alpha": (0.0, None, False),
    "k_beta": (0.0, None, False),
    "k_d": (0.0, None, False),
}


def _per_leaf(name: str, value, treedef, paths):
  """Resolves a scalar, a callable(path) or a params-shaped pytree to one
  value per leaf."""
  if callable(value) and not hasattr(value, "shape"):
    return [value(p) for p in paths]
  leaves = jax.tree.leaves(value)
  if len(leaves) == 1 and jax.tree.structure(value).num_nodes == 1:
    return [value] * len(paths)
  try:
    return treedef.flatten_up_to(value)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name} must be a scalar, a callable(path) -> scalar, or a pytree "
        f"with the params' structure; got a mismatching pytree ({e})") from None


def _block_hparams(hp: dict, treedef, paths, infos) -> list[Optional[_BlockHparams]]:
  resolved = {k: _per_leaf(k, v, treedef, paths) for k, v in hp.items()}
  out = []
  for i, info in enumerate(infos):
    if info is None:
      out.append(None)
      continue
    vals = {k: resolved[k][i] for k in hp}
    for k, v in vals.items():
      _check_value(k, v, info.path, *_HPARAM_RULES[k])
    out.append(_BlockHparams(**vals))
  return out


def _parse_sparse_mode(mode: str):
  if mode in SPARSE_MODES:
    return mode, None
  if isinstance(mode, str) and ":" in mode:
    try:
      n, m = (int(t) for t in mode.split(":"))
    except ValueError:
      n = m = -1
    if 0 < n <= m:
      return "n:m", (n, m)
  raise ValueError(
      f"sparse_mode must be one of {SPARSE_MODES} or 'N:M' (e.g. '2:4'), got {mode!r}")
