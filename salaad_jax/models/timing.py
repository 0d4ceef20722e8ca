"""Wall-clock time of calls on the device, measured the one way the project
measures it.

Every call is run ``warmup`` times first (compilation and warm-up, not
timed); then ``repeats`` rounds, each timing one call of every function in
turn, each call blocked until its result is ready (interleaved: machine
load drifting during the measurement hits every function alike).  A
function's time is the median over rounds (``median_ms``); its time against
a reference measured in the same rounds is the median over rounds of the
round's ratio t / t_ref (``median_ratio``).

Used by ``runtime.prepare`` ('auto'), ``salaad_jax.deploy.forward_time``
(the spectrum's and the artifact's forward time) and
``benchmarks.inference``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

__all__ = ["median_ms", "median_ratio", "time_call", "time_rounds"]


def time_call(fn: Callable[[], Any]) -> float:
  """Seconds of one call of ``fn``, its result blocked until ready."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def time_rounds(calls: Sequence[Callable[[], Any]], repeats: int,
                warmup: int = 1) -> list[list[float]]:
  """Per function of ``calls``, its seconds in each of ``repeats`` rounds
  (after ``warmup`` untimed calls of each); one call of every function per
  round, in the order given."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
  for fn in calls:
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: list[list[float]] = [[] for _ in calls]
  for _ in range(repeats):
    for fn, out in zip(calls, times):
      out.append(time_call(fn))
  return times


def median_ms(times: Sequence[float]) -> float:
  """The median of ``times`` (seconds) in milliseconds."""
  return 1e3 * statistics.median(times)


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
  """The median over rounds of times[k] / reference[k] (the same rounds)."""
  if len(times) != len(reference) or not times:
    raise ValueError("median_ratio needs as many reference times as times, at least one")
  return statistics.median(t / r for t, r in zip(times, reference))
