"""Capacity spectrum: validation perplexity of one trained run at many budgets.

One SALAAD run gives, per block i, L_i (singular values sigma~_i) and S_i
(SALAAD.md §6).  For every budget P_tgt (a fraction of P_model or an absolute
parameter count; with unit='bytes' a fraction of b_w P_model or a byte
count) and every allocation method (``hpa``, ``global``):

  1. (r_i, nnz_i) = allocate(spectra, P_tgt, method, gamma) (in bytes:
     the global allocation priced in bytes, and HPA at the largest parameter
     budget whose bytes fit, ``hpa_within_bytes``);
  2. the plain model is evaluated with every block replaced by
     X_hat_i = L_i,r + S_i,nnz (``dense_reconstruction``, in the run's
     parameter dtype) on the first ``eval_batches`` validation batches;
  3. its parameter count P and deployment bytes (``account``, stored as
     ``fmt`` in ``dtype``) are recorded.  fmt='auto' stores every
     deployment in the one sparse format that suits it: for a byte budget
     the format whose allocation keeps the smallest error
     (``allocation.best_format``), for a parameter budget the format of
     fewest bytes; the row's ``fmt`` says which.

Rows of the same table:

* ``salaad/<method>``: the above.
* ``posthoc[dense]/<method>``: the "no training" floor (SALAAD.md §8) — the
  same blocks of a dense-trained run (``dense_workdir``) split post hoc,
  L_i = truncated SVD at rank ``posthoc_rank`` and S_i = the largest
  ``posthoc_density`` share of the residual (``posthoc_factors``), then
  allocated and evaluated exactly like SALAAD.  Without ``dense_workdir``
  the split is made of the SALAAD run's own X and the rows are labelled
  ``posthoc[own X]/<method>``: what ADMM's L, S buy over a post-hoc split of
  the same trained weights.  ``posthoc_rank`` / ``posthoc_density`` default
  to the run's r* / d*, so both pools have the same structure.
* ``dense X (salaad run)`` and ``dense (<method> run)``: the uncompressed
  weights (P = P_model, bytes = b_w P_model), the reference lines.
* one row per ``baseline_workdirs`` entry, read from its ``summary.json``
  (``salaad_jax.deploy.summary``): a single point.

Noise.  ``loss`` is the token-weighted mean cross-entropy over B batches;
``loss_se`` = std_b(loss_b) / sqrt(B) (sample std of the per-batch mean
losses), the standard error over batches.  Every row is evaluated on the same
batches, so two rows compare with the paired standard error
std_b(loss_b^A - loss_b^B) / sqrt(B) (``paired_se``); each row keeps its
per-batch losses in ``batch_losses`` (JSON only).

Forward time (``time_forward``, a ``ForwardTiming``; off by default, on in
``experiments.spectrum``).  Every row of a deployment is also built as the
model that serves it: the allocation stored compactly (``compress``, as
``fmt`` in ``dtype``), its indices decoded once into the runtime form
``time_forward.product`` (``export.runtime_model``), applied by the
structured Llama.  Its jitted forward of one batch of the evaluation's
shape (all logits) is timed against the dense model stored in ``dtype``
(the run's weights X) in the same rounds (``deploy.forward_time``):
``forward_ms`` is the median over rounds, ``forward_vs_dense`` the median
of the per-round ratio (< 1: faster than dense).  The dense rows hold the
dense model's own time (``forward_vs_dense`` = 1 for the SALAAD run's X);
baselines have none.  An allocation already evaluated is not timed again.
Each timed row also holds ``forward_setup`` (JSON only): product, batch,
seq, repeats, warm-up calls and device.

The rows are written as tables and plotted by
``salaad_jax.deploy.spectrum_report`` (``write_table``, ``plot``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from salaad_jax import stats
from salaad_jax import structure as st
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy import allocation
from salaad_jax.deploy.allocation import METHODS, allocate
from salaad_jax.deploy.calibration import activation_weights
from salaad_jax.deploy.compress import compress, dense_reconstruction
from salaad_jax.deploy.evaluation import (BatchEvaluator, SpectrumError, paired_se,  # noqa: F401
                                          rounded, spread_batches)
from salaad_jax.deploy.forward_time import ForwardTiming
from salaad_jax.deploy.spectrum_forward import (TIME_COLUMNS, SpectrumForward,  # noqa: F401
                                                forward_of)
from salaad_jax.deploy.posthoc import posthoc_factors
from salaad_jax.deploy.budgets import (DEFAULT_BUDGETS, Budget, parse_budgets,  # noqa: F401
                                       resolve_budgets)
from salaad_jax.deploy.spectra import Blocks, spectra
from salaad_jax.deploy.summary import read_summary

# salaad_jax.train (runs, datasets, evaluation) is imported inside the functions
# that need it: importing salaad_jax.deploy stays light, and the training
# package may import deploy modules without a cycle.

Progress = Optional[Callable[[str], Any]]

COLUMNS = ("series", "source", "allocation", "budget", "unit", "budget_value", "budget_fraction",
           "fmt", "params", "params_fraction", "bytes", "bytes_fraction", "loss", "loss_se",
           "perplexity", "tokens", "rel_error", "kept_rank", "kept_nnz", "solver", "step",
           "workdir")


# ---------------------------------------------------------------------------
# Loading and checking the runs.
# ---------------------------------------------------------------------------


def _load(workdir: str, step: Optional[int], what: str):
  from salaad_jax.train import TrainError, load_run  # pylint: disable=import-outside-toplevel
  from salaad_jax.train.checkpoint import UnreadableCheckpointError  # pylint: disable=import-outside-toplevel
  try:
    return load_run(os.fspath(workdir), step)
  except UnreadableCheckpointError as e:
    raise SpectrumError(f"{what}: {e} (--step chooses one)") from None
  except TrainError as e:
    raise SpectrumError(f"{what}: {e}") from None


def _shapes(params) -> dict[str, tuple[int, ...]]:
  return {st.path_str(p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _salaad_source(run, where: str):
  try:
    stats.find_state(run.opt_state)
  except ValueError:
    raise SpectrumError(f"{where} is a '{run.config.method}' run and holds no SALAAD state "
                        "(L, S); the capacity spectrum needs a --method=salaad run") from None
  return run.opt_state


def _check_same_model(salaad_run, dense_run, where: str) -> None:
  a, b = _shapes(salaad_run.params), _shapes(dense_run.params)
  if a != b:
    diff = sorted(set(a.items()) ^ set(b.items()))[:4]
    raise SpectrumError(f"{where} is not the same architecture as the SALAAD run "
                        f"(parameters differ: {diff})")
  if dense_run.config.tokenizer != salaad_run.config.tokenizer:
    raise SpectrumError(f"{where} uses tokenizer {dense_run.config.tokenizer!r}, the SALAAD "
                        f"run {salaad_run.config.tokenizer!r}; perplexities would not compare")


def _posthoc_source(params, blocks: Blocks, rank: float, density: float):
  """posthoc_factors of ``params`` on exactly the SALAAD run's blocks and matrix views."""
  m_of = {b.path: b.m for b in blocks.blocks}

  def row_axes(path, shape):
    for k in range(1, len(shape)):
      if math.prod(shape[:k]) == m_of[path]:
        return k
    raise SpectrumError(f"block '{path}' of shape {shape} has no matrix view with "
                        f"{m_of[path]} rows")

  return posthoc_factors(params, lambda path, _: path in m_of, row_axes=row_axes, rank=rank,
                         density=density)


