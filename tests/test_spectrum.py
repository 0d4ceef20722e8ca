"""The capacity spectrum (``salaad_jax.deploy.spectrum``, its tables and plot in
``salaad_jax.deploy.spectrum_report``, ``experiments.spectrum``) and the
summary format (``salaad_jax.deploy.summary``).

One tiny SALAAD run and one dense run (same model, same data) are trained
once for the session (``shakespeare_runs`` in tests/conftest.py, shared with
tests/test_pretrain_app.py), in subprocesses of ``experiments.pretrain``
(SALAAD's batched LAPACK calls need NPROC raised before JAX starts).  On
``tinyshakespeare.txt`` when it is present, otherwise on the synthetic corpus
(the tests about real text then skip).

Noise: every row is evaluated on the same validation batches, so two rows
differ by more than noise when their loss difference exceeds
``TOLERANCE_SE`` paired standard errors, std_b(loss_b^A - loss_b^B) / sqrt(B)
over the B batches (``spectrum.paired_se``).  Identical allocations give a
difference (and a standard error) of exactly 0.
"""

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest

import salaad_jax as sj
from salaad_jax import deploy
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy import spectrum_report as report
from salaad_jax.deploy import summary as sm
from salaad_jax.train import load_run

from conftest import SHAKESPEARE_EVAL_BATCHES, app_env, run_app, run_app_cases
from helpers import NEEDS_SHAKESPEARE, ROOT, assert_one_line_error

TOLERANCE_SE = 2.0  # one-sided: loss may rise by at most 2 paired standard errors
BUDGETS = (0.26, 0.28, 0.3, 0.33, 0.36, 0.4, 0.45, 0.5, 0.6, 0.8, 1.0)
EVAL_BATCHES = SHAKESPEARE_EVAL_BATCHES


def app(*args, timeout: float = 240) -> subprocess.CompletedProcess:
  return run_app("experiments.spectrum", *args, timeout=timeout)


@pytest.fixture(scope="module")
def runs(shakespeare_runs):
  """(salaad workdir, dense workdir): the session's shared pair of runs."""
  return shakespeare_runs.salaad, shakespeare_runs.dense


@pytest.fixture(scope="module")
def rows(runs):
  salaad, dense = runs
  return sp.capacity_spectrum(str(salaad), BUDGETS, dense_workdir=str(dense), progress=None)


def _series(rows, name):
  out = [r for r in rows if r["series"] == name]
  assert out, (name, sorted({r["series"] for r in rows}))
  return sorted(out, key=lambda r: r["budget_value"])


def _rises(series):
  """(budget, rise in loss, paired s.e.) wherever the loss rises by more than
  TOLERANCE_SE paired standard errors from one budget to the next."""
  bad = []
  for a, b in zip(series, series[1:]):
    rise = b["loss"] - a["loss"]
    if rise > TOLERANCE_SE * sp.paired_se(a, b) + 1e-12:
      bad.append((b["budget"], rise, sp.paired_se(a, b)))
  return bad


# ---------------------------------------------------------------------------
# A NumPy oracle of the allocations: the exact SVD of each block's L (read
# from the optimizer state), the entries of its S, counts written out.
# ---------------------------------------------------------------------------


class _Block(NamedTuple):
  m: int
  n: int
  sigma: np.ndarray  # singular values of diag(d) L, descending (d = 1 unweighted)
  entry_gain: np.ndarray  # (d_row s)^2 of the nonzero entries of S, descending


class _Kept(NamedTuple):
  ranks: list
  nnz: list
  error: float  # the squared error of what is dropped


def _oracle_blocks(run, row_weights=None) -> tuple[list, int, int]:
  """(blocks, P_model, P_rest) of a SALAAD run, in its blocks' order."""
  factors, sparse = sj.low_rank_factors(run.opt_state), sj.sparse_parts(run.opt_state)
  blocks = []
  for path, f in factors.items():
    u, s, v = (np.asarray(x, np.float64) for x in f)
    m, n = u.shape[0], v.shape[0]
    d = np.ones(m) if row_weights is None else np.asarray(row_weights[path], np.float64)
    sigma = np.linalg.svd(d[:, None] * ((u * s) @ v.T), compute_uv=False)[:int(np.sum(s > 0))]
    sigma = sigma[sigma > sigma[0] * max(m, n) * np.finfo(np.float64).eps] if sigma.size else sigma
    weighted = d[:, None] * np.asarray(sparse[path], np.float32).reshape(m, n)
    blocks.append(_Block(m, n, sigma, np.sort(weighted[weighted != 0] ** 2)[::-1]))
  total = sum(int(np.size(x)) for x in jax.tree.leaves(run.params))
  return blocks, total, total - sum(b.m * b.n for b in blocks)


