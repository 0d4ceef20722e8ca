"""Capacity spectrum of a trained SALAAD run: perplexity at every budget.

    python -m experiments.spectrum --workdir=/tmp/salaad_tiny \
        --budgets=0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0 [--dense_workdir=/tmp/dense_tiny] \
        [--baseline_workdirs=/tmp/sltrain,/tmp/galore]

Evaluates the validation perplexity of the run deployed at each budget with
HPA and global allocation, the post-hoc SVD + pruning baseline at the same
budgets (of --dense_workdir, or of the run's own X), and the dense weights
as reference; reads single points from ``summary.json`` of other runs.
With --time_forward (the default) every deployment is also built in its
runtime form (--time_product) and its jitted forward of one batch of the
evaluation's shape (--time_batch rows) timed against the dense model's in
the same process, median over --time_repeats rounds after a warm-up: the
columns ``forward_ms`` and ``forward_vs_dense`` and the plot's second panel
(--notime_forward leaves them out).
Writes ``spectrum.md``, ``spectrum.csv``, ``spectrum.json`` and
``spectrum.png`` into --out_dir (default ``<workdir>/spectrum``), each
atomically, once every evaluation is done.  With ``--distributed`` (and
``--coordinator_address``, ``--num_processes``, ``--process_id`` as for
``experiments.pretrain``) every process of a job restores the runs together
and evaluates its own copy; process 0 prints and writes.  See
``salaad_jax.deploy.spectrum`` and ``salaad_jax.deploy.spectrum_report``.
"""

import os

from absl import app, flags

from experiments import common
from salaad_jax.deploy import spectrum as sp
from salaad_jax.deploy import spectrum_report as report
from salaad_jax.deploy.forward_time import ForwardTiming
from salaad_jax.models.runtime import PRODUCTS
from salaad_jax.train import TrainError
from salaad_jax.train import flags as train_flags
from salaad_jax.train import multihost

_WORKDIR = flags.DEFINE_string("workdir", None, "a --method=salaad run directory",
                               required=True)
_BUDGETS = flags.DEFINE_string(
    "budgets", ",".join(str(float(b)) for b in sp.DEFAULT_BUDGETS),
    "comma-separated budgets: fractions of the dense model (0.4 or 40%) or absolute counts "
    "(integers) in --unit")
_UNIT = flags.DEFINE_enum("unit", "params", ["params", "bytes"],
                          "what a budget counts: parameters, or deployment bytes in "
                          "--fmt/--dtype")
_METHODS = flags.DEFINE_list("methods", ["hpa", "global"],
                             "allocation methods (hpa, global, cut: the cut a run with "
                             "--consolidate_cut_budgets trained, bitmap S in bytes)")
_DENSE = flags.DEFINE_string("dense_workdir", None, "a --method=dense run of the same model "
                             "for the post-hoc rows; unset: post-hoc split of the run's own X")
_POSTHOC = flags.DEFINE_bool("posthoc", True, "add the post-hoc SVD + pruning rows")
_POSTHOC_RANK = flags.DEFINE_float("posthoc_rank", None, "post-hoc rank as a fraction of "
                                   "min(m, n); unset: the run's --rank_target")
_POSTHOC_DENSITY = flags.DEFINE_float("posthoc_density", None, "post-hoc share of residual "
                                      "entries kept; unset: the run's --density_target")
_BASELINES = flags.DEFINE_list("baseline_workdirs", [], "workdirs (or .json files) with a "
                               "summary.json, plotted as single points")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "validation batches per evaluation; "
                                     "0: the run's --eval_batches", lower_bound=0)
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "", "split to evaluate; '': the run's")
_FMT = flags.DEFINE_enum("fmt", "coo", ["coo", "csr", "bitmap", "auto"], "sparse storage format "
                         "the bytes are counted in (auto: per budget, the one that keeps "
                         "the most)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "stored value dtype")
_GAMMA = flags.DEFINE_float("gamma", 0.5, "HPA's low-rank share of the cut", lower_bound=0.0,
                            upper_bound=1.0)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step; unset: the latest", lower_bound=0)
_CALIBRATION = flags.DEFINE_integer(
    "calibration_batches", 0, "training batches on which the models' input second moments "
    "weight the allocation (output error instead of weight error); 0: unweighted",
    lower_bound=0)
_TIME = flags.DEFINE_bool("time_forward", True, "time each deployment's forward (runtime "
                          "form) against dense: the forward_ms / forward_vs_dense columns and "
                          "the time panel of the plot")
_TIME_BATCH = flags.DEFINE_integer("time_batch", 0, "sequences in the timed batch (of the "
                                   "evaluation's length); 0: the evaluation batch's",
                                   lower_bound=0)
_TIME_REPEATS = flags.DEFINE_integer("time_repeats", 5, "timed rounds (after one warm-up "
                                     "call); the median is reported", lower_bound=1)
_TIME_PRODUCT = flags.DEFINE_enum("time_product", "adaptive", list(PRODUCTS),
                                  "runtime form of the timed deployments "
                                  "(salaad_jax.models.runtime)")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "output directory; '': <workdir>/spectrum")
train_flags.define_distributed_flags()


def _valid(parse):
  def check(value):
    try:
      parse(value)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
    return True
  return check


def _check_methods(methods):
  if not methods or any(m not in ("hpa", "global", "cut") for m in methods) or (
      len(set(methods)) < len(methods)):
    raise ValueError(f"must be distinct entries of hpa, global, cut; got {methods}")


def _check_fraction(value):
  if value is not None and not 0.0 <= value <= 1.0:
    raise ValueError(f"must lie in [0, 1], got {value}")


flags.register_validator("budgets", _valid(sp.parse_budgets))
flags.register_validator("methods", _valid(_check_methods))
flags.register_validator("posthoc_rank", _valid(_check_fraction))
flags.register_validator("posthoc_density", _valid(_check_fraction))


def _forward_timing():
  if not _TIME.value:
    return None
  return ForwardTiming(batch=_TIME_BATCH.value or None, repeats=_TIME_REPEATS.value,
                       product=_TIME_PRODUCT.value)


@common.exits_promptly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    multihost.initialize(**train_flags.distributed_settings())
  except TrainError as e:
    common.fail(str(e))
  common.quiet_logging()  # Orbax logs every restore at INFO.
  try:
    rows = sp.capacity_spectrum(
        _WORKDIR.value, _BUDGETS.value, methods=_METHODS.value, dense_workdir=_DENSE.value,
        posthoc=_POSTHOC.value, posthoc_rank=_POSTHOC_RANK.value,
        posthoc_density=_POSTHOC_DENSITY.value, baseline_workdirs=_BASELINES.value,
        eval_batches=_EVAL_BATCHES.value or None, eval_split=_EVAL_SPLIT.value or None,
        unit=_UNIT.value, fmt=_FMT.value, dtype=_DTYPE.value, gamma=_GAMMA.value,
        step=_STEP.value, calibration_batches=_CALIBRATION.value,
        time_forward=_forward_timing(), progress=common.say)
  except sp.SpectrumError as e:
    common.fail(str(e))
  if not multihost.is_primary():
    return
  out = _OUT_DIR.value or os.path.join(_WORKDIR.value, "spectrum")
  paths = report.write_table(rows, out)
  paths["png"] = report.plot(rows, os.path.join(out, "spectrum.png"),
                             title=f"{_WORKDIR.value} ({_FMT.value}, {_DTYPE.value})")
  print(report.pivot_markdown(rows), flush=True)
  print("wrote " + ", ".join(paths[k] for k in ("md", "csv", "json", "png")), flush=True)


if __name__ == "__main__":
  app.run(main)
