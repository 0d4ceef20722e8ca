"""``salaad_jax.train.metrics``: the JSONL records and the TensorBoard writer
(the first installed of tensorboardX, torch with ``tensorboard``, flax with
TensorFlow; none imported when its requirement is missing)."""

import importlib.machinery
import json
import subprocess
import sys
import types

import pytest

from helpers import ROOT
from salaad_jax.train import metrics as mt


class _FakeWriter:
  """A SummaryWriter that keeps what it is given."""

  def __init__(self, logdir):
    self.logdir, self.scalars, self.closed = logdir, [], False

  def add_scalar(self, key, value, step):
    self.scalars.append((key, value, step))

  def flush(self):
    pass

  def close(self):
    self.closed = True


def _fake_tensorboardx() -> types.ModuleType:
  module = types.ModuleType("tensorboardX")
  module.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
  module.SummaryWriter = _FakeWriter
  return module


def test_an_installed_writer_gets_the_numeric_fields(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", _fake_tensorboardx())
  log = mt.MetricsLog(str(tmp_path), resume_step=0, tensorboard=True, enabled=True)
  assert log.tensorboard is not None
  writer = log.tensorboard.writer
  assert writer.logdir == str(tmp_path / "tensorboard")
  log.write(3, "train", {"loss": 2.5, "finite": True, "name": "x"})
  log.write(4, "eval", {"loss": 2.0})
  log.close()
  # The numbers only (not the bool, the string or the step), eval under its prefix.
  assert writer.scalars == [("loss", 2.5, 3), ("eval/loss", 2.0, 4)] and writer.closed
  assert [json.loads(l)["step"] for l in (tmp_path / mt.METRICS_FILE).open()] == [3, 4]


# Nothing provides a writer: find_spec finds none of the writers' modules.
_NONE_INSTALLED = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name in ("tensorboardX", "tensorboard", "tensorflow") else real(name, *a))
from salaad_jax.train import metrics as mt
log = mt.MetricsLog(sys.argv[1], resume_step=0, tensorboard=True, enabled=True)
log.write(1, "train", {"loss": 1.0})
print(log.tensorboard is None, "torch" in sys.modules, "tensorflow" in sys.modules)
"""


def test_without_a_writer_nothing_is_imported_and_records_are_written(tmp_path):
  done = subprocess.run([sys.executable, "-c", _NONE_INSTALLED, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["True", "False", "False"]
  assert json.loads((tmp_path / mt.METRICS_FILE).read_text())["loss"] == 1.0


def test_a_broken_writer_falls_through_to_the_next(tmp_path, monkeypatch):
  broken = types.ModuleType("tensorboardX")
  broken.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
  monkeypatch.setitem(sys.modules, "tensorboardX", broken)  # no SummaryWriter in it
  monkeypatch.setattr(mt, "_WRITERS", (("tensorboardX", mt._tensorboardx),
                                       ("json", lambda logdir: ("second", None))))
  assert mt._summary_writer(str(tmp_path)) == ("second", None)
  monkeypatch.setattr(mt, "_WRITERS", (("tensorboardX", mt._tensorboardx),))
  assert mt._summary_writer(str(tmp_path)) == (None, None)