def hpa_within_bytes(blocks: Blocks, max_bytes: int, *, gamma: float = 0.5, fmt: str = "coo",
                     dtype="bfloat16"):
  """HPA(gamma) at the largest parameter budget whose deployment bytes are
  <= ``max_bytes`` (``allocation.hpa_within_bytes``); SpectrumError when
  ``max_bytes`` is below b_w P_rest (HPA at P_rest, keeping no block part)."""
  alloc = allocation.hpa_within_bytes(blocks, max_bytes, gamma, fmt=fmt, dtype=dtype)
  if alloc is None:
    raise SpectrumError(f"{max_bytes} bytes is below what the parameters outside the blocks "
                        "take")
  return alloc


def _allocate(blocks: Blocks, value: int, method: str, unit: str, gamma: float, fmt: str,
              dtype: str):
  if unit == "params":
    alloc = allocate(blocks, value, method, gamma=gamma)
    if fmt == allocation.AUTO_FORMAT:
      fmt = min(acc.SPARSE_FORMATS, key=lambda f: allocation.allocation_bytes(alloc, f, dtype))
    return dataclasses.replace(alloc, fmt=fmt)
  if method == "hpa":
    alloc = hpa_within_bytes(blocks, value, gamma=gamma, fmt=fmt, dtype=dtype)
  else:
    alloc = allocate(blocks, value, method, gamma=gamma, unit="bytes", fmt=fmt, dtype=dtype)
  return alloc if alloc.fmt else dataclasses.replace(alloc, fmt=fmt)


