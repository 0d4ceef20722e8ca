r"""Export a trained run's deployed model for use elsewhere.

    python -m experiments.export --workdir=/tmp/salaad_tiny --budget=0.5 --unit=bytes \
        --format=hf --out=/tmp/salaad_tiny_hf

``--format=hf`` writes a Hugging Face directory that
``transformers.LlamaForCausalLM.from_pretrained(DIR)`` and
``transformers.AutoTokenizer.from_pretrained(DIR)`` load with no custom code
(``salaad_jax.deploy.hf``): the deployed weights at the budget (SALAAD: per
block L + S cut to the allocation, reconstructed densely; everything else as
trained), ``config.json``, ``generation_config.json`` and the tokenizer's
files.  ``--budget=1`` (the default) exports the whole model; a run of
another method (dense, GaLore, low-rank, SLTrain, LOST, LoRA, ...) exports
its dense equivalent at ``--budget=1``.  ``--format=compact`` writes the
structured artifact instead (factors and sparse values in safetensors plus a
JSON manifest, ``salaad_jax.deploy.compact_files``), which
``salaad_jax.deploy.load_compact`` reads back into our structured Llama.

Every check (run, budget, output directory, format) runs before anything is
written; the directory appears whole or not at all.
"""

import os

from absl import app, flags

from experiments import common

FORMATS = ("hf", "compact")

_WORKDIR = flags.DEFINE_string("workdir", None, "the run directory to export", required=True)
_OUT = flags.DEFINE_string("out", None, "output directory (absent or empty unless "
                           "--overwrite)", required=True)
_FORMAT = flags.DEFINE_string("format", "hf", f"what to write: one of {list(FORMATS)}")
_BUDGET = flags.DEFINE_string("budget", "1", "deployment budget: 1 (the whole model), a "
                              "fraction (0.5 or 50%) of the dense parameters / bytes "
                              "(--unit), or an absolute count (an integer)")
_UNIT = flags.DEFINE_enum("unit", "params", ["params", "bytes"], "what --budget counts: "
                          "parameters, or deployment bytes stored as --fmt in --dtype")
_METHOD = flags.DEFINE_enum("method", "global", ["global", "hpa"], "allocation method "
                            "(hpa: parameter budgets only)")
_FMT = flags.DEFINE_enum("fmt", "coo", ["coo", "csr", "bitmap", "auto"], "sparse storage "
                         "format that prices a byte budget (and that --format=compact "
                         "stores)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "value dtype that "
                           "prices a byte budget (and that --format=compact stores)")
_OUT_DTYPE = flags.DEFINE_enum("out_dtype", "float32", ["float32", "bfloat16"],
                               "--format=hf: dtype of the written tensors")
_GAMMA = flags.DEFINE_float("gamma", 0.5, "HPA's low-rank share of the cut", lower_bound=0.0,
                            upper_bound=1.0)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step; unset: the latest", lower_bound=0)
_MAX_SHARD = flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "--format=hf: weights above "
                                  "this are split into safetensors shards", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a non-empty output directory")


def parse_budget(text: str):
  """1.0 for '1' / '100%' (the whole model), else the one budget of
  ``deploy.parse_budgets``."""
  from salaad_jax.deploy import parse_budgets  # pylint: disable=import-outside-toplevel
  if text.strip() in ("1", "1.0", "100%"):
    return 1.0
  budgets = parse_budgets(text)
  if len(budgets) != 1:
    raise ValueError(f"--budget={text!r}: give one budget")
  return budgets[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logging()
  from salaad_jax.deploy import compact_files, deployed, hf  # pylint: disable=import-outside-toplevel
  try:
    if _FORMAT.value not in FORMATS:
      raise ValueError(f"--format={_FORMAT.value!r} is not one of {list(FORMATS)}")
    budget = parse_budget(_BUDGET.value)
    out = hf.check_out_dir(_OUT.value, _OVERWRITE.value)
    if not os.path.isdir(_WORKDIR.value):
      raise ValueError(f"--workdir={_WORKDIR.value}: no such directory")
    kwargs = dict(unit=_UNIT.value, method=_METHOD.value, fmt=_FMT.value, dtype=_DTYPE.value,
                  gamma=_GAMMA.value, step=_STEP.value)
    if _FORMAT.value == "compact":
      manifest = compact_files.export_run(out, _WORKDIR.value, budget, overwrite=True,
                                          **kwargs)
      common.say(f"wrote {out} (compact, {manifest['fmt']} in {manifest['dtype']}): "
                 f"{manifest['params']:,} params, {manifest['bytes']:,} bytes "
                 f"({manifest['budget']['fraction']:.1%} of dense {_UNIT.value})")
      return
    dep = deployed.deployed(_WORKDIR.value, budget, **kwargs)
    files = hf.export_hf(out, dep.params, dep.config, tokenizer=dep.tokenizer,
                         dtype=_OUT_DTYPE.value, overwrite=True,
                         max_shard_bytes=_MAX_SHARD.value, provenance=dep.info)
  except ValueError as e:  # HFError, DeployError, SpectrumError, allocation errors
    common.fail(str(e))
  info = dep.info
  size = ("the whole model" if info.get("params") is None else
          f"{info['params']:,} params, {info['bytes']:,} bytes "
          f"({info['bytes_fraction']:.1%} of dense bytes in {info['dtype']}, {info['fmt']})")
  common.say(f"wrote {out} (Hugging Face LlamaForCausalLM, {_OUT_DTYPE.value}; "
             f"{info['run_method']} run, step {info['step']}; {size}): {', '.join(files)}")


if __name__ == "__main__":
  app.run(main)
