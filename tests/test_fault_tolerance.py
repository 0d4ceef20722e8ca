"""Fault tolerance of ``python -m experiments.pretrain`` on the tiny flag file:
kill -9 at random steps, a corrupted newest checkpoint, every checkpoint
corrupted, a save that fails for lack of space, and the readers of a damaged
run (``load_run``, the capacity spectrum, fine-tuning's ``--init_from``).

The runs use ``--method=dense`` with a checkpoint every step, in
subprocesses (kill -9 needs one; the same environment everywhere keeps the
floats comparable bit for bit); SALAAD's exact resume is covered by
tests/test_pretrain_app.py.  One unbroken run is the module's reference.
"""

import asyncio
import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import app_env, cached_dir, pretrain_app
from helpers import ROOT, TINY_FLAGS, assert_one_line_error, train_losses
import tensorstore as ts

from experiments import common
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy.summary import read_summary
from salaad_jax.train import TrainError, load_run, train_and_evaluate
from salaad_jax.train import config as cfg_lib
from salaad_jax.train.metrics import read_records

STEPS = 12
ARGS = ("--method=dense", f"--steps={STEPS}", "--batch_size=8", "--seq_len=32",
        "--warmup_steps=2", "--log_every=1", "--eval_every=0", "--eval_batches=2",
        "--checkpoint_every=1", "--keep_checkpoints=2")


def _cmd(workdir, *extra) -> list:
  return [sys.executable, "-m", "experiments.pretrain", f"--flagfile={TINY_FLAGS}",
          f"--workdir={workdir}", *ARGS, *extra]


def pretrain(workdir, *extra, preexec_fn=None) -> subprocess.CompletedProcess:
  return pretrain_app(f"--workdir={workdir}", *ARGS, *extra, timeout=300, preexec_fn=preexec_fn)