def _allocation_key(alloc) -> tuple:
  return tuple((b.path, b.rank, b.nnz) for b in alloc.blocks)


def _budget_text(b: Budget) -> str:
  return f"{b:g}" if isinstance(b, float) else str(int(b))


# ---------------------------------------------------------------------------
# The spectrum.
# ---------------------------------------------------------------------------


def _run_of(run_or_workdir, step, say):
  """(run, workdir) of a ``Run`` or a workdir (loaded; workdir '' for a run)."""
  if not isinstance(run_or_workdir, (str, os.PathLike)):
    return run_or_workdir, ""
  workdir = os.fspath(run_or_workdir)
  say(f"loading {workdir}")
  return _load(workdir, step, f"workdir {workdir!r}"), workdir


def _dense_run_of(dense_workdir, run, say):
  """(dense run, its workdir), checked to be ``run``'s architecture; (None, None)."""
  if dense_workdir is None:
    return None, None
  dense_dir = os.fspath(dense_workdir)
  say(f"loading {dense_dir}")
  dense_run = _load(dense_dir, None, f"dense_workdir {dense_dir!r}")
  _check_same_model(run, dense_run, f"dense_workdir {dense_dir!r}")
  return dense_run, dense_dir


def _dense_row(base, series, owner, wd, total, b_w, evaluator, forward, say) -> dict[str, Any]:
  """The reference row of a dense model (``owner``'s params as they are)."""
  t0 = time.time()
  row = dict(base, series=series, source="dense", allocation=None, params=total,
             params_fraction=1.0, bytes=total * b_w, bytes_fraction=1.0,
             step=owner.step, workdir=wd, **evaluator(owner.model, owner.params))
  if forward is not None:
    row.update(forward.dense(owner))
  say(f"{series}: ppl {ppl_text(row)}{_forward_text(row)} ({time.time() - t0:.1f}s)")
  return row


class _Pricing(NamedTuple):
  """How a budget is priced and allocated (``capacity_spectrum``'s arguments)."""
  unit: str
  gamma: float
  fmt: str
  dtype: Any


def _posthoc_series(run, of, of_dir, blocks, of_dense: bool, posthoc_rank, posthoc_density,
                    calibrate, say):
  """The post-hoc series of ``capacity_spectrum``: the split of ``of``'s
  weights at the run's r* and d* (or the given ones)."""
  rank = run.config.rank_target if posthoc_rank is None else posthoc_rank
  density = run.config.density_target if posthoc_density is None else posthoc_density
  say(f"post-hoc split (truncated SVD at rank {rank:g} min(m, n) + top {density:g} of the "
      f"residual) of {'the dense run' if of_dense else 'the SALAAD run X'}")
  dec = _posthoc_source(of.params, blocks, rank, density)
  label = "posthoc[dense]" if of_dense else "posthoc[own X]"
  return (label, "posthoc", of, of_dir, spectra(of.params, dec, row_weights=calibrate(of)))