def _kept(blocks, ranks, nnz) -> _Kept:
  error = sum(float(np.sum(b.sigma[r:] ** 2) + np.sum(b.entry_gain[k:]))
              for b, r, k in zip(blocks, ranks, nnz))
  return _Kept(list(ranks), list(nnz), error)


def _params_of(blocks, rest, kept: _Kept) -> int:
  return rest + sum((b.m + b.n) * r + k for b, r, k in zip(blocks, kept.ranks, kept.nnz))


def _csr_float32_bytes(blocks, rest, kept: _Kept) -> int:
  """4-byte values; per block (m + n) r values and, when it keeps entries,
  CSR: a value and a column index per entry and m + 1 row pointers."""
  return 4 * rest + sum(4 * (b.m + b.n) * r + (8 * k + 4 * (b.m + 1) if k else 0)
                        for b, r, k in zip(blocks, kept.ranks, kept.nnz))


def _greedy(blocks, rest, budget) -> _Kept:
  """Triplets (gain sigma^2, m + n parameters) and entries (gain s^2, one)
  in decreasing gain per parameter; each taken while it fits, the first
  that does not closes its block's chain (triplets, or entries)."""
  items = []
  for i, b in enumerate(blocks):
    items += [(g / (b.m + b.n), 2 * i, j, b.m + b.n) for j, g in enumerate(b.sigma ** 2)]
    items += [(g, 2 * i + 1, j, 1) for j, g in enumerate(b.entry_gain)]
  taken, closed, slack = [0] * (2 * len(blocks)), set(), budget - rest
  for _, chain, _, cost in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
    if chain in closed:
      continue
    if cost <= slack:
      taken[chain] += 1
      slack -= cost
    else:
      closed.add(chain)
  return _kept(blocks, taken[0::2], taken[1::2])


def _hpa_bases(blocks) -> tuple[list, list]:
  """HPA's base ranks (the fewest triplets holding 0.999 of the sum of
  sigma) and base entries (every one above 1e-8 of the largest)."""
  r0 = [1 + int(np.sum(np.cumsum(b.sigma) < 0.999 * np.sum(b.sigma))) if b.sigma.size else 0
        for b in blocks]
  k0 = [int(np.sum(np.sqrt(b.entry_gain) > 1e-8 * np.sqrt(b.entry_gain[0])))
        if b.entry_gain.size else 0 for b in blocks]
  return r0, k0


def _hpa(blocks, rest, budget, bases=None, gamma=Fraction(1, 2)) -> _Kept:
  """SALAAD.md's allocation: from the bases, the excess over the budget cut
  gamma from the triplets' parameters and the rest from the entries (what one
  part cannot give, the other), each part scaled down uniformly and floored."""
  r0, k0 = bases or _hpa_bases(blocks)
  p_l, p_s = sum(r * (b.m + b.n) for r, b in zip(r0, blocks)), sum(k0)
  excess = rest + p_l + p_s - budget
  if excess <= 0:
    return _kept(blocks, r0, k0)
  cut_l, cut_s = gamma * excess, (1 - gamma) * excess
  cut_l, cut_s = (p_l, cut_s + cut_l - p_l) if cut_l > p_l else (cut_l, cut_s)
  cut_l, cut_s = (cut_l + cut_s - p_s, p_s) if cut_s > p_s else (cut_l, cut_s)
  keep_l = Fraction(p_l - cut_l, p_l) if p_l else 0
  keep_s = Fraction(p_s - cut_s, p_s) if p_s else 0
  return _kept(blocks, [math.floor(r * keep_l) for r in r0], [math.floor(k * keep_s) for k in k0])


