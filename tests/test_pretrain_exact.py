"""``python -m experiments.pretrain`` computing the same numbers another way:
stopped by SIGTERM and resumed, bit for bit the uninterrupted run; SALAAD
sharded over a data x FSDP mesh of four devices, the losses and the
controller of one device.  (The rest of the app: tests/test_pretrain_app.py;
apart so that ``--dist loadfile`` spreads the app's long runs over two
workers.)"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import salaad_jax as sj
from salaad_jax.train import load_run

from conftest import app_env as _env, pretrain_app as pretrain
from helpers import ROOT, TINY_FLAGS, train_losses

pytestmark = pytest.mark.slow  # every test starts the app in a subprocess


def test_sigterm_checkpoints_and_the_resumed_run_is_exact(tmp_path):
  args = ["--steps=30", "--batch_size=16", "--log_every=1", "--eval_every=0",
          "--checkpoint_every=0", "--warmup_steps=5"]
  ref = pretrain(f"--workdir={tmp_path / 'ref'}", *args)
  assert ref.returncode == 0, ref.stderr[-2000:]
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.pretrain", f"--flagfile={TINY_FLAGS}",
         f"--workdir={wd}", *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 8:
        proc.send_signal(signal.SIGTERM)
        break
    rest, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "(SIGTERM); checkpoint saved" in rest
  stopped = max(int(s) for s in os.listdir(wd / "checkpoints"))
  assert 8 <= stopped < 30
  resumed = pretrain(f"--workdir={wd}", *args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from {wd / 'checkpoints'} at step {stopped}" in resumed.stdout
  assert train_losses(wd) == train_losses(tmp_path / "ref")  # bit-identical on CPU


def test_sharded_salaad_matches_one_device(tmp_path):
  args = ["--steps=6", "--batch_size=16", "--log_every=1", "--eval_every=0",
          "--checkpoint_every=0", "--every_k=2", "--warmup_steps=2"]
  one = pretrain(f"--workdir={tmp_path / 'one'}", *args, devices=1)
  assert one.returncode == 0, one.stderr[-2000:]
  # data 2 x fsdp 2: each fake device runs its share of every ADMM round, so
  # 4 devices keep this affordable on 2 cores.
  many = pretrain(f"--workdir={tmp_path / 'many'}", "--mesh_fsdp=2", *args, devices=4,
                  timeout=480)
  assert many.returncode == 0, many.stderr[-2000:]
  assert "devices 4 (jit)" in many.stdout
  a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "many")
  np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-4)
  s1 = sj.block_metrics(load_run(str(tmp_path / "one")).opt_state)
  s8 = sj.block_metrics(load_run(str(tmp_path / "many")).opt_state)
  for path in s1:
    np.testing.assert_allclose(s8[path]["alpha"], s1[path]["alpha"], rtol=1e-3, atol=1e-9)