def _budget_rows(series_list, targets, methods, pricing: _Pricing, full: float, evaluator,
                 forward: Optional[SpectrumForward], base: dict, say) -> list[dict[str, Any]]:
  """One row per series, allocation method and budget (``full``: 100 % in
  the budgets' unit); an allocation already evaluated is not evaluated (nor
  timed) again."""
  rows, count, n_eval = [], 0, len(series_list) * len(methods) * len(targets)
  unit, dtype = pricing.unit, pricing.dtype
  for label, src, owner, wd, blks in series_list:
    cache: dict[tuple, dict] = {}
    for method in methods:
      for budget, value in targets:
        count += 1
        t0 = time.time()
        alloc = _allocate(blks, value, method, unit, pricing.gamma, pricing.fmt, dtype)
        counts = acc.account(owner.params, alloc, alloc.fmt, dtype)
        key = _allocation_key(alloc)
        reused = key in cache
        if not reused:
          cache[key] = evaluator(owner.model, dense_reconstruction(owner.params, blks, alloc))
          if forward is not None:
            cache[key].update(forward.deployed(owner, blks, alloc))
        r = dict(base, series=f"{label}/{method}", source=src, allocation=method,
                 budget=_budget_text(budget), unit=unit, budget_value=value,
                 budget_fraction=value / full, fmt=alloc.fmt,
                 params=counts["params"],
                 params_fraction=counts["params_fraction"], bytes=counts["bytes"],
                 bytes_fraction=counts["bytes_fraction"], rel_error=alloc.relative_error,
                 kept_rank=sum(alloc.ranks.values()), kept_nnz=sum(alloc.nnz.values()),
                 solver=alloc.solver or None, step=owner.step, workdir=wd, **cache[key])
        rows.append(r)
        say(f"[{count}/{n_eval}] {r['series']} budget {r['budget']} "
            f"({r['budget_fraction']:.1%} of {unit}): P {r['params']} "
            f"({r['params_fraction']:.1%}), {fmt_bytes(r['bytes'])}, ppl {ppl_text(r)}"
            f"{_forward_text(r)}{' (an allocation already evaluated)' if reused else ''} "
            f"({time.time() - t0:.1f}s)")
  return rows


