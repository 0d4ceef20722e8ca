r"""What a seed and learning-rate sweep in one process costs to set up: the
executors' programs with the seed and the peak learning rate as inputs and
kept for the process (as they now run) against the same programs with the
values compiled in and built per run (as they ran before: an explicit
optimiser).

    python -m benchmarks.sweep_compile --methods=salaad,dense --runs=4 --steps=3

Each run is one (seed, learning rate) of the sweep (seed i, lr 3e-3 * 1.5^i):
executor built, state initialised, ``--steps`` steps on fixed batches,
everything blocked until ready.  The persistent compilation cache is off.
Printed per method: the first run and the mean of the later runs for both
paths, the ratio of the later runs (compiled in / inputs) measured in the
same process, and the largest relative difference of the final states
(inputs against compiled in) over the sweep.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags
import jax
import numpy as np

from salaad_jax.train import TrainConfig, build, presets, programs
from salaad_jax.train.executors import make_executor

_METHODS = flags.DEFINE_list("methods", ["salaad", "dense"], "methods (salaad: the "
                             "recommended preset)")
_MODEL = flags.DEFINE_string("model", "tiny", "model preset")
_RUNS = flags.DEFINE_integer("runs", 4, "runs of the sweep", lower_bound=2)
_STEPS = flags.DEFINE_integer("steps", 3, "train steps per run", lower_bound=1)


def _config(method: str, i: int) -> TrainConfig:
  fields = dict(method=method, model=_MODEL.value, dtype="float32", seq_len=32, batch_size=4,
                steps=100, warmup_steps=5, vocab_size=256, seed=i, lr=3e-3 * 1.5 ** i)
  if method == "salaad":
    return presets.config_with_preset("recommended", **fields)
  return TrainConfig(**fields)


def _run(config: TrainConfig, inputs: bool):
  """(seconds, final state) of one run of the sweep."""
  start = time.perf_counter()
  parts = build(config)
  ex = make_executor(config, parts.model, parts.method, None if inputs else parts.tx,
                     devices=jax.devices()[:1])
  state = ex.init()
  rng = np.random.default_rng(0)
  for _ in range(_STEPS.value):
    tokens = rng.integers(0, 256, (config.batch_size, config.seq_len + 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": np.ones((config.batch_size, config.seq_len), np.float32)}
    state, _ = ex.step(state, ex.put_batch(batch))
  state = jax.block_until_ready(state)
  return time.perf_counter() - start, jax.device_get(state)


def _max_rel(a, b) -> float:
  diffs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - y)
                                / (np.abs(np.asarray(y, np.float64)) + 1e-6), initial=0.0)),
      a, b))
  return max(diffs, default=0.0)


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model "
        f"{_MODEL.value}, {_RUNS.value} runs (seed i, lr 3e-3 * 1.5^i), {_STEPS.value} "
        "steps each, no persistent compilation cache")
  print("| method | compiled in: first (s) | later (s) | inputs, kept: first (s) | "
        "later (s) | later: compiled in / inputs | max rel. state difference |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for method in _METHODS.value:
    configs = [_config(method, i) for i in range(_RUNS.value)]
    programs.clear_cache()
    old = [_run(c, inputs=False) for c in configs]
    new = [_run(c, inputs=True) for c in configs]
    later = lambda runs: statistics.mean(t for t, _ in runs[1:])
    diff = max(_max_rel(n, o) for (_, n), (_, o) in zip(new, old))
    print(f"| {method} | {old[0][0]:.2f} | {later(old):.2f} | {new[0][0]:.2f} | "
          f"{later(new):.2f} | {later(old) / later(new):.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
  app.run(main)
