"""``python -m benchmarks.compare`` on a few steps: both tables, the plots and
each run's summary.json."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from salaad_jax.deploy.summary import read_summary

ROOT = Path(__file__).resolve().parents[1]


def test_compare_writes_pretraining_and_finetuning_tables(tmp_path):
  out = tmp_path / "cmp"
  env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC="8",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "benchmarks.compare", "--source=synthetic:order=1",
         "--steps=4", "--batch_size=4", "--seq_len=16", "--eval_batches=2",
         "--methods=dense,lowrank", f"--out={out}",
         "--finetune_source=synthetic:order=1,seed=7", "--finetune_steps=3",
         "--finetune_methods=full,salr"]
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["method"] for r in rows] == ["dense", "lowrank"]
  assert int(rows[1]["params"]) <= 0.5 * int(rows[0]["params"])  # matched budget
  with open(out / "finetune.csv") as f:
    ft = list(csv.DictReader(f))
  assert [r["method"] for r in ft] == ["pretrained (no fine-tuning)", "full", "salr"]
  salr = read_summary(str(out / "finetune" / "salr"))
  assert float(ft[2]["perplexity"]) == salr["perplexity"]
  assert int(ft[2]["trainable"]) < int(ft[1]["trainable"]) == int(rows[0]["params"])
  # Fine-tuning on the new chain improves on the pretrained model.
  assert float(ft[1]["perplexity"]) < float(ft[0]["perplexity"])
  for name in ("results.md", "results.png", "finetune.md", "finetune.png"):
    assert (out / name).stat().st_size > 0
