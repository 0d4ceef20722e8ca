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
from pathlib import Path

import jax
import numpy as np
import pytest

from salaad_jax import deploy
from salaad_jax.deploy import accounting as acc
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy import spectrum_report as report
from salaad_jax.deploy import summary as sm
from salaad_jax.train import load_run

from conftest import SHAKESPEARE_EVAL_BATCHES, app_env, run_app_cases
from helpers import NEEDS_SHAKESPEARE, ROOT, assert_one_line_error

TOLERANCE_SE = 2.0  # one-sided: loss may rise by at most 2 paired standard errors
BUDGETS = (0.26, 0.28, 0.3, 0.33, 0.36, 0.4, 0.45, 0.5, 0.6, 0.8, 1.0)
EVAL_BATCHES = SHAKESPEARE_EVAL_BATCHES


def app(*args, timeout: float = 240) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "experiments.spectrum", *args]
  return subprocess.run(cmd, cwd=ROOT, env=app_env(), capture_output=True, text=True,
                        timeout=timeout)


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
  # Global spends (almost) all of the budget until the pool is exhausted.
  for r in _series(rows, "salaad/global"):
    assert (r["params"] >= r["budget_value"] - 256 or r["rel_error"] == 0.0
            or r["solver"] == "hpa"), r
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
  blocks = deploy.spectra(salaad.params, salaad.opt_state)
  for r in _series(by, "salaad/hpa"):
    alloc = sp.hpa_within_bytes(blocks, r["budget_value"], fmt="csr", dtype="float32")
    nxt = deploy.allocate(blocks, alloc.budget + 1, "hpa")
    assert acc.account(None, alloc, "csr", "float32")["bytes"] == r["bytes"]
    assert acc.account(None, nxt, "csr", "float32")["bytes"] > r["budget_value"]
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
  # training split in another order), then the weighted global allocation.
  from salaad_jax.train.inputs import calibration_dataset
  ds = calibration_dataset(salaad.config)
  batches = [next(ds)["inputs"] for _ in range(2)]
  weights = deploy.activation_weights(salaad.model, salaad.params, batches)
  blocks = deploy.spectra(salaad.params, salaad.opt_state, row_weights=weights)
  want = deploy.allocate(blocks, got["budget_value"], "global")
  assert (got["kept_rank"], got["kept_nnz"]) == (sum(want.ranks.values()), sum(want.nnz.values()))
  assert got["rel_error"] == pytest.approx(want.relative_error)
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
])
def test_bad_input_raises_before_evaluating(runs, kwargs, match):
  lines = []
  with pytest.raises(sp.SpectrumError, match=match):
    sp.capacity_spectrum(str(runs[0]), progress=lines.append, **kwargs)
  assert not any(l.startswith(("[", "dense")) for l in lines), lines


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
  out = app(f"--workdir={salaad}", f"--dense_workdir={dense}", "--budgets=0.3,40%,0.5",
            f"--baseline_workdirs={tmp_path / 'sltrain'}", f"--out_dir={out_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  progress = [l for l in out.stdout.splitlines() if l.startswith("[")]
  assert len(progress) == 12 and progress[-1].startswith("[12/12] posthoc[dense]/global")
  assert sorted(os.listdir(out_dir)) == ["spectrum.csv", "spectrum.json", "spectrum.md",
                                         "spectrum.png"]
  table = list(csv.DictReader(io.StringIO((out_dir / "spectrum.csv").read_text())))
  assert len(table) == 2 + 12 + 1 and tuple(table[0]) == sp.COLUMNS
  base = table[-1]
  assert (base["series"], base["source"], base["params"], base["perplexity"]) == (
      "SLTrain r=8", "baseline", "60000", "14")
  md = (out_dir / "spectrum.md").read_text()
  assert "| budget | target | salaad/hpa | salaad/global | posthoc[dense]/hpa" in md
  assert "SLTrain r=8 ppl 14.000" in md and "| 0.4 | 52761 params (40.0%) |" in md
  assert json.loads((out_dir / "spectrum.json").read_text())[0]["batch_losses"]
  assert (out_dir / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not [p for p in os.listdir(out_dir) if ".tmp" in p]


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
