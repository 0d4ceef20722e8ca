"""What the test modules share besides fixtures (those are in conftest.py):
the repository's paths, the tiny flag file and the real text beside the
repository (tests that need it skip when it is absent), a tiny training
config, the train losses a run logged, and the check that an app refused its
input with one clear line.

conftest.py imports this module once it has set XLA's flags up.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from salaad_jax.train import TrainConfig
from salaad_jax.train.metrics import read_records

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = str(ROOT / "experiments" / "configs" / "tiny.flags")

# Real text (``../shared/data``, described in its README), never copied here.
DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"


def needs_file(path: Path) -> pytest.MarkDecorator:
  """Skips a test when ``path`` (e.g. ``SHAKESPEARE``) is absent."""
  return pytest.mark.skipif(not Path(path).exists(), reason=f"{path} is absent")


NEEDS_SHAKESPEARE = needs_file(SHAKESPEARE)


# ---------------------------------------------------------------------------
# A tiny run, in-process.
# ---------------------------------------------------------------------------

# The tiny model on the synthetic corpus: 12 steps of 4 x 16 tokens, a few
# seconds on CPU; evaluation and checkpoints off, synchronous saves.
TINY_RUN = dict(model="tiny", dtype="float32", source="synthetic:order=1", tokenizer="byte",
                seq_len=16, batch_size=4, steps=12, lr=1e-2, warmup_steps=0, log_every=4,
                eval_every=0, eval_batches=2, checkpoint_every=0, async_checkpoint=False,
                seed=0)


def tiny_config(method: str = "dense", **overrides) -> TrainConfig:
  """``TrainConfig`` of ``TINY_RUN`` for ``method``, fields replaced by ``overrides``."""
  return TrainConfig(**{**TINY_RUN, "method": method, **overrides})


def train_losses(workdir) -> list[tuple[int, float]]:
  """(step, loss) of every train record of the run in ``workdir``."""
  return [(r["step"], r["loss"]) for r in read_records(os.path.join(workdir, "metrics.jsonl"))
          if r["kind"] == "train"]


# ---------------------------------------------------------------------------
# Apps refusing their input.
# ---------------------------------------------------------------------------

# What absl prints after a flag's own error line.
_ABSL_HINT = "Pass --helpshort or --helpfull to see help on flags."


def error_lines(stderr: str) -> list[str]:
  """The lines of ``stderr`` that say something: not blank, not a logged
  warning, not absl's hint after a bad flag."""
  return [l for l in stderr.splitlines()
          if l.strip() and "WARNING" not in l and l.strip() != _ABSL_HINT]


def assert_one_line_error(out: subprocess.CompletedProcess, needle: str = "", *,
                          prefix: str = "error: ", returncode: int | None = None,
                          alone: bool = False) -> str:
  """``out`` failed (with ``returncode`` when given) without a traceback,
  and its last line on stderr starts with ``prefix`` and holds ``needle``,
  the only line that starts with ``prefix`` (``alone``: the only line that
  says something, ``error_lines``); returns that line."""
  tail = out.stderr[-3000:]
  if returncode is None:
    assert out.returncode != 0, tail
  else:
    assert out.returncode == returncode, (out.returncode, tail)
  assert "Traceback" not in out.stderr, tail
  lines = error_lines(out.stderr)
  assert lines and lines[-1].startswith(prefix) and needle in lines[-1], tail
  if prefix:
    assert sum(l.startswith(prefix) for l in lines) == 1, tail
  if alone:
    assert len(lines) == 1, tail
  return lines[-1]

