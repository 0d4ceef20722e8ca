"""``python -m experiments.pretrain --distributed`` as two processes with two
CPU devices each (gloo collectives over loopback), one FSDP mesh over the
four devices: killed mid-run, relaunched, finished; both processes exit 0
within the timeout, ``summary.json`` is written, and the losses are those of
one process with four devices.  A job whose one process fails ends on every
process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from conftest import app_env
from helpers import ROOT, TINY_FLAGS, train_losses
from salaad_jax.train import TrainError, multihost
from salaad_jax.train import flags as train_flags

STEPS, EVERY = 8, 2
# SALAAD: its summary restores the final checkpoint (the end of run that used
# to fail on process 1 and hang both).  One subspace iteration in the initial
# SVD keeps the compiled initialisation small, and the ADMM rounds alone (no
# consolidation: its factor step, cuts and second pass are sharded in
# test_pretrain_app's test_sharded_salaad_matches_one_device) keep the
# three processes' compilations short.
ARGS = [f"--flagfile={TINY_FLAGS}", f"--steps={STEPS}", "--batch_size=8", "--log_every=1",
        "--eval_every=0", "--eval_batches=2", f"--checkpoint_every={EVERY}",
        "--keep_checkpoints=10", "--every_k=2", "--warmup_steps=2", "--init_iters=1",
        "--mesh_fsdp=4", "--consolidate_from=0"]
# Seconds for one launch: mostly compilation (SALAAD over a 4-device FSDP
# mesh), measured at 7+ minutes per program on a 2-core machine under a load
# of 30.  No persistent compilation cache: a process that found its programs
# there while its peer still compiled would wait at the first collective past
# gloo's 30 s set-up deadline.
TIMEOUT = 1500


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(app_env(devices), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _launch(workdir: Path, logs: Path) -> list:
  """Both processes of the job, their output in ``logs``/p<i>.log."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "experiments.pretrain", *ARGS, f"--workdir={workdir}",
           "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}"]
    with open(logs / f"p{i}.log", "w") as out:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(2), stdout=out,
                                    stderr=subprocess.STDOUT))
  return procs


def _wait(procs, deadline: float, logs: Path) -> list:
  """Return codes; on a timeout both are killed and the test fails."""
  try:
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("multi-process run did not end in time:\n" + _tails(logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _tails(logs: Path) -> str:
  return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.glob("*.log")))


def _steps(workdir: Path) -> list:
  d = workdir / "checkpoints"
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if d.is_dir() else []


