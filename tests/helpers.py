"""What the test modules share besides fixtures (those are in conftest.py):
the repository's paths, the tiny flag file and the real text beside the
repository (tests that need it skip when it is absent), a tiny training
config, the train losses a run logged, the tiny model's shapes and
``benchmarks.compare``'s test settings, the check that an app refused its
input with one clear line, and a two-block problem for the transform with
NumPy read-outs of its state.

conftest.py imports this module once it has set XLA's flags up.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import salaad_jax as sj
from salaad_jax.deploy import allocation
from salaad_jax.train import TrainConfig
from salaad_jax.train.metrics import read_records
from salaad_jax.train.state import model_config

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


# The tiny model's shapes (benchmarks.compare's byte vocabulary), and the
# settings tests/test_compare*.py run ``benchmarks.compare`` on.
TINY_MODEL = model_config(TrainConfig(model="tiny", vocab_size=256))
COMPARE_COMMON = ["--source=synthetic:order=1", "--steps=4", "--batch_size=4", "--seq_len=16",
                  "--eval_batches=2"]


def read_csv(path) -> list[dict]:
  """The rows of the CSV file at ``path`` (a header line, then the rows)."""
  with open(path) as f:
    return list(csv.DictReader(f))


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


# ---------------------------------------------------------------------------
# Two blocks for the transform, read back in float64.
# ---------------------------------------------------------------------------

# Blocks 'a' (24 x 16) and 'b' (16 x 40), and a leaf 'bias' (3,) outside them.
BLOCK_SHAPES = {"a": (24, 16), "b": (16, 40)}


def two_blocks(seed: int = 0) -> dict:
  """Params with the blocks of ``BLOCK_SHAPES`` (standard normal) and ``bias``."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": {"kernel": jax.random.normal(k1, BLOCK_SHAPES["a"])},
          "b": {"kernel": jax.random.normal(k2, BLOCK_SHAPES["b"])}, "bias": jnp.ones(3)}


def run_steps(tx, params, steps: int, lr_target: float = 1.0) -> list:
  """``steps`` optimiser steps on sum (X - lr_target)^2; returns the history
  of (params, state) after each step."""
  loss = lambda p: sum(jnp.sum((x - lr_target) ** 2) for x in jax.tree.leaves(p))
  update = jax.jit(tx.update)
  state, out = tx.init(params), []
  for _ in range(steps):
    u, state = update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
    out.append((params, state))
  return out


def block_leaf(tree, name: str) -> np.ndarray:
  """``tree[name]['kernel']`` in float64."""
  return np.asarray(tree[name]["kernel"], np.float64)


def sparse_leaf(state, name: str) -> np.ndarray:
  """S of block ``name`` in the param's shape, whichever way the state stores it."""
  return np.asarray(sj.sparse_parts(state)[f"{name}/kernel"], np.float64)


def factor_leaves(state, name: str) -> tuple:
  """(B, A) of block ``name`` while the state trains in factors."""
  return tuple(np.asarray(v, np.float64)
               for v in sj.find_state(state).factored.factors[name]["kernel"])


def cut_oracle(sigmas, sparses, drop=0.0, keep=None, overhead=0.0) -> set:
  """The global cut by a plain sort over the deployment allocator's items
  (``deploy.allocation._sparse_chain`` folds a block's fixed cost into its
  first entries): items in decreasing gain per cost (non-increasing along
  each chain), taken while their running cost fits (1 - drop) of the total
  (or ``keep``).  The kept items as (block, 't', triplet) and (block, 'e',
  flat entry index)."""
  order, total = _cut_order(sigmas, sparses, overhead)
  budget = (1 - drop) * total if keep is None else keep
  kept, run = set(), 0
  for cost, what in order:
    if run + cost > budget * (1 + 1e-6) + 1e-6:
      break
    run += cost
    kept.update(what)
  return kept


def cut_prefixes(sigmas, sparses, overhead=0.0) -> list:
  """(running cost, kept items) after each item of ``cut_oracle``'s order:
  the budgets at which one more item fits exactly, and what they keep."""
  order, _ = _cut_order(sigmas, sparses, overhead)
  out, run, kept = [], 0, set()
  for cost, what in order:
    run += int(cost)
    kept = kept | set(what)
    out.append((run, kept))
  return out


def _cut_order(sigmas, sparses, overhead):
  """([(cost, kept items)] in ``cut_oracle``'s order, the total cost)."""
  items = []  # (ratio, chain, position, cost, [kept items])
  for i, (sig, sp) in enumerate(zip(sigmas, sparses)):
    m, n = sp.shape
    items += [(x * x / (m + n), 2 * i, j, m + n, [(i, "t", j)])
              for j, x in enumerate(sig) if x > 0]
    flat = sp.ravel()
    idx = [j for j in np.argsort(-flat * flat, kind="stable") if flat[j] != 0]
    if idx:
      g, c, cnt = allocation._sparse_chain(  # pylint: disable=protected-access
          flat[idx] ** 2, 1, int(round(overhead * m * n)))
      ratio, at = np.minimum.accumulate(g / c), 0
      for p, (r, cost, k) in enumerate(zip(ratio, c, cnt)):
        items.append((r, 2 * i + 1, p, cost, [(i, "e", j) for j in idx[at:at + k]]))
        at += k
  order = sorted(items, key=lambda t: (-t[0], t[1], t[2]))
  return [(cost, what) for _, _, _, cost, what in order], sum(t[3] for t in items)


def kept_of(x, f, sp) -> tuple:
  """(k, kept entries) with x = the top-k triplets of f + S on the kept entries."""
  u, sig, v = (np.asarray(t, np.float64) for t in f)
  for k in range(int(np.sum(sig > 0)) + 1):
    rest = x - (u[:, :k] * sig[:k]) @ v[:, :k].T
    ks = np.abs(rest) > 1e-4
    if np.all(sp[ks] != 0) and np.allclose(rest[ks], sp[ks], atol=1e-4):
      return k, ks
  raise AssertionError("the params are not a cut of the state's L + S")
