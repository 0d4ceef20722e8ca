"""The budgets of a capacity spectrum: parsed from the command line and
resolved to absolute targets.

A budget is a share of the dense model in (0, 1] (a float, or 'N%') or an
absolute parameter count (an integer); ``resolve_budgets`` turns them into
targets in the spectrum's unit, deduplicated and ascending.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np

from salaad_jax.deploy.allocation import resolve_budget
from salaad_jax.deploy.evaluation import SpectrumError

__all__ = ["Budget", "DEFAULT_BUDGETS", "parse_budgets", "resolve_budgets"]

Budget = Union[int, float]
DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_INT = re.compile(r"^\d[\d_]*$")


def _parse_one(token: str) -> Budget:
  t = token.strip()
  if not t:
    raise SpectrumError("empty budget in the list (two commas in a row?)")
  try:
    if t.endswith("%"):
      value = float(t[:-1]) / 100.0
    elif _INT.match(t):
      value = int(t.replace("_", ""))
    else:
      value = float(t)
  except ValueError:
    raise SpectrumError(f"budget {t!r} is neither a fraction (0.4, 40%) nor a parameter "
                        "count (an integer)") from None
  return value


def _check_syntax(b: Budget, token) -> Budget:
  if isinstance(b, float):
    if not math.isfinite(b) or not 0.0 < b <= 1.0:
      hint = " (write an absolute parameter count as an integer)" if b > 1 else ""
      raise SpectrumError(f"budget {token!r} is not a fraction in (0, 1] of the dense "
                          f"parameter count{hint}")
  elif b <= 0:
    raise SpectrumError(f"budget {token!r} must be a positive count")
  elif b == 1:
    raise SpectrumError(f"budget {token!r} is an absolute count of 1; write 1.0 for 100 % "
                        "of the dense model")
  return b


def parse_budgets(budgets: Union[str, Iterable[Any]]) -> list[Budget]:
  """Budgets from '0.3,0.4,50%,120000' or a sequence of numbers/strings.

  A float (or 'N%') is a share of the dense parameter count in (0, 1]; an
  integer is an absolute parameter count.  Raises SpectrumError on a token
  that is neither, a fraction outside (0, 1], a count <= 0, or no budget.
  """
  items = budgets.split(",") if isinstance(budgets, str) else list(budgets)
  out = []
  for item in items:
    if isinstance(item, str):
      value = _parse_one(item)
    elif isinstance(item, (bool, np.bool_)) or not isinstance(
        item, (int, float, np.integer, np.floating)):
      raise SpectrumError(f"budget {item!r} is not a number")
    else:
      value = int(item) if isinstance(item, (int, np.integer)) else float(item)
    out.append(_check_syntax(value, item))
  if not out:
    raise SpectrumError("no budget given")
  return out


def resolve_budgets(budgets: Sequence[Budget], full: int, minimum: int,
                    unit: str) -> list[tuple[Budget, int]]:
  """(budget as given, absolute target in ``unit``), deduplicated, ascending."""
  seen = {}
  for b in budgets:
    try:
      value = resolve_budget(b, full, minimum, unit)
    except ValueError as e:
      raise SpectrumError(str(e)) from None
    seen.setdefault(value, b)
  return sorted(((b, v) for v, b in seen.items()), key=lambda x: x[1])