@pytest.mark.slow  # starts three processes
def test_two_processes_killed_resumed_match_one_process(tmp_path):
  logs, wd = tmp_path / "logs", tmp_path / "multi"
  logs.mkdir()
  # The reference, one process with four devices, runs alongside the first launch.
  with open(logs / "one.log", "w") as out:
    ref = subprocess.Popen([sys.executable, "-m", "experiments.pretrain", *ARGS,
                            f"--workdir={tmp_path / 'one'}"], cwd=ROOT, env=_env(4),
                           stdout=out, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + TIMEOUT
  try:
    # First launch: killed (SIGKILL, both) once its first checkpoint is on disk.
    procs = _launch(wd, logs)
    while (not _steps(wd) and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
      time.sleep(0.2)
    for p in procs:
      p.send_signal(signal.SIGKILL)
    codes = _wait(procs, deadline, logs)
    assert codes == [-signal.SIGKILL] * 2, f"{codes}\n{_tails(logs)}"
    saved = _steps(wd)
    assert saved and saved[-1] < STEPS, saved  # killed mid-run
    assert not (wd / "summary.json").exists()
    assert _wait([ref], deadline, logs) == [0], _tails(logs)
  finally:
    if ref.poll() is None:
      ref.kill()
      ref.wait()
  assert "devices 4 (jit)" in (logs / "one.log").read_text()

  # Relaunch: resumes the latest checkpoint and finishes; both exit 0.
  procs = _launch(wd, logs)
  codes = _wait(procs, time.monotonic() + TIMEOUT, logs)
  assert codes == [0, 0], f"{codes}\n{_tails(logs)}"
  out0, out1 = (logs / "p0.log").read_text(), (logs / "p1.log").read_text()
  assert f"at step {saved[-1]}" in out0 and "devices 4 (jit)" in out0
  assert "error:" not in out0 + out1 and "Traceback" not in out0 + out1, _tails(logs)
  assert not any(l.startswith(("step ", "done:", "summary:")) for l in out1.splitlines())

  # The same numbers as one process with the four devices.
  a, b = train_losses(tmp_path / "one"), train_losses(wd)
  assert [s for s, _ in b] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-5)
  one = json.loads((tmp_path / "one" / "summary.json").read_text())
  multi = json.loads((wd / "summary.json").read_text())
  assert multi["step"] == STEPS and multi["method"] == "salaad"
  assert (multi["params"], multi["bytes"]) == (one["params"], one["bytes"])
  assert multi["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4)


# A job whose process 1 fails (``experiments.common.fail``, as an app does
# on a TrainError) while process 0 waits for it in a collective.
_FAILING_JOB = """
import numpy as np
from absl import app
from jax.experimental import multihost_utils
from experiments import common
from salaad_jax.train import multihost


def main(argv):
  address, process = argv[1], int(argv[2])
  multihost.initialize(True, address, 2, process)
  multihost_utils.sync_global_devices("joined")
  print(f"process {process} joined", flush=True)
  if process == 1:
    common.fail("process 1 stops here")
  multihost_utils.process_allgather(np.ones(1))  # needs process 1
  print("process 0 went on", flush=True)


app.run(common.exits_promptly(main))
"""


@pytest.mark.slow  # starts two processes
def test_one_process_failing_ends_the_other(tmp_path):
  """Process 1 leaves at once with its one error line; process 0, left in a
  collective, ends with an error too instead of waiting: both within
  seconds (the same job with process 1 leaving by sys.exit has been seen to
  hang both in JAX's shutdown barrier for 300 s)."""
  logs = tmp_path / "logs"
  logs.mkdir()
  port = _free_port()
  procs = []
  for i in range(2):
    with open(logs / f"p{i}.log", "w") as out:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", _FAILING_JOB, f"127.0.0.1:{port}", str(i)], cwd=ROOT,
          env=_env(1), stdout=out, stderr=subprocess.STDOUT))
  codes = _wait(procs, time.monotonic() + 180, logs)
  out0, out1 = (logs / "p0.log").read_text(), (logs / "p1.log").read_text()
  assert "process 0 joined" in out0 and "process 1 joined" in out1, _tails(logs)
  assert codes[1] == 1 and "Traceback" not in out1, _tails(logs)
  assert [l for l in out1.splitlines() if l.startswith("error: ")] == [
      "error: process 1 stops here (process 1 of 2)"], _tails(logs)
  assert codes[0] != 0 and "process 0 went on" not in out0, _tails(logs)


@pytest.mark.parametrize("settings, needle", [
    (dict(distributed=False, coordinator_address="127.0.0.1:1234"),
     "--coordinator_address is only used with --distributed"),
    (dict(distributed=False, process_id=0), "--process_id is only used with --distributed"),
    (dict(distributed=True, num_processes=2, process_id=2),
     "--process_id=2 must be below --num_processes=2"),
    (dict(distributed=True, coordinator_address="localhost"), "must be host:port"),
])
def test_bad_distributed_settings_name_the_flag(settings, needle):
  with pytest.raises(TrainError, match=re.escape(needle)):
    multihost.initialize(**settings)
  assert not jax.distributed.is_initialized()


def test_the_flags_reach_the_config():
  values = flags.FlagValues()
  train_flags.define_flags(values)
  values(["prog", "--distributed", "--coordinator_address=10.0.0.1:1234", "--num_processes=4",
          "--process_id=3"])
  config = train_flags.config_from_flags(values)
  assert (config.distributed, config.coordinator_address, config.num_processes,
          config.process_id) == (True, "10.0.0.1:1234", 4, 3)
  spectrum_values = flags.FlagValues()
  train_flags.define_distributed_flags(spectrum_values)
  spectrum_values(["prog", "--distributed", "--num_processes=2"])
  assert train_flags.distributed_settings(spectrum_values) == dict(
      distributed=True, coordinator_address="", num_processes=2, process_id=-1)
