"""Several processes, one run: starting JAX's multi-controller runtime from
the flags, and ending every process promptly.

With ``--distributed`` each host (process) of a job runs the same command.
``initialize`` calls ``jax.distributed.initialize``: with
``--coordinator_address``, ``--num_processes`` and ``--process_id`` when they
are given, otherwise with what JAX reads itself (``JAX_COORDINATOR_ADDRESS``,
``JAX_LOCAL_DEVICE_IDS``) or detects (SLURM, Open MPI, TPU, Kubernetes).

Collective work (training steps, evaluation, Orbax saves and restores) runs
on every process; files outside Orbax are written by process 0 only
(``is_primary``).  A process that fails leaves with ``exit_now``: at once,
without JAX's shutdown barrier, which would otherwise wait for peers that may
themselves wait for it; the coordination service then stops the others
within its heartbeat timeout (JAX's default, 100 s) instead of never.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import jax

from salaad_jax.train.config import TrainConfig, TrainError

FLAG_FIELDS = ("distributed", "coordinator_address", "num_processes", "process_id")


def check(distributed: bool, coordinator_address: str = "", num_processes: int = 0,
          process_id: int = -1) -> None:
  """TrainError naming the flag when the settings cannot start a run."""
  given = [name for name, value, unset in (
      ("coordinator_address", coordinator_address, ""), ("num_processes", num_processes, 0),
      ("process_id", process_id, -1)) if value != unset]
  if given and not distributed:
    raise TrainError(f"--{given[0]} is only used with --distributed")
  if num_processes and process_id >= num_processes:
    raise TrainError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  if coordinator_address and ":" not in coordinator_address:
    raise TrainError(f"--coordinator_address={coordinator_address!r} must be host:port")


def initialize(distributed: bool, coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
  """``jax.distributed.initialize`` once, when ``distributed``; unset
  settings (``''``, 0, -1) are left to JAX's environment and cluster detection.

  Raises:
    TrainError: inconsistent settings, no cluster detected with settings
      missing, or no coordinator reached.
  """
  check(distributed, coordinator_address, num_processes, process_id)
  if not distributed or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(coordinator_address or None, num_processes or None,
                               None if process_id < 0 else process_id)
  except (ValueError, TypeError) as e:
    raise TrainError(f"--distributed: {e} No cluster (SLURM, Open MPI, TPU, Kubernetes) "
                     "supplied it; give --coordinator_address=host:port, --num_processes "
                     "and --process_id") from None
  except RuntimeError as e:  # jax.errors.JaxRuntimeError: coordinator unreachable, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TrainError(f"--distributed: could not join the job ({first})") from None


def initialize_from_config(config: TrainConfig) -> None:
  """``initialize`` with the run's settings."""
  initialize(config.distributed, config.coordinator_address, config.num_processes,
             config.process_id)


def is_multiprocess() -> bool:
  return jax.distributed.is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run's files and prints its progress:
  process 0, or the only one (then without starting JAX's backend)."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def exit_now(code: int) -> NoReturn:
  """Ends this process with ``code``; with several processes at once
  (``os._exit``, after flushing), so that no exit handler waits for peers."""
  if not is_multiprocess():
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
