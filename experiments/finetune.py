r"""Fine-tune a pretrained run with LoRA, SALR, LoSA or SALAAD.

    python -m experiments.finetune --flagfile=experiments/configs/finetune_tiny.flags \
        --init_workdir=/tmp/dense_tiny --method=salr --source=/path/to/other.txt \
        --workdir=/tmp/ft_salr

``--init_workdir`` is a finished ``experiments.pretrain`` run of a dense
Llama (``--method=dense``, ``salaad`` or ``galore``); its model, vocabulary,
tokenizer and dtypes are used unless given here.  Instead of it,
``--init_from_hf=DIR`` starts from a Hugging Face LLaMA checkpoint (e.g. one
``experiments.export --format=hf`` wrote): the model preset of its shape and
its vocabulary are used unless given (and the tokenizer an export of ours
names).  Every TrainConfig field is a
flag (``--helpfull``), method options with ``--method_option key=value``:

  * ``lora``: rank (8), alpha (16);
  * ``salr``: lora_rank (8), residual_rank (8), sparsity (0.5), alpha (16);
  * ``losa``: rank (mean per layer, 8), alpha (16), sparsity (target, 0.5),
    rounds (5), max_deviation (0.02), calib_batches (2).  The rounds run one
    after the other in ``<workdir>/round_<t>``, each starting from the
    previous one's merged weights, with ``--steps`` split between them;
  * ``salaad``: the SALAAD flags (``--rho``, ``--rank_target``, ...), starting
    from the pretrained weights.

Rerunning the same command resumes (an unfinished LoSA round continues, the
finished ones are kept).  When done, ``<workdir>/summary.json`` holds the
validation perplexity, parameter count, deployment bytes and sparsity of the
deployed model (``experiments.spectrum --baselines=<workdir>`` plots it).
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common
from salaad_jax.baselines.finetune import losa_rounds
from salaad_jax.deploy import hf
from salaad_jax.deploy import summary as summary_lib
from salaad_jax.train import TrainConfig, TrainError
from salaad_jax.train import config as cfg_lib
from salaad_jax.train import flags as train_flags
from salaad_jax.train import multihost

FINETUNE_METHODS = ("lora", "salr", "losa", "salaad")
# Taken from the pretrained run unless given on the command line.
INHERITED = ("model", "vocab_size", "tokenizer", "dtype", "param_dtype")

train_flags.define_flags(methods=FINETUNE_METHODS)
flags.FLAGS.set_default("method", "lora")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it "
                               "holds a checkpoint)", required=True)
_INIT = flags.DEFINE_string("init_workdir", None, "workdir of the pretrained run to start "
                            "from (or give --init_from_hf)")


def finetune_config(flag_values=flags.FLAGS) -> TrainConfig:
  """The TrainConfig of the flags, with the pretrained run's model settings
  where the flags leave them unset."""
  if flag_values["init_from"].present:
    raise TrainError("give the pretrained run with --init_workdir (not --init_from)")
  config = train_flags.config_from_flags(flag_values)
  if config.method not in FINETUNE_METHODS:
    raise TrainError(f"--method={config.method}: fine-tuning methods are "
                     f"{list(FINETUNE_METHODS)}")
  init = flag_values["init_workdir"].value
  if bool(init) == bool(config.init_from_hf):
    raise TrainError("give the pretrained model with one of --init_workdir (a run) or "
                     "--init_from_hf (a Hugging Face LLaMA directory)")
  if config.init_from_hf:
    try:
      settings = hf.model_settings(config.init_from_hf)
    except hf.HFError as e:
      raise TrainError(f"--init_from_hf={config.init_from_hf}: {e}") from None
    inherited = {k: v for k, v in settings.items() if not flag_values[k].present}
    return config.replace(init_from_hf=os.path.abspath(config.init_from_hf), **inherited)
  try:
    source = cfg_lib.read_config(init)
  except TrainError as e:
    raise TrainError(f"--init_workdir: {e}") from None
  inherited = {k: getattr(source, k) for k in INHERITED if not flag_values[k].present}
  return config.replace(init_from=os.path.abspath(init), **inherited)


@common.exits_promptly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  workdir = _WORKDIR.value
  try:
    config = finetune_config()
    if config.method == "losa":
      runs = losa_rounds(config, workdir)
    else:
      runs = [(config, workdir)]
  except TrainError as e:
    common.fail(str(e))
  for i, (run_config, run_dir) in enumerate(runs):
    if len(runs) > 1:
      common.say(f"== LoSA round {i + 1}/{len(runs)}: {run_config.steps} steps in {run_dir}")
    result = common.train(run_config, run_dir)
    if result.get("interrupted"):
      return
    common.say(common.result_line(result, run_dir))
  summary = common.write_summary(run_dir, result)
  if run_dir != workdir:
    fields = {k: v for k, v in summary.items() if k != "format_version"}
    fields["step"] = sum(c.steps for c, _ in runs)
    fields["extra"] = {**fields.get("extra", {}),
                       "init_from": config.init_from or config.init_from_hf,
                       "rounds": len(runs),
                       "final_round_workdir": os.path.abspath(run_dir)}
    summary = summary_lib.write_summary(workdir, **fields, write=multihost.is_primary())
  common.say(common.summary_line(summary))


if __name__ == "__main__":
  app.run(main)