def capacity_spectrum(run_or_workdir, budgets, *, methods: Sequence[str] = ("hpa", "global"),
                      dense_workdir: Optional[str] = None, posthoc: bool = True,
                      posthoc_rank: Optional[float] = None,
                      posthoc_density: Optional[float] = None,
                      baseline_workdirs: Sequence[str] = (), eval_batches: Optional[int] = None,
                      eval_split: Optional[str] = None, unit: str = "params",
                      fmt: str = "coo", dtype="bfloat16", gamma: float = 0.5,
                      step: Optional[int] = None, calibration_batches: int = 0,
                      eval_spread: bool = False, eval_weight_dtype=None,
                      time_forward: Optional[ForwardTiming] = None,
                      progress: Progress = print) -> list[dict[str, Any]]:
  """Validation loss/perplexity, parameters and bytes of a run at every budget.

  Args:
    run_or_workdir: a ``salaad_jax.train.Run`` (``load_run``) of a SALAAD
      run, or its workdir.
    budgets: fractions in (0, 1] of the dense model's parameters (or bytes,
      see ``unit``) and/or absolute counts (ints), or a string
      '0.3,0.4,50%,120000' (``parse_budgets``).
    methods: allocation methods, a non-empty subset of ('hpa', 'global',
      'cut'; 'cut': the cut a run with ``consolidate_cut_budgets`` trained).
    dense_workdir: a dense-trained run of the same architecture: its
      perplexity is a reference row and its weights feed the post-hoc rows;
      None: the post-hoc split of the SALAAD run's own X.
    posthoc: whether to compute post-hoc rows at all.
    posthoc_rank, posthoc_density: the post-hoc split (rank as a fraction of
      min(m, n), share of residual entries); default: the run's r* and d*.
    baseline_workdirs: workdirs (or .json paths) holding a ``summary.json``.
    eval_batches: validation batches per evaluation; default: the run's.
    eval_split: the split to evaluate; default: the run's ``eval_split``.
    unit: 'params' (budgets count parameters, P_model = 100 %) or 'bytes'
      (deployment bytes in ``fmt``/``dtype``, b_w P_model = 100 %; the
      global allocation is priced in bytes and HPA takes the largest
      parameter budget that fits, ``hpa_within_bytes``).
    fmt: sparse storage priced in the bytes, 'coo' | 'csr' | 'bitmap', or
      'auto' (per budget, see above).
    dtype: stored value dtype, 'bfloat16' or 'float32'.
    gamma: HPA's low-rank share of the cut (also the HPA candidate of global).
    step: checkpoint step of the run(s); default: the latest.
    calibration_batches: 0 (allocate by the Frobenius error of L and S), or
      the number of *training* batches (``train.calibration_dataset``: the
      training text in another order; never the evaluated split) on which
      each model's input second moments are measured: every allocation then
      ranks triplets and entries by the output error they cause
      (``calibration.activation_weights``, ``spectra(row_weights=...)``);
      the post-hoc rows take the dense model's own moments.
    eval_spread: the ``eval_batches`` batches spread evenly over the whole
      split (``spread_batches``) instead of its first ones.
    eval_weight_dtype: None, or the dtype every evaluated model's weights
      are rounded to first (e.g. 'bfloat16', the dtype the bytes are priced
      in; the deployed X_hat is rounded as a whole).
    time_forward: None, or how each deployment's forward is timed against
      dense (``ForwardTiming``: product, batch shape, repeats; its batch and
      seq default to the evaluation batch's): the rows gain
      ``TIME_COLUMNS`` (see above).
    progress: called with one line per evaluation (None: silent).

  Returns:
    Rows (dicts with the keys ``COLUMNS``, with ``time_forward`` also
    ``TIME_COLUMNS``, plus ``batch_losses``): the dense references first,
    then each series in ascending budget, then baselines.

  Raises:
    SpectrumError (before any evaluation): a bad argument, a budget above
    100 % or below P_rest (the parameters outside the blocks), a run without
    SALAAD state, a dense run of another architecture, a missing or invalid
    summary, with ``time_forward`` blocks the structured Llama cannot hold.
  """
  say = progress or (lambda _: None)
  methods, dtype = _check_args(methods, unit, fmt, dtype, gamma, eval_batches, posthoc_rank,
                               posthoc_density, calibration_batches)
  wanted = parse_budgets(budgets)

  # Runs, budgets and summaries are all checked before anything is evaluated.
  run, workdir = _run_of(run_or_workdir, step, say)
  calibrate = _calibrator(run.config, calibration_batches, say)
  blocks = spectra(run.params, _salaad_source(run, f"workdir {workdir!r}" if workdir
                                              else "the run"),
                   row_weights=calibrate(run))
  total, rest = blocks.total_params, blocks.rest_params
  b_w = acc.value_bytes(dtype)
  scale = 1 if unit == "params" else b_w
  targets = resolve_budgets(wanted, total * scale, rest * scale, unit)
  dense_run, dense_dir = _dense_run_of(dense_workdir, run, say)
  summaries = [_read_baseline(w) for w in baseline_workdirs]
  evaluator = make_evaluator(run.config, eval_split or run.config.eval_split,
                             eval_batches or run.config.eval_batches, spread=eval_spread,
                             weight_dtype=eval_weight_dtype)
  say(f"P_model {total} params ({fmt_bytes(total * b_w)} in {dtype}), outside the blocks "
      f"{rest} ({rest / total:.1%}: the smallest budget); {len(blocks.blocks)} blocks; "
      f"{len(evaluator.batches)} validation batches")
  forward = forward_of(run, blocks, evaluator, time_forward, dtype, say)

  base = dict(budget=None, unit=None, budget_value=None, budget_fraction=None, fmt=None,
              rel_error=None, kept_rank=None, kept_nnz=None, solver=None)
  dense = [("dense X (salaad run)", run, workdir)]
  if dense_run is not None:
    dense.append((f"dense ({dense_run.config.method} run)", dense_run, dense_dir))
  rows = [_dense_row(base, series, owner, wd, total, b_w, evaluator, forward, say)
          for series, owner, wd in dense]

  series_list = [("salaad", "salaad", run, workdir, blocks)]
  if posthoc:
    of, of_dir = (dense_run, dense_dir) if dense_run is not None else (run, workdir)
    series_list.append(_posthoc_series(
        run, of, of_dir, blocks, dense_run is not None, posthoc_rank, posthoc_density,
        calibrate, say))
  rows += _budget_rows(series_list, targets, methods, _Pricing(unit, gamma, fmt, dtype),
                       total * scale, evaluator, forward, base, say)

  for where, s in summaries:
    rows.append(_baseline_row(base, where, s, total, b_w, forward is not None))
    say(f"baseline {s['label']}: P {s['params']}, {fmt_bytes(s['bytes'])}, "
        f"ppl {s['perplexity']:.3f}")
  return rows