def _hpa_within_bytes(blocks, rest, total, max_bytes) -> tuple[int, _Kept]:
  """(P, HPA at P) for the largest parameter budget P whose CSR float32
  bytes fit ``max_bytes``, by a scan down from the largest P that can fit:
  where HPA cuts the bases, flooring keeps at least P - sum_i (m_i + n_i + 1)
  parameters, each of at least 4 bytes (where it does not, it keeps the
  bases, as at P_model)."""
  bases = _hpa_bases(blocks)
  if _csr_float32_bytes(blocks, rest, _hpa(blocks, rest, total, bases)) <= max_bytes:
    return total, _hpa(blocks, rest, total, bases)
  top = min(total, max_bytes // 4 + sum(b.m + b.n + 1 for b in blocks))
  for budget in range(top, rest - 1, -1):
    kept = _hpa(blocks, rest, budget, bases)
    if _csr_float32_bytes(blocks, rest, kept) <= max_bytes:
      return budget, kept
  raise AssertionError(f"no HPA allocation fits {max_bytes} bytes")


def _assert_row_is(row, blocks, kept: _Kept):
  energy = sum(float(np.sum(b.sigma ** 2) + np.sum(b.entry_gain)) for b in blocks)
  assert (row["kept_rank"], row["kept_nnz"]) == (sum(kept.ranks), sum(kept.nnz)), row
  assert row["rel_error"] == pytest.approx(kept.error / energy, rel=1e-6, abs=1e-12), row


# ---------------------------------------------------------------------------
# The spectrum on the tiny model.
# ---------------------------------------------------------------------------


@NEEDS_SHAKESPEARE
def test_perplexity_is_monotone_in_budget_within_noise(rows):
  for name in ("salaad/hpa", "salaad/global"):
    s = _series(rows, name)
    assert len(s) == len(BUDGETS)
    assert not _rises(s), (name, _rises(s))
    # The spectrum is not flat: the smallest budget costs perplexity.
    assert s[0]["perplexity"] > 1.2 * s[-1]["perplexity"], name
  # The checker does flag a rising series (the same rows in reverse order).
  assert _rises(_series(rows, "salaad/hpa")[::-1])


@NEEDS_SHAKESPEARE
def test_global_is_never_worse_than_hpa_beyond_noise(rows):
  g, h = _series(rows, "salaad/global"), _series(rows, "salaad/hpa")
  worse = [(a["budget"], a["loss"] - b["loss"], sp.paired_se(a, b)) for a, b in zip(g, h)
           if a["loss"] - b["loss"] > TOLERANCE_SE * sp.paired_se(a, b) + 1e-12]
  assert not worse, worse


def test_rows_meet_their_budgets_and_account_exactly(runs, rows):
  salaad = load_run(str(runs[0]))
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(salaad.params))
  dense = [r for r in rows if r["source"] == "dense"]
  assert [r["series"] for r in dense] == ["dense X (salaad run)", "dense (dense run)"]
  for r in dense:
    assert (r["params"], r["bytes"], r["budget"]) == (total, 2 * total, None)
  names = {r["series"] for r in rows}
  assert names == {"dense X (salaad run)", "dense (dense run)", "salaad/hpa", "salaad/global",
                   "posthoc[dense]/hpa", "posthoc[dense]/global"}
  for r in rows:
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
    assert len(r["batch_losses"]) == EVAL_BATCHES and r["loss_se"] > 0
    assert r["tokens"] == EVAL_BATCHES * 8 * 64
    if r["budget"] is not None:
      assert r["unit"] == "params" and r["params"] <= r["budget_value"]
      assert r["budget_value"] == math.floor(float(r["budget"]) * total + 1e-9)
      assert r["bytes"] >= 2 * r["params"]  # COO entries cost more than their value
  # Each allocation is the oracle's: HPA; global the better of HPA and the
  # greedy pass, which spends the budget but for less than one item, or all
  # of L + S (then without error).
  blocks, _, rest = _oracle_blocks(salaad)
  largest_item = max(b.m + b.n for b in blocks)
  for r in _series(rows, "salaad/hpa"):
    _assert_row_is(r, blocks, _hpa(blocks, rest, r["budget_value"]))
  for r in _series(rows, "salaad/global"):
    greedy, hpa = _greedy(blocks, rest, r["budget_value"]), _hpa(blocks, rest, r["budget_value"])
    spent = _params_of(blocks, rest, greedy)
    assert spent > r["budget_value"] - largest_item or greedy.error == 0.0, (r, spent)
    _assert_row_is(r, blocks, hpa if hpa.error < greedy.error else greedy)
    assert r["solver"] == ("hpa" if hpa.error < greedy.error else "greedy"), r
    assert r["params"] == _params_of(blocks, rest, hpa if hpa.error < greedy.error else greedy)
  # A budget that keeps every factor and entry reproduces L + S: no error.
  assert _series(rows, "salaad/global")[-1]["rel_error"] == 0.0


