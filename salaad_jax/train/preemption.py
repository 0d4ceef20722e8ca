"""Turns SIGTERM / SIGINT into a stop request the training loop polls, so it
can write a checkpoint before exiting.  A second SIGINT interrupts at once.

With several processes the stop has to be collective: SIGTERM is left to
JAX's preemption notifier (installed by ``jax.distributed.initialize``), which
makes ``multihost_utils.reached_preemption_sync_point`` true at the same step
on every process, and SIGINT is passed on to it as a SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequest:
  """Context manager; ``signum`` is the first signal received (None if none)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, collective: bool = False):
    self.signum: Optional[int] = None
    self._previous = {}
    self._collective = collective

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = self.signum or signum
    if self._collective:
      signal.raise_signal(signal.SIGTERM)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self._collective else self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