def _check_args(methods, unit, fmt, dtype, gamma, eval_batches, posthoc_rank,
                posthoc_density, calibration_batches):
  """(methods as a tuple, canonical dtype name); SpectrumError on a bad argument."""
  methods = tuple(methods)
  if not methods or any(m not in METHODS for m in methods) or len(set(methods)) < len(methods):
    raise SpectrumError(f"methods must be distinct entries of {list(METHODS)}, got "
                        f"{list(methods)}")
  if unit not in ("params", "bytes"):
    raise SpectrumError(f"unit must be 'params' or 'bytes', got {unit!r}")
  if fmt not in (*acc.SPARSE_FORMATS, allocation.AUTO_FORMAT):
    raise SpectrumError(f"fmt must be one of {[*acc.SPARSE_FORMATS, allocation.AUTO_FORMAT]} "
                        f"(the storage the bytes are priced in), got {fmt!r}")
  if "cut" in methods and unit == "bytes" and fmt not in ("bitmap", allocation.AUTO_FORMAT):
    raise SpectrumError(f"method 'cut' prices bytes with S as a bitmap: fmt must be 'bitmap' "
                        f"or 'auto', got {fmt!r}")
  try:
    dtype = acc.dtype_name(dtype)
  except ValueError as e:
    raise SpectrumError(str(e)) from None
  if not 0.0 <= gamma <= 1.0:
    raise SpectrumError(f"gamma must lie in [0, 1], got {gamma}")
  if eval_batches is not None and eval_batches < 1:
    raise SpectrumError(f"eval_batches must be >= 1, got {eval_batches}")
  for name, v in (("posthoc_rank", posthoc_rank), ("posthoc_density", posthoc_density)):
    if v is not None and not 0.0 <= v <= 1.0:
      raise SpectrumError(f"{name} must lie in [0, 1], got {v}")
  if not isinstance(calibration_batches, int) or calibration_batches < 0:
    raise SpectrumError(f"calibration_batches must be an integer >= 0, got {calibration_batches!r}")
  return methods, dtype