def test_post_hoc_of_the_runs_own_x_and_byte_budgets(runs, rows):
  salaad = load_run(str(runs[0]))
  own = sp.capacity_spectrum(salaad, [0.3, 0.5], methods=("global",), progress=None,
                             posthoc_rank=0.25, posthoc_density=0.02)
  assert [r["series"] for r in own] == ["dense X (salaad run)", "salaad/global",
                                        "salaad/global", "posthoc[own X]/global",
                                        "posthoc[own X]/global"]
  # The same run and batches give the same numbers as the module's table.
  ref = {r["budget"]: r["loss"] for r in _series(rows, "salaad/global")}
  assert [r["loss"] for r in own[1:3]] == [ref["0.3"], ref["0.5"]]
  assert own[0]["loss"] == rows[0]["loss"]

  lines = []
  by = sp.capacity_spectrum(salaad, [0.3, 0.45], unit="bytes", fmt="csr", dtype="float32",
                            posthoc=False, progress=lines.append)
  assert sum(l.startswith("[") for l in lines) == 4  # one progress line per evaluation
  full = 4 * sum(r["params"] for r in by if r["source"] == "dense")
  for r in by[1:]:
    assert r["unit"] == "bytes" and r["bytes"] <= r["budget_value"]
    assert r["budget_value"] == math.floor(float(r["budget"]) * full + 1e-9)
  # HPA in bytes takes the largest parameter budget whose bytes fit.
  oracle, total, rest = _oracle_blocks(salaad)
  for r in _series(by, "salaad/hpa"):
    budget, kept = _hpa_within_bytes(oracle, rest, total, r["budget_value"])
    _assert_row_is(r, oracle, kept)
    assert r["bytes"] == _csr_float32_bytes(oracle, rest, kept)
    assert _csr_float32_bytes(oracle, rest, _hpa(oracle, rest, budget + 1)) > r["budget_value"]
  blocks = deploy.spectra(salaad.params, salaad.opt_state)
  # fmt='auto': each row stored in the format whose allocation keeps the least error.
  auto = sp.capacity_spectrum(salaad, [0.45], methods=("global",), unit="bytes", fmt="auto",
                              posthoc=False, progress=None)[1]
  each = {f: deploy.allocate(blocks, auto["budget_value"], unit="bytes", fmt=f)
          for f in acc.SPARSE_FORMATS}
  assert each[auto["fmt"]].error == min(a.error for a in each.values())
  assert auto["bytes"] == acc.account(None, each[auto["fmt"]], auto["fmt"])["bytes"]
  assert auto["bytes"] <= auto["budget_value"]


