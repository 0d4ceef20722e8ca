"""``python -m benchmarks.compare`` under its default, fair protocol on a few
steps: equal tuning on a tuning seed, training FLOPs matched, the no-ADMM
control, the deployment curve, and the tuned settings reused by path.

Its own module (the rest of the command is tests/test_compare.py): under
``--dist loadfile`` the two long runs of the command then go to different
workers."""

import json

import numpy as np
import pytest
from conftest import cached_dir, compare_app as _compare
from helpers import COMPARE_COMMON as COMMON, TINY_MODEL as TINY
from helpers import read_csv as _csv

from salaad_jax.train import config as cfg_lib


# ---------------------------------------------------------------------------
# The fair protocol: tuning, matched FLOPs, controls, the curve.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fair(tmp_path_factory):
  """The default protocol on a few steps: two trials per method on seed 100,
  one reported seed, the no-ADMM control."""

  def build(path):
    done = _compare(*COMMON, "--steps=6", "--methods=dense,salaad", "--seeds=10",
                    "--budgets=0.4,0.5,0.6", "--tune_trials=2", "--tune_seeds=100",
                    "--controls=no_admm", f"--out={path / 'fair'}", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]

  out = cached_dir(tmp_path_factory, "fair", build) / "fair"
  return out, _csv(out / "results.csv")


@pytest.mark.slow
def test_fair_protocol_tunes_equally_and_matches_flops(fair):
  out, rows = fair
  from benchmarks import compare_protocol as protocol  # pylint: disable=import-outside-toplevel
  from salaad_jax.train import compute  # pylint: disable=import-outside-toplevel
  record = json.loads((out / "tuned.json").read_text())
  assert record["tune_seeds"] == [100] and set(record["methods"]) == {"dense", "salaad"}
  for method, r in record["methods"].items():
    assert len(r["trials"]) == 2  # the same number for every method
    assert r["trials"][0]["settings"]["lr"] == 3e-3  # trial 0: the defaults
    scores = [t["score"] for t in r["trials"]]
    assert r["chosen"]["trial"] == int(np.argmin(scores))
    for k in range(2):  # every trial trained on the tuning seed, none on a reported one
      assert (out / "tuning" / "seed_100" / f"{method}_t{k}" / "summary.json").exists()
  assert not (out / "tuning" / "seed_10").exists()
  # Matched FLOPs: SALAAD trains --steps, dense the step count closest to its FLOPs.
  by = {(r["method"], r["budget"]): r for r in rows}
  salaad = cfg_lib.read_config(by["salaad_trained", ""]["workdir"])
  target = compute.train_compute(salaad, TINY).train_flops
  assert int(by["salaad_trained", ""]["steps"]) == 6
  dense = cfg_lib.read_config(by["dense", ""]["workdir"])
  assert dense.lr == record["methods"]["dense"]["chosen"]["settings"]["lr"]
  assert dense.steps == compute.steps_for_flops(dense.replace(steps=6), TINY, target)
  for name in ("dense", "salaad_trained", "salaad_no_admm"):
    assert float(by[name, ""]["train_flops"]) == pytest.approx(
        compute.train_compute(cfg_lib.read_config(by[name, ""]["workdir"]), TINY).train_flops)
  # The control: the tuned recipe, its structure chosen at step 0.
  control = cfg_lib.read_config(by["salaad_no_admm", ""]["workdir"])
  assert control.consolidate_from == protocol.CONTROLS["no_admm"][1]["consolidate_from"]
  assert control.consolidate_factor_lr == salaad.consolidate_factor_lr
  assert {("salaad_no_admm", b) for b in ("0.4", "0.5", "0.6")} <= set(by)
  # It trained its cuts at 40 and 50 % (the budgets below the 60 % its structure fills).
  assert cfg_lib.cut_budgets(salaad) == (0.4, 0.5, 1.0, 1.0)  # the whole in half the draws
  # The curve: every 0.05 from 0.3 up to what the structure fills, both allocators.
  fill = float(by["salaad_trained", ""]["bytes_fraction"])
  for alloc in ("cut", "global"):
    budgets = sorted(float(r["budget"]) for r in rows if r["method"] == f"salaad_curve_{alloc}")
    assert budgets == [b for b in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
                       if b <= fill + 1e-9]
    assert 0.6 in budgets  # the structure fills the largest budget
  table = (out / "results.md").read_text()
  assert "training FLOPs" in table
  assert "Tuning: 2 trials per method" in table and "`salaad_no_admm`" in table
  assert "split `test`" in table  # reported on a split the selection never saw
  # The chosen settings are reused by path: no new trial, and the tuning
  # seed is refused as a reported seed.
  again = _compare(*COMMON, "--steps=6", "--methods=dense,salaad", "--seeds=100",
                   f"--tuned={out / 'tuned.json'}", f"--out={out}")
  assert again.returncode != 0 and "seed 100 was a tuning seed" in again.stderr
