"""Tables and plots of ``benchmarks.compare``: runs over seeds, aggregated.

A *run row* is one method trained (or deployed) at one seed: a dict with at
least ``method``, ``seed``, ``params``, ``bytes`` and ``perplexity`` (and a
``budget`` where methods are compared at several).  ``aggregate`` folds the
run rows of each group (method, or method and budget) into one row: the mean
and the sample standard deviation over seeds of perplexity (and of params
and bytes, which only SALAAD's controller and allocation let vary), and the
paired difference to a reference method (dense).  ``paired_difference`` of
two groups A and B: per seed d_s = ppl_A,s - ppl_B,s over the seeds both
have, its mean and standard error std(d) / sqrt(n) (sample std).  Seeds are
paired because every method of a seed sees the same data order and
validation batches.
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


def paired_difference(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
                      ) -> tuple[Optional[float], Optional[float], int]:
  """(mean, standard error, n) of ppl_a - ppl_b per seed over the seeds both
  groups of run rows have; (None, None, 0) without a common seed, the
  standard error None with one."""
  ref = {r["seed"]: r["perplexity"] for r in b}
  diffs = [r["perplexity"] - ref[r["seed"]] for r in a if r["seed"] in ref]
  if not diffs:
    return None, None, 0
  mean, std = _mean_std(diffs)
  return mean, (std / math.sqrt(len(diffs)) if std is not None else None), len(diffs)


def group_rows(rows: Sequence[Mapping[str, Any]], key=lambda r: r["method"]
               ) -> dict[Any, list[Mapping[str, Any]]]:
  """Run rows by ``key`` (first-seen order)."""
  out: dict[Any, list[Mapping[str, Any]]] = {}
  for r in rows:
    out.setdefault(key(r), []).append(r)
  return out


def aggregate(rows: Sequence[Mapping[str, Any]], reference: Optional[str] = "dense",
              key=lambda r: r["method"]) -> list[dict[str, Any]]:
  """One row per group ``key`` (default: per method; in first-seen order) from
  the run rows of all seeds.

  Each output row has the first run row's other fields and ``n`` (seeds),
  ``perplexity`` / ``perplexity_std``, ``params`` / ``bytes`` (rounded
  means), ``params_std``, ``x_perplexity``, ``wall_s``, ``kept_rank`` and
  ``kept_nnz`` (means, where present), and ``delta`` / ``delta_se``: the mean and standard error of the
  per-seed perplexity difference to ``reference`` over the seeds both have
  (None for the reference itself, or without it).
  """
  ref = [r for r in rows if r["method"] == reference]
  out = []
  for runs in group_rows(rows, key).values():
    row = dict(runs[0])
    row["n"] = len(runs)
    row["perplexity"], row["perplexity_std"] = _mean_std([r["perplexity"] for r in runs])
    params, row["params_std"] = _mean_std([r["params"] for r in runs])
    row["params"] = int(round(params))
    row["bytes"] = int(round(_mean_std([r["bytes"] for r in runs])[0]))
    for key in ("x_perplexity", "wall_s", "kept_rank", "kept_nnz"):
      vals = [r[key] for r in runs if r.get(key) is not None]
      row[key] = _mean_std(vals)[0] if vals else None
    row["delta"] = row["delta_se"] = None
    if runs[0]["method"] != reference:
      row["delta"], row["delta_se"], _ = paired_difference(runs, ref)
    out.append(row)
  return out


# Runs at several budgets: a run row also has ``budget`` (the fraction as
# text, '' for a model not cut to a budget: dense, SALAAD's trained run).
ROW_ORDER = ("dense", "salaad_trained", "salaad", "salaad_no_admm", "salaad_no_admm_random",
             "salaad_one_pass", "salaad_reference", "sltrain", "lowrank", "lost", "galore",
             "posthoc", "salaad_curve_cut", "salaad_curve_global")
BUDGET_CSV_COLUMNS = ("method", "seed", "budget", "unit", "format", "rank", "kept_rank",
                      "kept_nnz", "params", "bytes", "params_fraction", "bytes_fraction",
                      "perplexity", "x_perplexity", "steps", "tokens", "passes", "train_flops",
                      "wall_s", "workdir")


def _budget_key(row: Mapping[str, Any]) -> tuple[float, int, str]:
  """(budget, the method's place in ``ROW_ORDER`` (others after, by name))."""
  method = row["method"]
  place = ROW_ORDER.index(method) if method in ROW_ORDER else len(ROW_ORDER)
  return (float(row["budget"]) if row["budget"] else -1.0, place, method)


def ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Run rows by seed (first-seen order), budget (the unbudgeted first), then
  ``ROW_ORDER``."""
  seeds = list(dict.fromkeys(r["seed"] for r in rows))
  return sorted(rows, key=lambda r: (seeds.index(r["seed"]), *_budget_key(r)))


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """``aggregate`` per (budget, method) in table order, each row also with
  ``vs_salaad`` / ``vs_salaad_se``: ``paired_difference`` of the deployed
  SALAAD and the method at the same budget (None off a budget)."""
  rows = sorted(aggregate(runs, key=lambda r: (r["budget"], r["method"])), key=_budget_key)
  groups = group_rows(runs, key=lambda r: (r["budget"], r["method"]))
  for row in rows:
    salaad = groups.get((row["budget"], "salaad"))
    row["vs_salaad"] = row["vs_salaad_se"] = None
    if row["budget"] and salaad and row["method"] != "salaad":
      row["vs_salaad"], row["vs_salaad_se"], _ = paired_difference(
          salaad, groups[row["budget"], row["method"]])
  return rows


def ppl_cell(row: Mapping[str, Any], key: str = "perplexity") -> str:
  """'10.230 ± 0.120' (mean ± std over seeds) or '10.230' for one seed."""
  std = row.get(f"{key}_std")
  return f"{row[key]:.3f}" + ("" if std is None else f" ± {std:.3f}")


def delta_cell(row: Mapping[str, Any], key: str = "delta") -> str:
  """'+0.512 ± 0.101' (mean ± standard error of the paired difference)."""
  if row.get(key) is None:
    return ""
  se = row.get(f"{key}_se")
  return f"{row[key]:+.3f}" + ("" if se is None else f" ± {se:.3f}")


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


def budget_plot(rows: Sequence[Mapping[str, Any]], path: str, title: str,
                curve=("salaad",), reference: str = "dense") -> str:
  """Mean validation perplexity (log scale) against mean deployment bytes of
  aggregated rows (``aggregate`` by method and budget): each method of
  ``curve`` (a name or names) as a line through its budgets, every other
  method as points (one marker per
  method), ``reference`` also as a horizontal line; error bars ± the
  standard deviation over seeds.  Draws on a ``matplotlib.figure.Figure``."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(8, 5))
  ax = fig.add_subplot()
  markers = iter("osD^v<>pPX*h" * 4)
  curves = (curve,) if isinstance(curve, str) else tuple(curve)
  for method, group in group_rows(rows).items():
    group = sorted(group, key=lambda r: r["bytes"])
    x = [r["bytes"] for r in group]
    y = [r["perplexity"] for r in group]
    e = [r.get("perplexity_std") or 0.0 for r in group]
    if method in curves:
      ax.errorbar(x, y, yerr=e, fmt="-o", lw=2, ms=5, capsize=3,
                  color=f"C{3 + curves.index(method)}", label=method, zorder=3)
    else:
      ax.errorbar(x, y, yerr=e, fmt=next(markers), ls="none", ms=6, capsize=3, label=method)
    if method == reference:
      ax.axhline(y[0], color="k", ls="-.", lw=1)
  ax.set_xlabel("deployment bytes")
  ax.xaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
  ax.set_ylabel("validation perplexity (log scale)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
