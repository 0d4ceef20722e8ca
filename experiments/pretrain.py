r"""Pretrain a LLaMA-style model with SALAAD (or another registered method).

    python -m experiments.pretrain --flagfile=experiments/configs/tiny.flags \
        --workdir=/tmp/salaad_tiny

Every TrainConfig field is a flag (``--helpfull`` lists them); rerunning the
same command resumes the workdir's latest checkpoint.  Writes
``<workdir>/config.json``, ``checkpoints/<step>/``, ``metrics.jsonl`` (and
TensorBoard events when a writer is installed) and, once finished,
``summary.json``: parameters, deployment bytes and validation perplexity of
the deployed model (for SALAAD its surrogate L + S), which
``experiments.spectrum --baselines`` and ``benchmarks.compare`` read.
"""

from absl import app, flags

from experiments import common
from salaad_jax.train import TrainError
from salaad_jax.train import flags as train_flags

train_flags.define_flags()
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it "
                               "holds a checkpoint)", required=True)


@common.exits_promptly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  try:
    config = train_flags.config_from_flags()
  except TrainError as e:
    common.fail(str(e))
  result = common.train(config, _WORKDIR.value)
  if result.get("interrupted"):
    return
  common.say(common.result_line(result, _WORKDIR.value))
  common.say(common.summary_line(common.write_summary(_WORKDIR.value, result)))


if __name__ == "__main__":
  app.run(main)