def kill_at(workdir, step: int) -> list[str]:
  """Runs the app until it reports ``step``, then kill -9; its stdout lines."""
  proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=app_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
        proc.send_signal(signal.SIGKILL)
        break
    proc.wait(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
  return lines


def final_metrics(workdir) -> dict:
  """Every train loss, the last evaluation and the summary's perplexity."""
  evaluation = [r for r in read_records(os.path.join(workdir, "metrics.jsonl"))
                if r["kind"] == "eval"][-1]
  return {"train": train_losses(workdir),
          "eval": (evaluation["step"], evaluation["loss"], evaluation["perplexity"]),
          "summary": read_summary(str(workdir))["perplexity"]}


def corrupt(step_dir: Path) -> None:
  """Truncates every array file of a checkpoint to half its size."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    os.truncate(p, p.stat().st_size // 2)


def snapshot(directory: Path) -> dict:
  """Every file's contents (config.json is rewritten as it was on each start)."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in directory.rglob("*") if p.is_file()}


def checkpoints(workdir: Path) -> list[str]:
  return sorted(os.listdir(workdir / "checkpoints"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
  """The uninterrupted run, trained once per session (``cached_dir``); tests
  read it or work on a ``copy_of`` it."""

  def build(path: Path) -> None:
    out = pretrain(path / "run")
    assert out.returncode == 0, out.stderr[-2000:]

  wd = cached_dir(tmp_path_factory, "fault_tolerance_reference", build) / "run"
  assert checkpoints(wd) == [str(STEPS - 1), str(STEPS)]
  return wd


def copy_of(reference: Path, tmp_path: Path) -> Path:
  """The reference run under another name (config.json holds no paths)."""
  wd = tmp_path / "run"
  shutil.copytree(reference, wd)
  return wd


@pytest.mark.slow  # starts and kills the pretraining app
def test_kill_9_at_random_steps_then_resume_is_bit_identical(reference, tmp_path):
  wd = tmp_path / "run"
  kills = sorted(random.Random(13).sample(range(2, STEPS), 3))
  resumed = []
  for i, step in enumerate(kills):
    lines = kill_at(wd, step)
    starts = [int(l.split()[-1]) for l in lines if l.startswith("resumed from")]
    assert len(starts) == (1 if i else 0), lines
    resumed += starts
  out = pretrain(wd)
  assert out.returncode == 0, out.stderr[-2000:]
  resumed += [int(l.split()[-1]) for l in out.stdout.splitlines() if l.startswith("resumed from")]
  # Each rerun continued from a checkpoint at or after the previous kill's last save.
  assert len(resumed) == len(kills) and all(1 <= r <= k for r, k in zip(resumed, kills))
  assert final_metrics(wd) == final_metrics(reference)
  # Saves cut short by a kill leave Orbax temporary directories; the next run removes them.
  assert checkpoints(wd) == [str(STEPS - 1), str(STEPS)]


def test_corrupted_newest_checkpoint_falls_back_and_finishes_identically(reference, tmp_path):
  wd = copy_of(reference, tmp_path)
  corrupt(wd / "checkpoints" / str(STEPS))
  out = pretrain(wd)
  assert out.returncode == 0, out.stderr[-2000:]
  warnings = [l for l in out.stderr.splitlines() if "cannot be restored" in l]
  assert len(warnings) == 1, out.stderr[-3000:]
  assert f"checkpoint {STEPS} in {wd / 'checkpoints'}" in warnings[0]
  assert "OUT_OF_RANGE" in warnings[0] and f"renamed to {wd / 'checkpoints'}/{STEPS}.corrupt" \
      in warnings[0]
  assert f"resumed from {wd / 'checkpoints'} at step {STEPS - 1}" in out.stdout
  assert "Traceback" not in out.stderr
  assert final_metrics(wd) == final_metrics(reference)
  assert checkpoints(wd) == [str(STEPS - 1), str(STEPS), f"{STEPS}.corrupt"]


def test_every_checkpoint_corrupted_is_one_error_line_and_nothing_is_touched(reference,
                                                                           tmp_path):
  wd = copy_of(reference, tmp_path)
  corrupt(wd / "checkpoints" / str(STEPS))
  (wd / "checkpoints" / str(STEPS - 1) / "data" / "metadata").write_text('{"garbage')
  before = snapshot(wd)
  out = pretrain(wd)
  error = assert_one_line_error(out, f"error: no checkpoint in {wd / 'checkpoints'} can be "
                                f"restored (step {STEPS}: ValueError: OUT_OF_RANGE", returncode=1)
  assert error.startswith(f"error: no checkpoint in {wd / 'checkpoints'}"), error
  assert f"step {STEPS - 1}: JSONDecodeError" in error and "move it away" in error
  assert "cannot be restored" not in out.stderr  # no fallback was taken
  assert snapshot(wd) == before


def _limit_file_size():
  # Files above 200 kB fail with EFBIG, as on a full disk: the metrics log and
  # JSON files fit, the arrays of a checkpoint (~1.3 MB) do not.
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))


def test_failed_save_keeps_every_earlier_checkpoint_and_is_one_error(reference, tmp_path):
  wd = copy_of(reference, tmp_path)
  before = snapshot(wd / "checkpoints")
  # One more step with --keep_checkpoints=2: committing it would remove step 11.
  out = pretrain(wd, f"--steps={STEPS + 1}", preexec_fn=_limit_file_size)
  assert out.returncode == 1, out.stdout[-2000:]
  # Exactly one error line (TensorStore may also print the failed write's own
  # status line from its writer thread, before or after it), no traceback.
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert errors[0].startswith(f"error: saving checkpoint {STEPS + 1} in {wd / 'checkpoints'} "
                              "failed ("), errors[0]
  assert f"the earlier checkpoints (steps [{STEPS - 1}, {STEPS}]) are intact" in errors[0]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  after = snapshot(wd / "checkpoints")
  assert {k: v for k, v in after.items() if k in before} == before
  assert all(".orbax-checkpoint-tmp" in k for k in set(after) - set(before))
  assert load_run(str(wd)).step == STEPS


def test_readers_of_a_damaged_run_name_the_step_and_leave_it_alone(reference, tmp_path):
  wd = copy_of(reference, tmp_path)
  corrupt(wd / "checkpoints" / str(STEPS))
  before = snapshot(wd)
  with pytest.raises(TrainError, match=rf"^checkpoint {STEPS} in .* cannot be restored "
                     rf"\(ValueError: OUT_OF_RANGE.*\); other steps there: \[{STEPS - 1}\]$"):
    load_run(str(wd))
  assert load_run(str(wd), step=STEPS - 1).step == STEPS - 1
  with pytest.raises(sp.SpectrumError, match=rf"checkpoint {STEPS} .*--step chooses one"):
    sp.capacity_spectrum(str(wd), "0.5")
  finetune = cfg_lib.read_config(str(wd)).replace(method="lora", init_from=str(wd))
  with pytest.raises(TrainError, match=rf"^--init_from={wd}: checkpoint {STEPS} .*cannot be "
                     r"restored .*rename the unreadable one"):
    train_and_evaluate(finetune, str(tmp_path / "finetune"))
  assert not (tmp_path / "finetune").exists()
  assert snapshot(wd) == before


def test_apps_drop_only_tracebacks_of_callbacks_into_a_closed_event_loop(monkeypatch):
  # What happens to TensorStore reads still in flight when Orbax closes its
  # event loop after the first one failed: the completion callback raises,
  # and TensorStore hands the error to sys.unraisablehook.
  caught = []
  monkeypatch.setattr(sys, "unraisablehook", caught.append)
  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()
  loop.create_task(_await(future))
  loop.run_until_complete(asyncio.sleep(0))
  loop.close()
  promise.set_result(1)
  # At least this callback's error (callbacks of earlier tests' closed loops in
  # the same process may land here too); every one is recognised.
  assert caught
  for u in caught:
    assert common._closed_loop_callback(u.exc_type, u.exc_value, u.exc_traceback)  # pylint: disable=protected-access
  try:
    raise RuntimeError("Event loop is closed")
  except RuntimeError:
    assert not common._closed_loop_callback(*sys.exc_info())  # pylint: disable=protected-access


async def _await(future):
  return await future


def test_apps_drop_asyncio_reports_of_unretrieved_futures_only():
  """An unretrieved future's exception (a checkpoint read in flight after the
  first failure) could print after the app's one error line: dropped; other
  asyncio and Orbax records keep their message, without their stack."""
  import logging  # pylint: disable=import-outside-toplevel

  def record(name, msg, path="x.py"):
    try:
      raise ValueError("OUT_OF_RANGE")
    except ValueError:
      return logging.LogRecord(name, logging.ERROR, path, 1, msg, None, sys.exc_info())

  late = record("asyncio", "Future exception was never retrieved\nfuture: <Future ...>")
  assert not common._without_orbax_traceback(late)  # pylint: disable=protected-access
  for kept in (record("asyncio", "Task exception was never retrieved"),
               record("absl", "save failed", path=f"{os.sep}orbax{os.sep}a.py")):
    assert common._without_orbax_traceback(kept)  # pylint: disable=protected-access
    assert kept.exc_info is None and kept.getMessage()
  other = record("absl", "something else")
  assert common._without_orbax_traceback(other) and other.exc_info is not None  # pylint: disable=protected-access
