"""What the training apps share: one-line errors, the exit status of an
interrupted run, the final report line and ``summary.json``, and how the
processes of a multi-host job (``--distributed``) print and end."""

from __future__ import annotations

import functools
import logging as std_logging
import os
import signal
import sys
import traceback

import jax
from absl import flags, logging

from salaad_jax.baselines.harness import write_run_summary
from salaad_jax.train import TrainConfig, TrainError, train_and_evaluate
from salaad_jax.train import config as cfg_lib
from salaad_jax.train import multihost
from salaad_jax.train.metrics import format_duration


def _without_orbax_traceback(record) -> bool:
  """Drops the stack of Orbax's own error records (e.g. of a failed background
  save, which the app reports as one ``error:`` line) and of asyncio's reports
  of its write tasks' exceptions; keeps their message.  asyncio's "Future
  exception was never retrieved" for a checkpoint read or write still in
  flight after the first failure is dropped: the app reports that failure as
  its one ``error:`` line, and the record could print after it."""
  if record.name == "asyncio" and record.getMessage().startswith(
      "Future exception was never retrieved"):
    return False
  if f"{os.sep}orbax{os.sep}" in (record.pathname or "") or record.name == "asyncio":
    record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def _closed_loop_callback(exc_type, exc, tb) -> bool:
  """TensorStore's completion callback of a read or write still in flight
  when Orbax closed its event loop on the first failure (reported on its own,
  as the one error or warning line)."""
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (exc_type is RuntimeError and str(exc) == "Event loop is closed" and tb is not None
          and tb.tb_frame.f_code.co_name == "_check_closed")


def quiet_logging() -> None:
  """Progress goes to stdout; absl logging (e.g. Orbax's INFO lines per save)
  only from warnings up (on processes other than 0 of a multi-host job, only
  errors), without Orbax's stack traces nor those of TensorStore callbacks
  after a failed checkpoint read or write, unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING if multihost.is_primary() else logging.ERROR)
    logging.get_absl_logger().addFilter(_without_orbax_traceback)
    std_logging.getLogger("asyncio").addFilter(_without_orbax_traceback)
    # TensorStore reports them through sys.unraisablehook (sys.excepthook
    # when it prints the error itself).
    hook, unraisable_hook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda *info: None if _closed_loop_callback(*info) else hook(*info)
    sys.unraisablehook = lambda u: (
        None if _closed_loop_callback(u.exc_type, u.exc_value, u.exc_traceback)
        else unraisable_hook(u))


def say(line: str) -> None:
  """Prints ``line`` (process 0 of a multi-host job only)."""
  if multihost.is_primary():
    print(line, flush=True)


def fail(message: str) -> None:
  """One error line, then exit status 1 (with several processes, at once)."""
  if multihost.is_multiprocess():
    message = f"{message} (process {jax.process_index()} of {jax.process_count()})"
  print(f"error: {message}", file=sys.stderr, flush=True)
  multihost.exit_now(1)


def exits_promptly(main):
  """``main`` whose unexpected exceptions, in a multi-host job, print their
  traceback and end the process at once (status 1) rather than in JAX's
  shutdown barrier, waiting for peers that wait for it."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except Exception:  # pylint: disable=broad-except
      if not multihost.is_multiprocess():
        raise
      traceback.print_exc()
      multihost.exit_now(1)
  return wrapped


def result_line(result: dict, workdir: str) -> str:
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


def summary_line(summary: dict) -> str:
  parts = [f"summary: {summary['method']}", f"{summary['params']:,} params",
           f"{summary['bytes']:,} bytes", f"ppl {summary['perplexity']:.3f}"]
  if summary.get("dense_params"):
    parts.insert(2, f"{summary['params'] / summary['dense_params']:.3f} of dense")
  if summary.get("sparsity") is not None:
    parts.append(f"sparsity {summary['sparsity']:.3f}")
  return " | ".join(parts)


def train(config: TrainConfig, workdir: str) -> dict:
  """``train_and_evaluate``; a TrainError exits with status 1 and one line, an
  interrupted run with 128 + the signal number (after its checkpoint; a
  multi-host job stopped by SIGTERM or SIGINT on any process: 128 + SIGTERM
  on every process)."""
  try:
    multihost.initialize_from_config(config)
    quiet_logging()
    result = train_and_evaluate(config, workdir)
  except TrainError as e:
    fail(str(e))
  stopped = result.get("interrupted")
  if stopped in ("SIGTERM", "SIGINT", "preemption"):
    sys.exit(128 + int(getattr(signal, "SIGTERM" if stopped == "preemption" else stopped)))
  return result


def write_summary(workdir: str, result: dict) -> dict:
  """``<workdir>/summary.json`` of a finished run (see
  ``salaad_jax.baselines.harness.write_run_summary``)."""
  try:
    return write_run_summary(cfg_lib.read_config(workdir), workdir, result)
  except TrainError as e:
    fail(str(e))
