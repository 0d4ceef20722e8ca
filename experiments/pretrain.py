"""Pretrain a LLaMA-style model with SALAAD (or another registered method).

    python -m experiments.pretrain --flagfile=experiments/configs/tiny.flags \
        --workdir=/tmp/salaad_tiny

Every TrainConfig field is a flag (``--helpfull`` lists them); rerunning the
same command resumes the workdir's latest checkpoint.  Writes
``<workdir>/config.json``, ``checkpoints/<step>/``, ``metrics.jsonl`` (and
TensorBoard events when a writer is installed).
"""

import os
import signal
import sys

# XLA:CPU runs independent batched LAPACK calls (the Cholesky-QR of the fast
# SVT, one per block shape) concurrently on its intra-op thread pool, which
# has one thread per core; on small machines they can wait on each other
# forever.  A pool of at least 8 threads avoids that.  Read when JAX starts.
os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from salaad_jax.train import TrainError, train_and_evaluate  # pylint: disable=wrong-import-position
from salaad_jax.train import flags as train_flags  # pylint: disable=wrong-import-position
from salaad_jax.train.metrics import format_duration  # pylint: disable=wrong-import-position

train_flags.define_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it "
                               "holds a checkpoint)", required=True)


def _summary(result: dict, workdir: str) -> str:
  parts = [f"done: step {result['step']}"]
  if "eval_loss" in result:
    parts.append(f"eval loss {result['eval_loss']:.4f} ppl {result['eval_perplexity']:.2f}")
  if "eval_surrogate/loss" in result:
    parts.append(f"surrogate (L+S) loss {result['eval_surrogate/loss']:.4f}")
  if "rank_rate" in result:
    parts.append(f"rank rate {result['rank_rate']:.3f} density {result['density']:.3f}")
  parts.append(f"wall {format_duration(result['wall_time_sec'])}")
  parts.append(f"workdir {workdir}")
  return " | ".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Progress goes to stdout; absl logging (e.g. Orbax's INFO lines per save)
    # only from warnings up unless --verbosity is given.
    logging.set_verbosity(logging.WARNING)
  try:
    config = train_flags.config_from_flags()
    result = train_and_evaluate(config, _WORKDIR.value)
  except TrainError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  stopped = result.get("interrupted")
  if stopped in ("SIGTERM", "SIGINT"):
    sys.exit(128 + int(getattr(signal, stopped)))
  if not stopped:
    print(_summary(result, _WORKDIR.value), flush=True)


if __name__ == "__main__":
  app.run(main)
