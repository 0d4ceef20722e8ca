"""Tables and plot of a capacity spectrum (the rows of ``capacity_spectrum``).

``write_table`` writes ``spectrum.md`` (``to_markdown``: the perplexity by
budget of ``pivot_markdown``, then every row), ``spectrum.csv``
(``to_csv``, the columns ``columns(rows)``: ``COLUMNS``, and
``TIME_COLUMNS`` when the rows were timed) and ``spectrum.json`` (every
field, per-batch losses included); ``plot`` writes a PNG of perplexity
against deployment bytes, and for timed rows a second panel of the forward
time against deployment bytes.  Every file is written to a temporary name
and renamed, so an interrupted run leaves either the previous file or the
new one, never a partial one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from salaad_jax.deploy.spectrum import (COLUMNS, TIME_COLUMNS, SpectrumError, fmt_bytes,
                                        ppl_text, time_text)

TABLE_NAME = "spectrum"


# ---------------------------------------------------------------------------
# Atomic writes.
# ---------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[str], Any]) -> None:
  """``write(tmp)`` then rename tmp onto ``path``; on failure ``path`` is
  untouched and tmp removed."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w") as fh:
      fh.write(text)
  _atomic_write(path, write)


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


def _cell(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


def timed(rows: Sequence[Mapping[str, Any]]) -> bool:
  """Whether the rows carry forward times (``capacity_spectrum(time_forward=...)``)."""
  return any(r.get("forward_ms") is not None for r in rows)


def columns(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
  """``COLUMNS``, followed by ``TIME_COLUMNS`` when the rows were timed."""
  return COLUMNS + TIME_COLUMNS if timed(rows) else COLUMNS


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
  """The rows as CSV with the header ``columns(rows)`` (empty cells for None)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  cols = columns(rows)
  w.writerow(cols)
  for r in rows:
    w.writerow([_cell(r.get(c)) for c in cols])
  return buf.getvalue()


def _pct(x) -> str:
  return "" if x is None else f"{100 * x:.1f}%"


def setup_text(setup: Mapping[str, Any]) -> str:
  """A forward timing's setup in words: 'ell form, 8x64 tokens, median of 5 on cpu'."""
  return (f"{setup['product']} form, {setup['batch']}x{setup['seq']} tokens, median of "
          f"{setup['repeats']} on {setup['device']}")


def _pivot(rows, caption: str, cell: Callable[[Mapping[str, Any]], str]) -> list[str]:
  """Lines of a markdown table of ``cell(row)`` by budget, one column per series."""
  series = list(dict.fromkeys(r["series"] for r in rows if r.get("budget") is not None))
  if not series:
    return []
  budgets = sorted({(r["budget_value"], r["budget"], r["unit"]) for r in rows
                    if r.get("budget") is not None})
  lines = [caption, "", "| budget | target | " + " | ".join(series) + " |",
           "|---|---:|" + "---:|" * len(series)]
  for value, text, unit in budgets:
    hits = [r for r in rows if r.get("budget_value") == value and r.get("unit") == unit]
    cells = []
    for name in series:
      hit = [r for r in hits if r["series"] == name]
      cells.append(cell(hit[0]) if hit else "")
    lines.append(f"| {text} | {value} {unit} ({hits[0]['budget_fraction']:.1%}) | "
                 + " | ".join(cells) + " |")
  return lines + [""]


def pivot_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: perplexity ± standard error by budget, one column per series
  (for timed rows then the forward time, ms and x dense, the same way),
  then one line of dense references and baselines."""
  lines = _pivot(rows, "Validation perplexity (± one standard error over batches) by budget.",
                 ppl_text)
  if timed(rows):
    setup = next((r["forward_setup"] for r in rows if r.get("forward_setup")), None)
    lines += _pivot(rows, "Forward time of the deployed model by budget: median ms of one "
                    "batch, and its time over the dense model's measured alongside"
                    + (f" ({setup_text(setup)})." if setup else "."), time_text)
  refs = [r for r in rows if r.get("budget") is None]
  if refs:
    lines += ["References and baselines: " + "; ".join(
        f"{r['series']} ppl {ppl_text(r)} at {r['params']} params, {fmt_bytes(r['bytes'])}"
        + (f", forward {time_text(r)}" if r.get("forward_ms") is not None else "")
        for r in refs) + "."]
  return "\n".join(lines).rstrip("\n") + "\n"


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """``pivot_markdown`` followed by a table of every row: parameters, bytes,
  loss ± standard error, allocation error, kept ranks and entries (and for
  timed rows the forward time, ms and x dense)."""
  lines = [pivot_markdown(rows)]
  time_cols = TIME_COLUMNS if timed(rows) else ()
  lines += ["| series | budget | params | params % | bytes | bytes % | loss | loss s.e. | "
            "perplexity | rel. error | kept rank | kept nnz |"
            + (" forward ms | x dense |" if time_cols else ""),
            "|---|---|" + "---:|" * (10 + len(time_cols))]
  for r in rows:
    cells = [r["series"], r.get("budget") or "", r["params"], _pct(r["params_fraction"]),
             r["bytes"], _pct(r["bytes_fraction"]), _cell(r.get("loss")),
             _cell(r.get("loss_se")), f"{r['perplexity']:.4g}", _cell(r.get("rel_error")),
             _cell(r.get("kept_rank")), _cell(r.get("kept_nnz"))]
    cells += [_cell(r.get(c)) for c in time_cols]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str, *,
                name: str = TABLE_NAME) -> dict[str, str]:
  """Writes ``<name>.md``, ``<name>.csv`` and ``<name>.json`` (every field,
  per-batch losses included) into ``out_dir``, each atomically.

  Returns {'md': path, 'csv': path, 'json': path}.
  """
  if not rows:
    raise SpectrumError("no rows to write")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "csv", "json")}
  texts = {"md": to_markdown(rows), "csv": to_csv(rows),
           "json": json.dumps([dict(r) for r in rows], indent=1) + "\n"}
  for ext, path in paths.items():
    _write_text(path, texts[ext])
  return paths


# ---------------------------------------------------------------------------
# Plot.
# ---------------------------------------------------------------------------


def _series_style(s: str) -> str:
  return ("-" if s.startswith("salaad") else "--") + ("o" if s.endswith("global") else "s")


def _perplexity_panel(ax, rows, refs: Mapping[str, float], ticker) -> None:
  for s in dict.fromkeys(r["series"] for r in rows if r.get("budget") is not None):
    pts = sorted((r["bytes"], r["perplexity"], r["perplexity"] * (r.get("loss_se") or 0.0))
                 for r in rows if r["series"] == s)
    x, y, e = (np.array(v, float) for v in zip(*pts))
    ax.errorbar(x, y, yerr=e, fmt=_series_style(s), ms=4, capsize=2, label=s)
  for r in rows:
    if r["source"] == "baseline":
      ax.plot([r["bytes"]], [r["perplexity"]], "*", ms=11, label=r["series"])
      ax.annotate(r["series"], (r["bytes"], r["perplexity"]), textcoords="offset points",
                  xytext=(5, 5), fontsize=8)
  for i, (label, ppl) in enumerate(refs.items()):
    ax.axhline(ppl, color="k", ls=(":" if i else "-."), lw=1, label=f"{label}: {ppl:.3f}")
  # Log scale: equal steps in loss (log perplexity) look equal, so the small
  # budgets' large perplexities do not flatten the rest of the curve.
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
  ax.set_ylabel("validation perplexity (log scale)")


def _time_panel(ax, rows) -> None:
  """Forward ms against deployment bytes, one line per series; the dense
  rows' times as horizontal reference lines."""
  for s in dict.fromkeys(r["series"] for r in rows if r.get("budget") is not None):
    pts = sorted((r["bytes"], r["forward_ms"]) for r in rows
                 if r["series"] == s and r.get("forward_ms") is not None)
    if pts:
      x, y = (np.array(v, float) for v in zip(*pts))
      ax.plot(x, y, _series_style(s), ms=4, label=s)
  dense = [r for r in rows if r["source"] == "dense" and r.get("forward_ms") is not None]
  for i, r in enumerate(dense):
    ax.axhline(r["forward_ms"], color="k", ls=(":" if i else "-."), lw=1,
               label=f"{r['series']}: {r['forward_ms']:.3g} ms")
  ax.set_ylim(bottom=0)
  ax.set_ylabel("forward time of one batch (ms, median)")
  if dense and dense[0].get("forward_setup"):
    ax.set_title(setup_text(dense[0]["forward_setup"]), fontsize=8)


def figure(rows: Sequence[Mapping[str, Any]],
           dense_ppl: Union[None, float, Mapping[str, float]] = None,
           title: Optional[str] = None):
  """The ``matplotlib.figure.Figure`` that ``plot`` writes (no pyplot, so
  the process's matplotlib backend is left as it is): one panel, or two for
  timed rows."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  if dense_ppl is None:
    refs = {r["series"]: r["perplexity"] for r in rows if r["source"] == "dense"}
  elif isinstance(dense_ppl, Mapping):
    refs = dict(dense_ppl)
  else:
    refs = {"dense": float(dense_ppl)}
  panels = 2 if timed(rows) else 1
  fig = Figure(figsize=(8 * panels, 5.5), dpi=110)
  axes = fig.subplots(1, panels, squeeze=False)[0]
  _perplexity_panel(axes[0], rows, refs, ticker)
  if panels == 2:
    _time_panel(axes[1], rows)
  for ax in axes:
    ax.set_xlabel("deployment bytes")
    ax.xaxis.set_major_formatter(ticker.EngFormatter(unit="B"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def plot(rows: Sequence[Mapping[str, Any]], path: str,
         dense_ppl: Union[None, float, Mapping[str, float]] = None,
         title: Optional[str] = None) -> str:
  """PNG of perplexity (log scale) against deployment bytes, written atomically.

  One line per series (error bars: ± perplexity x loss_se), one labelled
  point per baseline row, and a horizontal reference line per dense
  perplexity: ``dense_ppl`` (a number or {label: perplexity}); None takes
  the rows with source 'dense'.  Rows with forward times (``timed``) get a
  second panel: forward ms against deployment bytes, one line per series,
  the dense rows' times as reference lines (``figure``).  Returns ``path``.
  """
  fig = figure(rows, dense_ppl, title)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
  return path
