"""Tables and plots of ``benchmarks.compare``: runs over seeds, aggregated.

A *run row* is one method trained (or deployed) at one seed: a dict with at
least ``method``, ``seed``, ``params``, ``bytes`` and ``perplexity``.
``aggregate`` folds the run rows of each method into one row: the mean and
the sample standard deviation over seeds of perplexity (and of params and
bytes, which only SALAAD's controller lets vary), and the paired difference
to a reference method (dense): per seed ppl_method - ppl_ref, its mean and
standard error std / sqrt(n).  Seeds are paired because every method of a
seed sees the same data order and validation batches.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
  x = np.asarray(values, np.float64)
  return float(np.mean(x)), (float(np.std(x, ddof=1)) if x.size > 1 else None)


def aggregate(rows: Sequence[Mapping[str, Any]], reference: Optional[str] = "dense"
              ) -> list[dict[str, Any]]:
  """One row per method (in first-seen order) from the run rows of all seeds.

  Each output row has the first run row's other fields and ``n`` (seeds),
  ``perplexity`` / ``perplexity_std``, ``params`` / ``bytes`` (rounded
  means), ``params_std``, ``x_perplexity`` (mean, where present), ``wall_s``
  (mean), and ``delta`` / ``delta_se``: the mean and standard error of the
  per-seed perplexity difference to ``reference`` over the seeds both have
  (None for the reference itself, or without it).
  """
  by_method: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    by_method.setdefault(r["method"], []).append(r)
  ref = {r["seed"]: r["perplexity"] for r in by_method.get(reference, [])}
  out = []
  for method, runs in by_method.items():
    row = dict(runs[0])
    row["n"] = len(runs)
    row["perplexity"], row["perplexity_std"] = _mean_std([r["perplexity"] for r in runs])
    params, row["params_std"] = _mean_std([r["params"] for r in runs])
    row["params"] = int(round(params))
    row["bytes"] = int(round(_mean_std([r["bytes"] for r in runs])[0]))
    for key in ("x_perplexity", "wall_s"):
      vals = [r[key] for r in runs if r.get(key) is not None]
      row[key] = _mean_std(vals)[0] if vals else None
    diffs = [r["perplexity"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
    row["delta"] = row["delta_se"] = None
    if method != reference and diffs:
      row["delta"], std = _mean_std(diffs)
      row["delta_se"] = std / math.sqrt(len(diffs)) if std is not None else None
    out.append(row)
  return out


def ppl_cell(row: Mapping[str, Any], key: str = "perplexity") -> str:
  """'10.230 ± 0.120' (mean ± std over seeds) or '10.230' for one seed."""
  std = row.get(f"{key}_std")
  return f"{row[key]:.3f}" + ("" if std is None else f" ± {std:.3f}")


def delta_cell(row: Mapping[str, Any]) -> str:
  """'+0.512 ± 0.101' (mean ± standard error of the paired difference)."""
  if row.get("delta") is None:
    return ""
  se = row.get("delta_se")
  return f"{row['delta']:+.3f}" + ("" if se is None else f" ± {se:.3f}")


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
  """The rows as CSV with the columns ``keys`` (other fields left out)."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, list(keys), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def markdown(header: str, columns: Sequence[tuple[str, str, Any]],
             rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table under ``header``: ``columns`` are (title, alignment
  ':' for right or '' for left, cell function of a row)."""
  lines = [header, "", "| " + " | ".join(t for t, _, _ in columns) + " |",
           "|" + "|".join("---:" if a == ":" else "---" for _, a, _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(str(cell(r)) for _, _, cell in columns) + " |")
  return "\n".join(lines) + "\n"


def scatter_plot(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> str:
  """Mean validation perplexity against deployment bytes, one labelled point
  per row, error bars ± the standard deviation over seeds.  Draws on a
  ``matplotlib.figure.Figure`` (no pyplot, the backend is left alone)."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  for r in rows:
    ax.errorbar([r["bytes"]], [r["perplexity"]], yerr=[r.get("perplexity_std") or 0.0],
                fmt="o", capsize=3)
    ax.annotate(r["method"], (r["bytes"], r["perplexity"]), textcoords="offset points",
                xytext=(4, 4), fontsize=8)
  ax.set_xlabel("deployment bytes")
  ax.xaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
  ax.set_ylabel("validation perplexity")
  ax.grid(True, alpha=0.3)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