@NEEDS_SHAKESPEARE
def test_calibrated_allocation_weights_by_training_batches(runs):
  salaad = load_run(str(runs[0]))
  got = sp.capacity_spectrum(salaad, [0.4], methods=("global",), posthoc=False,
                             calibration_batches=2, progress=None)[1]
  # The oracle: input moments on the first two calibration batches (the
  # training split in another order), then the better of the greedy pass and
  # HPA on the exact SVD of diag(d) L and the entries d_row s.
  from salaad_jax.train.inputs import calibration_dataset
  ds = calibration_dataset(salaad.config)
  batches = [next(ds)["inputs"] for _ in range(2)]
  weights = deploy.activation_weights(salaad.model, salaad.params, batches)
  blocks, _, rest = _oracle_blocks(salaad, weights)
  greedy, hpa = _greedy(blocks, rest, got["budget_value"]), _hpa(blocks, rest, got["budget_value"])
  _assert_row_is(got, blocks, hpa if hpa.error < greedy.error else greedy)
  plain = sp.capacity_spectrum(salaad, [0.4], methods=("global",), posthoc=False,
                               progress=None)[1]
  assert (plain["kept_rank"], plain["kept_nnz"]) != (got["kept_rank"], got["kept_nnz"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(budgets=[0.5], calibration_batches=-1), "calibration_batches must be"),
    (dict(budgets=[0.1]), "below the minimum representable"),
    (dict(budgets=[10**9]), "above the dense model"),
    (dict(budgets=[1.5]), r"not a fraction in \(0, 1\]"),
    (dict(budgets="0.5,abc"), "neither a fraction"),
    (dict(budgets=[0.5], methods=("hpa", "uniform")), "methods must be"),
    (dict(budgets=[0.5], fmt="dense"), "fmt must be one of"),
    (dict(budgets=[0.5], methods=("cut",), unit="bytes", fmt="coo"),
     "method 'cut' prices bytes with S as a bitmap"),
    (dict(budgets=[0.5], baseline_workdirs=["/no/such/dir"]), "holds no summary"),
    (dict(budgets=[0.5], dense_workdir="/no/such/dir"), "holds no run"),
    (dict(budgets=[0.5], time_forward="yes"), "time_forward must be a ForwardTiming"),
])
def test_bad_input_raises_before_evaluating(runs, kwargs, match):
  lines = []
  with pytest.raises(sp.SpectrumError, match=match):
    sp.capacity_spectrum(str(runs[0]), progress=lines.append, **kwargs)
  assert not any(l.startswith(("[", "dense")) for l in lines), lines


def test_forward_time_of_every_deployment_and_none_without_it(runs, tmp_path):
  salaad, dense = runs
  sm.write_summary(tmp_path / "base", method="sltrain", params=60000, bytes=150000,
                   perplexity=14.0)
  kwargs = dict(methods=("global",), dense_workdir=str(dense),
                baseline_workdirs=[tmp_path / "base"])
  lines = []
  timed = sp.capacity_spectrum(str(salaad), [0.3, 0.5], progress=lines.append,
                               time_forward=deploy.ForwardTiming(batch=2, repeats=2,
                                                                 product="coo"), **kwargs)
  plain = sp.capacity_spectrum(str(salaad), [0.3, 0.5], progress=None, **kwargs)
  assert [r["series"] for r in timed] == [r["series"] for r in plain]
  # Timing adds its fields and changes nothing else.
  for t, p in zip(timed, plain):
    assert {k: v for k, v in t.items() if not k.startswith("forward")} == p
    assert not any(k.startswith("forward") for k in p)
  # Wall-clock numbers are not asserted: only that every model was timed.
  *models, base = timed
  assert all(r["forward_ms"] > 0 and r["forward_vs_dense"] > 0 for r in models)
  assert models[0]["forward_vs_dense"] == 1.0  # the dense reference itself
  assert base["source"] == "baseline" and base["forward_ms"] is None
  setup = models[0]["forward_setup"]
  assert (setup["product"], setup["batch"], setup["seq"], setup["repeats"]) == ("coo", 2, 64, 2)
  assert sum("forward" in l for l in lines if l.startswith("[")) == 4
  assert report.columns(timed) == sp.COLUMNS + sp.TIME_COLUMNS
  assert report.columns(plain) == sp.COLUMNS
  assert len(report.figure(timed).axes) == 2 and len(report.figure(plain).axes) == 1


def test_a_run_without_salaad_state_is_refused(runs):
  with pytest.raises(sp.SpectrumError, match="is a 'dense' run and holds no SALAAD state"):
    sp.capacity_spectrum(str(runs[1]), [0.5], progress=None)


# ---------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------