def _read_baseline(workdir) -> tuple[str, dict]:
  try:
    return os.fspath(workdir), read_summary(workdir)
  except ValueError as e:
    raise SpectrumError(f"baseline: {e}") from None


def make_evaluator(config, split: str, num_batches: Optional[int], *, spread: bool = False,
                   weight_dtype=None) -> BatchEvaluator:
  """The evaluator of ``split`` of ``config``'s data: its first
  ``num_batches`` batches, or with ``spread`` as many spread over the whole
  split (``spread_batches``; 0 or None: all of it), the weights rounded to
  ``weight_dtype``."""
  from salaad_jax.train import TrainError, make_eval_dataset  # pylint: disable=import-outside-toplevel
  try:
    # Whole batches: with several processes each evaluates its own copy of the run.
    ds = make_eval_dataset(config, split, whole_batches=True)
    batches = (spread_batches(ds, num_batches) if spread
               else ds.eval_batches(num_batches))
    return BatchEvaluator(batches, weight_dtype)
  except TrainError as e:
    raise SpectrumError(str(e)) from None


def _calibrator(config, num_batches: int, say: Progress):
  """run -> its calibration row weights (None without calibration); the
  batches are read once, from the training split in calibration order."""
  if not num_batches:
    return lambda run: None
  from salaad_jax.train import TrainError  # pylint: disable=import-outside-toplevel
  from salaad_jax.train.inputs import calibration_dataset  # pylint: disable=import-outside-toplevel
  try:
    ds = calibration_dataset(config)
    batches = [next(ds)["inputs"] for _ in range(num_batches)]
  except TrainError as e:
    raise SpectrumError(f"calibration: {e}") from None
  say(f"calibration: input second moments on {num_batches} training batches "
      f"({sum(b.size for b in batches)} tokens)")
  return lambda run: activation_weights(run.model, run.params, batches)


def _baseline_row(base: dict, where: str, s: dict, total: int, b_w: int,
                  timed: bool) -> dict[str, Any]:
  """A summary.json as a row; fractions against its own dense_params (else
  this run's P_model) and its own dtype (else this table's); no forward
  time (None in ``TIME_COLUMNS`` when the table is ``timed``)."""
  dense_params = s.get("dense_params") or total
  s_bw = acc.value_bytes(s["dtype"]) if s.get("dtype") in ("bfloat16", "float32") else b_w
  loss = s["loss"] if s.get("loss") is not None else math.log(s["perplexity"])
  row = dict(base, series=s["label"], source="baseline", allocation=None, fmt=s.get("fmt"),
             params=s["params"], params_fraction=s["params"] / dense_params,
             bytes=s["bytes"], bytes_fraction=s["bytes"] / (dense_params * s_bw), loss=loss,
             loss_se=None, perplexity=s["perplexity"], tokens=None, step=s.get("step"),
             workdir=where, batch_losses=None)
  return dict(row, **dict.fromkeys(TIME_COLUMNS)) if timed else row


# ---------------------------------------------------------------------------
# Text shared by the progress lines and the tables.
# ---------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
  """A byte count with a decimal unit: '1.50 MB', '512 B'."""
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def ppl_text(row: Mapping[str, Any]) -> str:
  """A row's perplexity, ± perplexity x loss_se where the row has a standard error."""
  se = row.get("loss_se")
  if se is None:
    return f"{row['perplexity']:.3f}"
  return f"{row['perplexity']:.3f} ± {row['perplexity'] * se:.3f}"


def time_text(row: Mapping[str, Any]) -> str:
  """A row's forward time, '3.21 ms (0.84x dense)'; '' for a row without one."""
  if row.get("forward_ms") is None:
    return ""
  return f"{row['forward_ms']:.3g} ms ({row['forward_vs_dense']:.2f}x dense)"


def _forward_text(row: Mapping[str, Any]) -> str:
  return f", forward {time_text(row)}" if row.get("forward_ms") is not None else ""
