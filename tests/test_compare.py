"""``python -m benchmarks.compare`` on a few steps over two seeds: the matched
budget, SALAAD deployed at it next to the post-hoc floor, the spectrum with
the baselines as points, the fine-tuning table; and the seed aggregation
against a hand computation."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import compare_tables as tables
from salaad_jax.baselines import match_rank_target
from salaad_jax.deploy.summary import read_summary
from salaad_jax.train import config as cfg_lib
from salaad_jax.train.state import model_config

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", NPROC="8",
           XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _compare(*args, timeout=900):
  cmd = [sys.executable, "-m", "benchmarks.compare", *args]
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_writes_pretraining_spectrum_and_finetuning_tables(tmp_path):
  out = tmp_path / "cmp"
  done = _compare("--source=synthetic:order=1", "--steps=4", "--batch_size=4",
                  "--seq_len=16", "--eval_batches=2", "--methods=dense,salaad,lowrank",
                  "--seeds=0,1", "--spectrum_budgets=0.1,0.6,1.0", f"--out={out}",
                  "--finetune_source=synthetic:order=1,seed=7", "--finetune_steps=3",
                  "--finetune_methods=full,salr")
  assert done.returncode == 0, done.stderr[-3000:]
  rows = _csv(out / "results.csv")
  deployed = ["salaad/global @ 0.5", "salaad/hpa @ 0.5", "posthoc[dense]/global @ 0.5",
              "posthoc[dense]/hpa @ 0.5"]
  per_seed = ["dense", "salaad", *deployed, "lowrank"]
  assert [(r["method"], r["seed"]) for r in rows] == (
      [(m, "0") for m in per_seed] + [(m, "1") for m in per_seed])
  dense = int(rows[0]["params"])
  target = int(0.5 * dense)
  for r in rows:
    if r["method"] in deployed or r["method"] == "lowrank":
      assert int(r["params"]) <= target, r  # matched budget
  # SALAAD's rank target is the one at which its surrogate fills the budget.
  salaad_cfg = cfg_lib.read_config(str(out / "runs" / "seed_0" / "salaad"))
  assert salaad_cfg.rank_target == pytest.approx(
      match_rank_target(model_config(salaad_cfg), target, 0.05))
  assert salaad_cfg.density_target == 0.05
  # Every run row is the workdir's own summary.
  for seed in (0, 1):
    s = read_summary(str(out / "runs" / f"seed_{seed}" / "lowrank"))
    row = next(r for r in rows if r["method"] == "lowrank" and r["seed"] == str(seed))
    assert float(row["perplexity"]) == s["perplexity"] and int(row["params"]) == s["params"]
  # The seeds differ (initialisation and data order).
  assert rows[0]["perplexity"] != rows[len(per_seed)]["perplexity"]

  table = (out / "results.md").read_text()
  assert "2 seeds (0, 1)" in table and " ± " in table
  for name in per_seed:
    assert f"| {name} |" in table

  # The spectrum of seed 0: SALAAD's curve on the same validation batches as its
  # run's own evaluation, the budgets below P_rest left out, lowrank a point.
  spectrum = json.loads((out / "spectrum" / "spectrum.json").read_text())
  salaad0 = next(r for r in rows if r["method"] == "salaad" and r["seed"] == "0")
  x_row = next(r for r in spectrum if r["series"] == "dense X (salaad run)")
  assert x_row["perplexity"] == pytest.approx(float(salaad0["x_perplexity"]), rel=1e-4)
  budgets = {r["budget_fraction"] for r in spectrum if r["series"] == "salaad/global"}
  assert min(budgets) > 0.2 and 1.0 in budgets and len(budgets) == 3
  assert [r["series"] for r in spectrum if r["source"] == "baseline"] == ["lowrank"]

  ft = _csv(out / "finetune.csv")
  assert [(r["method"], r["seed"]) for r in ft] == [
      (m, s) for s in ("0", "1") for m in ("pretrained (no fine-tuning)", "full", "salr")]
  salr = read_summary(str(out / "finetune" / "seed_1" / "salr"))
  assert float(ft[5]["perplexity"]) == salr["perplexity"]
  assert int(ft[2]["trainable"]) < int(ft[1]["trainable"]) == dense
  # Fine-tuning on the new chain improves on the pretrained model.
  assert float(ft[1]["perplexity"]) < float(ft[0]["perplexity"])
  for name in ("results.png", "finetune.md", "finetune.png", "spectrum/spectrum.png"):
    assert (out / name).stat().st_size > 0

  # Rerunning resumes: the finished runs are restored, not trained again.
  metrics = out / "runs" / "seed_0" / "lowrank" / "metrics.jsonl"
  logged = metrics.read_text().count('"train"')
  again = _compare("--source=synthetic:order=1", "--steps=4", "--batch_size=4",
                   "--seq_len=16", "--eval_batches=2", "--methods=dense,lowrank",
                   "--seeds=0", f"--out={out}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert metrics.read_text().count('"train"') == logged > 0
  rerun = {r["method"]: r["perplexity"] for r in _csv(out / "results.csv")}
  first = {r["method"]: r["perplexity"] for r in rows if r["seed"] == "0"}
  assert rerun == {m: first[m] for m in ("dense", "lowrank")}


@pytest.mark.parametrize("args, needle", [
    (["--budget_fraction=0.1"], "below the share of the parameters outside the blocks"),
    (["--seeds=0,0"], "distinct"),
    (["--methods=dense,svd"], "unknown ['svd']"),
    (["--methods=lowrank", "--finetune_source=synthetic"], "keep dense in --methods"),
    (["--source=/no/such/file.txt"], "/no/such/file.txt"),
])
@pytest.mark.slow
def test_bad_input_is_a_short_error(tmp_path, args, needle):
  done = _compare("--source=synthetic:order=1", "--steps=2", f"--out={tmp_path}", *args,
                  timeout=300)
  assert done.returncode != 0
  assert needle in done.stderr
  assert "Traceback" not in done.stderr


def test_aggregate_means_stds_and_paired_differences():
  runs = [
      {"method": "dense", "seed": 0, "params": 100, "bytes": 200, "perplexity": 10.0},
      {"method": "lowrank", "seed": 0, "params": 50, "bytes": 100, "perplexity": 11.0},
      {"method": "dense", "seed": 1, "params": 100, "bytes": 200, "perplexity": 12.0},
      {"method": "lowrank", "seed": 1, "params": 50, "bytes": 100, "perplexity": 12.5},
      {"method": "salaad", "seed": 1, "params": 60, "bytes": 150, "perplexity": 13.0,
       "x_perplexity": 12.0},
      {"method": "salaad", "seed": 2, "params": 64, "bytes": 154, "perplexity": 9.0,
       "x_perplexity": 8.0},
  ]
  rows = {r["method"]: r for r in tables.aggregate(runs)}
  assert list(rows) == ["dense", "lowrank", "salaad"]
  d, lr, sa = rows["dense"], rows["lowrank"], rows["salaad"]
  assert (d["n"], d["perplexity"]) == (2, 11.0)
  assert d["perplexity_std"] == pytest.approx(math.sqrt(2.0))
  assert d["delta"] is None
  # Paired: differences 1.0 and 0.5.
  assert lr["delta"] == pytest.approx(0.75)
  assert lr["delta_se"] == pytest.approx(np.std([1.0, 0.5], ddof=1) / math.sqrt(2))
  # Only seed 1 pairs with dense: one difference, no standard error.
  assert sa["delta"] == pytest.approx(1.0) and sa["delta_se"] is None
  assert (sa["params"], sa["bytes"], sa["x_perplexity"]) == (62, 152, 10.0)
  assert tables.ppl_cell(lr) == "11.750 ± 1.061"
  assert tables.delta_cell(lr) == "+0.750 ± 0.250"
  one = tables.aggregate(runs[:1])[0]
  assert one["perplexity_std"] is None and tables.ppl_cell(one) == "10.000"