def test_app_writes_table_csv_plot_and_reads_baselines(runs, tmp_path):
  salaad, dense = runs
  sm.write_summary(tmp_path / "sltrain", method="sltrain", params=60000, bytes=150000,
                   perplexity=14.0, sparsity=0.97, label="SLTrain r=8")
  out_dir = tmp_path / "out"
  out = app(f"--workdir={salaad}", f"--dense_workdir={dense}", "--budgets=40%,0.5",
            f"--baseline_workdirs={tmp_path / 'sltrain'}", f"--out_dir={out_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  progress = [l for l in out.stdout.splitlines() if l.startswith("[")]
  assert len(progress) == 8 and progress[-1].startswith("[8/8] posthoc[dense]/global")
  assert sorted(os.listdir(out_dir)) == ["spectrum.csv", "spectrum.json", "spectrum.md",
                                         "spectrum.png"]
  table = list(csv.DictReader(io.StringIO((out_dir / "spectrum.csv").read_text())))
  assert len(table) == 2 + 8 + 1 and tuple(table[0]) == sp.COLUMNS + sp.TIME_COLUMNS
  base = table[-1]
  assert (base["series"], base["source"], base["params"], base["perplexity"]) == (
      "SLTrain r=8", "baseline", "60000", "14")
  # --time_forward is on by default: every deployment and dense row is timed
  # (the numbers themselves are not asserted), a baseline is not.
  assert all(float(r["forward_ms"]) > 0 and float(r["forward_vs_dense"]) > 0
             for r in table[:-1])
  assert (table[0]["forward_vs_dense"], base["forward_ms"]) == ("1", "")
  md = (out_dir / "spectrum.md").read_text()
  assert "| budget | target | salaad/hpa | salaad/global | posthoc[dense]/hpa" in md
  assert "SLTrain r=8 ppl 14.000" in md and "| 0.4 | 52761 params (40.0%) |" in md
  assert "Forward time of the deployed model by budget" in md
  first = json.loads((out_dir / "spectrum.json").read_text())[0]
  assert first["batch_losses"] and first["forward_setup"]["product"] == "adaptive"
  assert first["forward_setup"]["batch"] == 8 and first["forward_setup"]["repeats"] == 5
  png = (out_dir / "spectrum.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and _png_width(png) == 2 * 880  # two panels
  assert not [p for p in os.listdir(out_dir) if ".tmp" in p]


def _png_width(png: bytes) -> int:
  return int.from_bytes(png[16:20], "big")


def test_app_without_forward_timing_writes_no_time_columns(runs, tmp_path):
  out = app(f"--workdir={runs[0]}", "--budgets=0.5", "--methods=global", "--noposthoc",
            "--notime_forward", f"--out_dir={tmp_path}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "forward time:" not in out.stdout and ", forward " not in out.stdout
  header = (tmp_path / "spectrum.csv").read_text().splitlines()[0]
  assert tuple(header.split(",")) == sp.COLUMNS
  rows = json.loads((tmp_path / "spectrum.json").read_text())
  assert not any(k.startswith("forward") for r in rows for k in r)
  assert "Forward time" not in (tmp_path / "spectrum.md").read_text()
  assert _png_width((tmp_path / "spectrum.png").read_bytes()) == 880  # one panel


BAD_INPUT = [
    ("salaad", ["--budgets=0.1,0.5"], "error: budget 13190 params (10.00%) is below the "
     "minimum representable"),
    ("salaad", ["--budgets=0.5,200000"], "error: budget 200000 params is above the dense "
     "model's 131904 params (100 %)"),
    ("salaad", ["--budgets=0.5,1.2"], "flag --budgets=0.5,1.2: budget '1.2' is not a "
     "fraction in (0, 1]"),
    ("dense", ["--budgets=0.5"], "is a 'dense' run and holds no SALAAD state"),
]


@pytest.fixture(scope="module")
def refused(runs, tmp_path_factory):
  """Every BAD_INPUT case run by the app (forked from one process that
  imported the package once: conftest.run_app_cases), each with its own
  --out_dir."""
  base = tmp_path_factory.mktemp("bad_input")
  cases = [[f"--workdir={runs[0] if which == 'salaad' else runs[1]}",
            f"--out_dir={base / str(i)}", *args] for i, (which, args, _) in enumerate(BAD_INPUT)]
  return base, run_app_cases("experiments.spectrum", cases, timeout=240)


@pytest.mark.parametrize("case", range(len(BAD_INPUT)),
                         ids=[f"{which}-{needle[:40]}" for which, _, needle in BAD_INPUT])
def test_app_bad_input_is_one_line_and_writes_nothing(runs, refused, case):
  base, results = refused
  which, _, needle = BAD_INPUT[case]
  assert_one_line_error(results[case], needle, prefix="", alone=True)
  assert not (base / str(case)).exists()
  assert not (Path(runs[0] if which == "salaad" else runs[1]) / "spectrum").exists()


def test_a_killed_app_leaves_the_previous_table_whole(runs, tmp_path):
  out_dir = tmp_path / "out"
  report.write_table(_fake_rows(), out_dir)
  before = {p: (out_dir / p).read_bytes() for p in os.listdir(out_dir)}
  cmd = [sys.executable, "-m", "experiments.spectrum", f"--workdir={runs[0]}",
         f"--out_dir={out_dir}", "--budgets=" + ",".join(map(str, BUDGETS)),
         "--eval_batches=20"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=app_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("[2/"):
        proc.send_signal(signal.SIGKILL)
        break
    proc.wait(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert {p: (out_dir / p).read_bytes() for p in os.listdir(out_dir)} == before


# ---------------------------------------------------------------------------
# Budgets, tables, plot, summaries (no model needed).
# ---------------------------------------------------------------------------


def test_parse_budgets():
  assert sp.parse_budgets("0.3, 40%,1.0,120000,1_000") == [0.3, 0.4, 1.0, 120000, 1000]
  assert sp.parse_budgets([0.5, np.int64(7), np.float32(0.25)]) == [0.5, 7, 0.25]
  for bad, match in [("0.3,,0.4", "empty budget"), ("x", "neither"), ("0", "positive count"),
                     ("-3", "not a fraction"), ("2.5", "as an integer"), ("1", "write 1.0"),
                     ("", "empty budget"), ([True], "not a number"), ([], "no budget")]:
    with pytest.raises(sp.SpectrumError, match=match):
      sp.parse_budgets(bad)


def _fake_rows():
  def row(series, source, budget, value, params, ppl, losses):
    return dict(series=series, source=source, allocation=series.split("/")[-1],
                budget=budget, unit="params" if budget else None, budget_value=value,
                budget_fraction=value / 1000 if value else None, params=params,
                params_fraction=params / 1000, bytes=2 * params + 100,
                bytes_fraction=(2 * params + 100) / 2000, loss=math.log(ppl),
                loss_se=0.01, perplexity=ppl, tokens=640, rel_error=0.1, kept_rank=3,
                kept_nnz=4, solver=None, step=5, workdir="/w", batch_losses=losses)
  return [row("dense X (salaad run)", "dense", None, None, 1000, 9.0, [2.2, 2.2]),
          row("salaad/hpa", "salaad", "0.5", 500, 480, 12.0, [2.5, 2.5]),
          row("salaad/hpa", "salaad", "0.8", 800, 700, 10.0, [2.3, 2.3]),
          row("salaad/global", "salaad", "0.5", 500, 500, 11.0, [2.4, 2.4]),
          dict(row("SLT", "baseline", None, None, 600, 13.0, None), loss_se=None)]


def test_table_and_plot_files(tmp_path):
  rows = _fake_rows()
  paths = report.write_table(rows, tmp_path / "t")
  parsed = list(csv.DictReader(io.StringIO(Path(paths["csv"]).read_text())))
  assert [r["series"] for r in parsed] == [r["series"] for r in rows]
  assert parsed[1]["budget_value"] == "500" and parsed[0]["budget"] == ""
  md = Path(paths["md"]).read_text()
  assert "| 0.5 | 500 params (50.0%) | 12.000 ± 0.120 | 11.000 ± 0.110 |" in md
  assert "| 0.8 | 800 params (80.0%) | 10.000 ± 0.100 |  |" in md
  assert "SLT ppl 13.000 at 600 params" in md
  assert json.loads(Path(paths["json"]).read_text()) == rows
  png = report.plot(rows, tmp_path / "t" / "p.png", dense_ppl={"a": 9.0, "b": 8.5}, title="x")
  assert Path(png).read_bytes()[:4] == b"\x89PNG"
  assert sp.paired_se(rows[1], rows[2]) == 0.0
  with pytest.raises(sp.SpectrumError, match="no rows"):
    report.write_table([], tmp_path / "empty")
  assert not (tmp_path / "empty").exists()


def test_timed_table_and_plot_files(tmp_path):
  rows = [dict(r, forward_ms=None if r["source"] == "baseline" else 2.0 + i,
               forward_vs_dense=None if r["source"] == "baseline" else 1.0 + i / 10,
               forward_setup=dict(product="ell", batch=8, seq=64, repeats=5, warmup=1,
                                  device="cpu", backend="cpu"))
          for i, r in enumerate(_fake_rows())]
  paths = report.write_table(rows, tmp_path)
  parsed = list(csv.DictReader(io.StringIO(Path(paths["csv"]).read_text())))
  assert tuple(parsed[0]) == sp.COLUMNS + sp.TIME_COLUMNS
  assert (parsed[1]["forward_ms"], parsed[1]["forward_vs_dense"]) == ("3", "1.1")
  assert (parsed[-1]["forward_ms"], parsed[-1]["forward_vs_dense"]) == ("", "")
  md = Path(paths["md"]).read_text()
  assert "(ell form, 8x64 tokens, median of 5 on cpu)." in md
  assert "| 0.5 | 500 params (50.0%) | 3 ms (1.10x dense) | 5 ms (1.30x dense) |" in md
  assert "dense X (salaad run) ppl 9.000 ± 0.090 at 1000 params, 2.10 kB, forward 2 ms " \
         "(1.00x dense)" in md
  assert "forward ms | x dense |" in md
  fig = report.figure(rows, title="t")
  assert len(fig.axes) == 2
  assert fig.axes[1].get_ylabel().startswith("forward time")
  assert [l.get_label() for l in fig.axes[1].get_lines()][-1] == "dense X (salaad run): 2 ms"
  png = report.plot(rows, tmp_path / "p.png")
  assert _png_width(Path(png).read_bytes()) == 2 * 880
  assert len(report.figure(_fake_rows()).axes) == 1


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  rows = _fake_rows()
  paths = report.write_table(rows, tmp_path)
  before = Path(paths["csv"]).read_bytes()

  def broken(tmp, src):  # dies after writing part of the new table
    raise KeyboardInterrupt

  monkeypatch.setattr(report.os, "replace", broken)
  with pytest.raises(KeyboardInterrupt):
    report.write_table(rows[:2], tmp_path)
  assert Path(paths["csv"]).read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ["spectrum.csv", "spectrum.json", "spectrum.md"]


def test_summary_round_trip(tmp_path):
  s = sm.write_summary(tmp_path / "run", method="lowrank", params=np.int64(1234),
                       bytes=2468, perplexity=np.float32(21.5), sparsity=0.0, step=10,
                       extra={"rank": 8})
  assert s["label"] == "lowrank" and isinstance(s["params"], int)
  assert sm.read_summary(tmp_path / "run") == s
  assert sm.read_summary(str(tmp_path / "run" / "summary.json")) == s
  assert os.listdir(tmp_path / "run") == ["summary.json"]


@pytest.mark.parametrize("change, match", [
    (dict(params=0), "'params' must be a positive integer"),
    (dict(params=12.5), "'params' must be a positive integer"),
    (dict(bytes=True), "'bytes' must be a positive integer"),
    (dict(perplexity=float("nan")), "'perplexity' must be a finite number >= 1"),
    (dict(perplexity=0.5), "'perplexity' must be a finite number >= 1"),
    (dict(sparsity=1.5), r"'sparsity' must lie in \[0, 1\]"),
    (dict(method=""), "'method' must be a non-empty string"),
    (dict(extra={"f": object()}), "not JSON-able"),
])
def test_bad_summary_writes_nothing(tmp_path, change, match):
  fields = dict(method="galore", params=10, bytes=20, perplexity=30.0)
  fields.update(change)
  with pytest.raises(ValueError, match=match):
    sm.write_summary(tmp_path / "run", **fields)
  assert not (tmp_path / "run" / "summary.json").exists()


def test_reading_a_bad_summary(tmp_path):
  with pytest.raises(ValueError, match="holds no summary"):
    sm.read_summary(tmp_path)
  (tmp_path / "summary.json").write_text("{not json")
  with pytest.raises(ValueError, match="is not valid JSON"):
    sm.read_summary(tmp_path)
  (tmp_path / "summary.json").write_text(json.dumps({"method": "x", "params": 1}))
  with pytest.raises(ValueError, match=r"missing field\(s\) \['bytes', 'perplexity'\]"):
    sm.read_summary(tmp_path)
  (tmp_path / "summary.json").write_text(json.dumps(
      {"method": "x", "params": 1, "bytes": 2, "perplexity": 3.0, "colour": "red"}))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
    sm.read_summary(tmp_path)
