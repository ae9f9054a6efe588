"""A stop request: the time cap, and a signal that asks once and quits the second time."""

import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from training.stop import StopRequest


def test_the_time_cap_asks_to_stop_once_it_has_passed_and_only_where_it_is_checked():
  stop = StopRequest(max_minutes=0.5 / 60)
  assert not stop.requested()
  time.sleep(0.6)
  assert not stop.requested(check_time_cap=False) and stop.reason is None
  assert stop.requested() and stop.reason == "max_minutes"
  assert stop.signalled() is None  # the time cap is no signal


def test_the_time_cap_is_in_minutes():
  before = time.monotonic()
  stop = StopRequest(max_minutes=2.5)
  assert 150.0 <= stop.deadline - before <= 150.0 + (time.monotonic() - before)


def test_no_cap_never_asks_to_stop():
  stop = StopRequest(max_minutes=0)
  assert not stop.requested() and stop.reason is None


def test_a_signal_asks_to_stop_and_the_same_signal_again_acts_as_before():
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  sigint_before = signal.getsignal(signal.SIGINT)
  try:
    stop = StopRequest()
    with stop.on_signals():
      assert signal.getsignal(signal.SIGINT) is not sigint_before
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.requested() and stop.reason == "SIGTERM" and received == []
      assert stop.signalled() == "SIGTERM"
      os.kill(os.getpid(), signal.SIGTERM)  # the handler from before the block: quit now
      assert received == [signal.SIGTERM]
    # The block leaves the handlers as it found them, the one whose signal never came too.
    assert signal.getsignal(signal.SIGINT) is sigint_before
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_the_first_signal_stays_the_reason_when_another_follows():
  stop = StopRequest()
  with stop.on_signals():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # still handled: only SIGTERM's own handler went back
    assert stop.requested() and stop.reason == "SIGTERM" and stop.signalled() == "SIGTERM"


def test_a_signal_stays_the_reason_when_the_time_cap_passes_after_it():
  stop = StopRequest(max_minutes=0.01 / 60)
  with stop.on_signals():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # past the cap
    assert stop.requested() and stop.reason == "SIGTERM"


def on_two_processes(monkeypatch, other_stops: bool) -> None:
  """This process and another, which has (`other_stops`) or has not a stop or signal of its own."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  gather = lambda mine: np.array([mine, np.int32(other_stops)])
  monkeypatch.setattr(multihost_utils, "process_allgather", gather)


def test_with_several_processes_a_stop_on_any_one_stops_them_all(monkeypatch):
  on_two_processes(monkeypatch, other_stops=True)
  stop = StopRequest()
  assert stop.requested() and stop.reason == "a stop on another process"
  assert stop.signalled() == "a signal on another process"


def test_with_several_processes_a_signal_here_keeps_its_name(monkeypatch):
  on_two_processes(monkeypatch, other_stops=False)
  stop = StopRequest()
  assert not stop.requested() and stop.signalled() is None
  with stop.on_signals():
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested() and stop.reason == "SIGINT" and stop.signalled() == "SIGINT"


def test_outside_the_main_thread_the_block_runs_and_leaves_the_signals_alone():
  # A run trained on a notebook's background thread: Python allows no handler there.
  sigint_before, inside, errors = signal.getsignal(signal.SIGINT), [], []

  def train():
    try:
      with StopRequest().on_signals():
        inside.append(signal.getsignal(signal.SIGINT))
    except Exception as error:
      errors.append(error)

  thread = threading.Thread(target=train)
  thread.start()
  thread.join()
  assert errors == [] and inside == [sigint_before]
