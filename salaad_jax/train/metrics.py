"""Metric records: a JSONL file in the workdir, optional TensorBoard events,
throughput/ETA, and the one-line progress format."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Any, Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any):
  """Numbers (numpy / JAX scalars) as Python floats or ints; others unchanged."""
  if isinstance(value, (bool, str)) or value is None:
    return value
  arr = np.asarray(value)
  if arr.ndim == 0 and arr.dtype.kind in "iu":
    return int(arr)
  if arr.ndim == 0 and arr.dtype.kind in "fb":
    return float(arr)
  return value


def read_records(path: str) -> list[dict]:
  """All records of a JSONL metrics file (an absent file has none)."""
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def truncate_after(path: str, step: int) -> None:
  """Drops the records of steps after ``step`` (written by a run that went on
  past its last checkpoint); rewrites the file atomically."""
  records = read_records(path)
  kept = [r for r in records if r.get("step", 0) <= step]
  if len(kept) == len(records):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


# The TensorBoard writers tried in order: (module that must be installed,
# how to make a writer for a log folder).  Each is looked up with
# ``importlib.util.find_spec`` before it is imported: torch's writer needs the
# ``tensorboard`` package and flax's TensorFlow, and importing torch only to
# find ``tensorboard`` missing costs a run seconds.
def _tensorboardx(logdir: str):
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  writer = SummaryWriter(logdir)
  return writer, writer.add_scalar


def _torch(logdir: str):
  from torch.utils.tensorboard import SummaryWriter  # pylint: disable=g-import-not-at-top
  writer = SummaryWriter(logdir)
  return writer, writer.add_scalar


def _flax(logdir: str):
  from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
  writer = tensorboard.SummaryWriter(logdir)
  return writer, writer.scalar


_WRITERS = (("tensorboardX", _tensorboardx), ("tensorboard", _torch), ("tensorflow", _flax))


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def _summary_writer(logdir: str):
  """(writer, add_scalar) from tensorboardX, torch (with ``tensorboard``) or
  flax (with TensorFlow), the first installed; (None, None) when none is."""
  for module, make in _WRITERS:
    if _installed(module):
      try:
        return make(logdir)
      except ImportError:  # installed but broken (e.g. torch absent): the next one
        continue
  return None, None


class _TensorBoard:
  """Scalars of a record as TensorBoard events, with whichever writer is installed."""

  def __init__(self, logdir: str):
    self.writer, self._add = _summary_writer(logdir)

  def add_scalars(self, step: int, record: Mapping[str, Any]) -> None:
    for key, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self._add(key, value, step)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


class MetricsLog:
  """Writes records ``{"step": s, "kind": ..., ...}`` to ``<workdir>/metrics.jsonl``
  and, when a TensorBoard writer is installed and wanted, to
  ``<workdir>/tensorboard``.  Inactive (writes nothing) when ``enabled`` is
  False, e.g. on processes other than 0."""

  def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool, enabled: bool):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    self.tensorboard = None
    if not enabled:
      return
    truncate_after(self.path, resume_step)
    if tensorboard:
      tb = _TensorBoard(os.path.join(workdir, "tensorboard"))
      self.tensorboard = tb if tb.writer is not None else None

  def write(self, step: int, kind: str, record: Mapping[str, Any]) -> dict:
    out = {"step": int(step), "kind": kind}
    out.update({k: to_python(v) for k, v in record.items()})
    if self.enabled:
      with open(self.path, "a") as fh:
        fh.write(json.dumps(out) + "\n")
      if self.tensorboard is not None:
        prefix = "" if kind == "train" else f"{kind}/"
        self.tensorboard.add_scalars(step, {prefix + k: v for k, v in out.items()
                                            if k not in ("kind", "step")})
    return out

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


class Throughput:
  """steps/s and tokens/s over the interval since the last call, and the ETA."""

  def __init__(self, tokens_per_step: int, total_steps: int, step: int):
    self.tokens_per_step = tokens_per_step
    self.total_steps = total_steps
    self._step, self._time = step, time.perf_counter()

  def reset(self, step: int) -> None:
    """Restarts the interval (e.g. after an evaluation or a compilation)."""
    self._step, self._time = step, time.perf_counter()

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.total_steps - step) / rate if rate > 0 else math.inf
    return {"steps_per_sec": rate, "tokens_per_sec": rate * self.tokens_per_step,
            "eta_sec": eta}


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _si(x: float) -> str:
  for unit, scale in (("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


def train_line(record: Mapping[str, Any], total_steps: int,
               loss_floor: Optional[float] = None) -> str:
  """'step 100/300 | loss 2.3456 (floor 1.2) | ppl 10.4 | lr 3.0e-03 | rank ... | 12.3 steps/s ...'"""
  width = len(str(total_steps))
  parts = [f"step {record['step']:>{width}}/{total_steps}"]
  floor = f" (floor {loss_floor:.4f})" if loss_floor is not None else ""
  parts.append(f"loss {record['loss']:.4f}{floor}")
  parts.append(f"ppl {record['perplexity']:.2f}")
  parts.append(f"lr {record['lr']:.2e}")
  if "rank_rate" in record:
    parts.append(f"rank {record['rank_rate']:.3f} dens {record['density']:.3f} "
                 f"alpha {record['alpha']:.2e} beta {record['beta']:.2e} "
                 f"resid {record['primal_residual']:.3f}")
  parts.append(f"{record['steps_per_sec']:.2f} steps/s {_si(record['tokens_per_sec'])} tok/s")
  parts.append(f"ETA {format_duration(record['eta_sec'])}")
  return " | ".join(parts)


def eval_line(record: Mapping[str, Any]) -> str:
  """'eval step 100 | loss 2.1 ppl 8.2 | surrogate loss 2.2 ppl 9.0'"""
  parts = [f"eval step {record['step']}", f"loss {record['loss']:.4f} "
           f"ppl {record['perplexity']:.2f}"]
  for key, value in record.items():
    if key.endswith("/loss"):
      name = key[:-len("/loss")]
      parts.append(f"{name} loss {value:.4f} ppl {record[name + '/perplexity']:.2f}")
  return " | ".join(parts)
