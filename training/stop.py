"""Stopping a run cleanly: on a signal or when its time is up, at a step boundary, on every process
at once."""

import contextlib
import logging
import math
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

# A child of the trainer's logger, so that the command line's handler prints its notice.
LOG = logging.getLogger("train.stop")


class StopRequest:
  """Asks training to stop at the next step boundary and checkpoint: on SIGINT (Ctrl-C) or
  SIGTERM (what schedulers send before a kill), or once `max_minutes` of wall time have passed
  since it was made (0: no cap). The first of these stays the `reason`, whatever comes after.
  The same signal again acts as it would have without this (Ctrl-C twice quits at once)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, max_minutes: float = 0.0):
    self.reason: str | None = None
    self.signal_name: str | None = None  # the signal this process received, if any
    self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else math.inf
    self._previous_handlers = {}

  @contextlib.contextmanager
  def on_signals(self):
    """Handles the signals inside the block (Python allows it in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    self._previous_handlers = {
      signum: signal.signal(signum, self._handle) for signum in self.SIGNALS
    }
    try:
      yield
    finally:
      for signum, handler in self._previous_handlers.items():
        signal.signal(signum, handler)

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    self.reason = self.reason or name
    self.signal_name = self.signal_name or name
    signal.signal(signum, self._previous_handlers[signum])
    LOG.warning("%s: stopping at the next step boundary with a checkpoint (again: quit now)", name)

  def requested(self, check_time_cap: bool = True) -> bool:
    """Whether to stop now. Processes must stop at the same step, so with several they agree
    (a collective per call: every process calls this at the same points)."""
    if self.reason is None and check_time_cap and time.monotonic() >= self.deadline:
      self.reason = "max_minutes"
    self.reason = _on_any_process(self.reason, "a stop on another process")
    return self.reason is not None

  def signalled(self) -> str | None:
    """The signal this process received, "a signal on another process" where only another did,
    None where none did: unlike `reason`, not the time cap. Collective, as `requested`."""
    return _on_any_process(self.signal_name, "a signal on another process")


def _on_any_process(name: str | None, elsewhere: str) -> str | None:
  """`name`, or `elsewhere` where only another process has one: every process then agrees
  whether any has (a collective with several processes)."""
  if jax.process_count() > 1:
    anyone = multihost_utils.process_allgather(np.int32(name is not None)).max()
    name = name or (elsewhere if anyone else None)
  return name
