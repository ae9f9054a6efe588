"""Ahead-of-time step compiles: a lookup waits for its own bucket only, the first compile runs
alone, a compile's error reaches the caller, and none of it counts as a recompile."""

import concurrent.futures
import os
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training import compilation


def one_device_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


class Held:
  """A jitted function whose tracing waits for `event`: a compile held back until a test says."""

  def __init__(self, jitted, event: threading.Event, timeout_message: str):
    self.jitted, self.event, self.timeout_message = jitted, event, timeout_message

  def trace(self, *abstract_args):
    if not self.event.wait(timeout=60):
      raise TimeoutError(self.timeout_message)
    return self.jitted.trace(*abstract_args)


def test_a_step_waits_for_its_own_compile_not_for_those_queued_ahead_of_it(monkeypatch):
  # Two compile threads, both held on buckets 1 and 2; bucket 3 is queued behind them. Looking it
  # up must compile it on the spot: a pool that made it wait would time out the held compiles.
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  released = threading.Event()
  mesh = one_device_mesh()

  def job(bucket, held=False):
    jitted = jax.jit(lambda x: x * 2.0)
    spec = jax.ShapeDtypeStruct((bucket + 1,), jnp.float32)
    return (
      mesh,
      Held(jitted, released, "the held compiles were never released") if held else jitted,
      spec,
    )

  compilation.CompileEvents.install()
  outside_before = compilation.CompileEvents.outside_steps()
  jobs = {("train", 0): job(0), ("train", 1): job(1, True), ("train", 2): job(2, True)}
  steps = compilation.submit_compiles(jobs | {("train", 3): job(3)}, "overlap")
  try:
    executable = steps.train_step(3)
    assert not released.is_set()
    np.testing.assert_array_equal(executable(np.ones(4, np.float32)), np.full(4, 2.0))
  finally:
    released.set()
  steps.wait()
  steps.close()
  assert steps.accounting()["train_compiles"] == 4
  assert compilation.CompileEvents.outside_steps() == outside_before  # not taken for a recompile


class DeferredPool:
  """A thread pool stand-in whose tasks run only when the test says (`run_all`)."""

  def __init__(self, *args, **kwargs):
    self.tasks = []

  def submit(self, function, *args):
    future = concurrent.futures.Future()
    self.tasks.append((future, function, args))
    return future

  def run_all(self):
    for future, function, args in self.tasks:
      if future.set_running_or_notify_cancel():
        future.set_result(function(*args))

  def shutdown(self, **kwargs):
    pass


class Recorded:
  """A jitted function whose tracing is logged, and optionally waits for `go` first."""

  def __init__(self, name, log, go=None):
    self.name, self.log, self.go = name, log, go
    self.jitted = jax.jit(lambda x: x + 1.0)

  def trace(self, *abstract_args):
    self.log.append(f"{self.name} tracing")
    if self.go is not None and not self.go.wait(timeout=30):
      raise TimeoutError("never released")
    traced = self.jitted.trace(*abstract_args)
    self.log.append(f"{self.name} traced")
    return traced


def test_the_first_compile_holds_the_others_back_even_when_compiled_inline(monkeypatch):
  # The training thread takes the first bucket's compile before any pool thread does; the other
  # compiles must still wait for it (they would slow it down), not start because it left the pool.
  pool = DeferredPool()
  monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", lambda *a, **k: pool)
  log, go, mesh = [], threading.Event(), one_device_mesh()
  spec = jax.ShapeDtypeStruct((3,), jnp.float32)
  jobs = {
    ("train", 0): (mesh, Recorded("first", log, go), spec),
    ("train", 1): (mesh, Recorded("second", log), jax.ShapeDtypeStruct((5,), jnp.float32)),
  }
  steps = compilation.submit_compiles(jobs, "overlap")
  inline = threading.Thread(target=steps.train_step, args=(0,))
  inline.start()
  while "first tracing" not in log:
    time.sleep(0.01)
  pooled = threading.Thread(target=pool.run_all)
  pooled.start()
  time.sleep(0.5)  # time enough for the second compile to start, if it did not wait
  go.set()
  inline.join(timeout=60)
  pooled.join(timeout=60)
  assert log == ["first tracing", "first traced", "second tracing", "second traced"]
  steps.wait()


class Broken:
  """A step that does not compile."""

  def trace(self, *abstract_args):
    raise ValueError("this step does not compile")


def test_an_inline_compile_error_is_what_wait_raises(monkeypatch):
  pool = DeferredPool()
  monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", lambda *a, **k: pool)

  spec = jax.ShapeDtypeStruct((3,), jnp.float32)
  steps = compilation.submit_compiles(
    {("train", 0): (one_device_mesh(), Broken(), spec)}, "overlap"
  )
  with pytest.raises(ValueError, match="does not compile"):
    steps.train_step(0)
  with pytest.raises(ValueError, match="does not compile"):  # not a CancelledError
    steps.wait()


@pytest.mark.parametrize(
  ("threads", "mode", "workers"),
  [
    (0, "parallel", 3),
    (2, "parallel", 2),
    (2, "overlap", 2),
    (8, "overlap", 3),
    (2, "sequential", 1),
  ],
)
def test_compile_threads_size_the_pool_up_to_one_per_step(monkeypatch, threads, mode, workers):
  monkeypatch.setattr(os, "cpu_count", lambda: 4)  # threads=0: one per core, here 4 > 3 steps
  mesh = one_device_mesh()
  jobs = {
    ("train", bucket): (mesh, jax.jit(lambda x: x + 1.0), jax.ShapeDtypeStruct((bucket + 1,), "f4"))
    for bucket in range(3)
  }
  steps = compilation.submit_compiles(jobs, mode, threads)
  steps.wait()
  steps.close()
  assert steps.workers == workers and steps.accounting()["compile_threads"] == workers
  with pytest.raises(ValueError, match=r"compile threads must be >= 0 \(0: one per core\), got -1"):
    compilation.submit_compiles(jobs, mode, -1)


class Slow:
  """A jitted function whose tracing takes at least `seconds`."""

  def __init__(self, seconds: float):
    self.seconds, self.jitted = seconds, jax.jit(lambda x: x + 1.0)

  def trace(self, *abstract_args):
    time.sleep(self.seconds)
    return self.jitted.trace(*abstract_args)


def test_the_accounting_counts_the_eval_compiles_time_with_the_train_compiles():
  mesh = one_device_mesh()
  jobs = {
    (kind, bucket): (mesh, Slow(0.4 if kind == "eval" else 0.0), jax.ShapeDtypeStruct((3,), "f4"))
    for kind, buckets in (("train", 3), ("eval", 2))
    for bucket in range(buckets)
  }
  steps = compilation.submit_compiles(jobs, "sequential")
  accounting = steps.accounting()
  assert (accounting["train_compiles"], accounting["eval_compiles"]) == (3, 2)
  assert accounting["compile_seconds_sum"] >= 2 * 0.4  # the eval compiles' spans at least
  assert accounting["compile_wall_s"] >= accounting["compile_seconds_sum"] - 1e-6  # one at a time


def test_compile_wall_time_is_first_start_to_last_end_not_the_sum_of_compiles():
  mesh = one_device_mesh()
  jobs = {
    ("train", bucket): (mesh, Slow(0.4), jax.ShapeDtypeStruct((3,), "f4")) for bucket in range(4)
  }
  accounting = compilation.submit_compiles(jobs, "parallel", threads=4).accounting()
  # Four compiles of at least 0.4 s each, side by side on four threads.
  assert accounting["compile_seconds_sum"] >= 4 * 0.4
  assert accounting["compile_wall_s"] < accounting["compile_seconds_sum"] - 0.4


def test_a_steps_memory_counts_donated_outputs_once():
  # 100 bytes of arguments, 60 of outputs of which 50 written over donated arguments, 7 temporary.
  assert compilation.StepMemory(100, 60, 50, 7).total == 100 + 10 + 7


def test_cache_misses_are_the_step_compiles_requests_less_their_hits():
  compilation.CompileEvents.install()
  before = compilation.CompileEvents.cache_counts()
  with compilation.CompileEvents.step_compile():
    for event in [compilation.CACHE_REQUEST_EVENT] * 3 + [compilation.CACHE_HIT_EVENT]:
      jax.monitoring.record_event(event)
  jax.monitoring.record_event(compilation.CACHE_REQUEST_EVENT)  # no step's compile
  after = compilation.CompileEvents.cache_counts()
  assert np.subtract(after, before).tolist() == [1, 2]


class SlowLookups(dict):
  """Executables whose every lookup waits `seconds` (a compile in flight) before it answers."""

  def __init__(self, seconds: float):
    super().__init__()
    self.seconds = seconds

  def __getitem__(self, bucket):
    time.sleep(self.seconds)
    return f"executable {bucket}"


def test_compile_waits_are_timed_from_each_lookup_and_later_ones_add_up():
  # Compiling started 100 s ago; the first step's lookup waits 0.1 s of it, two later ones 0.1 s
  # each.
  steps = compilation.CompiledSteps(
    train_steps=SlowLookups(0.1),
    eval_steps=SlowLookups(0.0),
    pool=None,
    workers=1,
    started=time.perf_counter() - 100.0,
    cache_counts_before=(0, 0),
  )
  assert steps.train_step(0) == "executable 0"
  assert 0.1 <= steps.first_step_wait_s < 50.0 and steps.train_wait_s == 0.0
  steps.train_step(1)
  steps.train_step(0)
  assert 0.2 <= steps.train_wait_s < 50.0 and steps.first_step_wait_s < 50.0


def test_the_time_to_the_first_step_includes_its_wait_for_the_compile():
  mesh = one_device_mesh()
  steps = compilation.submit_compiles(
    {("train", 0): (mesh, Slow(0.3), jax.ShapeDtypeStruct((3,), "f4"))}, "overlap"
  )
  steps.train_step(0)
  steps.wait()
  steps.close()
  accounting = steps.accounting()
  assert 0.3 <= accounting["time_to_first_step_s"] <= time.perf_counter() - steps.started
  assert accounting["time_to_first_step_s"] >= steps.first_step_wait_s > 0.0


def test_compiles_dropped_by_a_stop_are_counted_and_have_no_memory_plan():
  # One compile thread, held on bucket 0; buckets 1 and 2 queue behind it and are dropped.
  released = threading.Event()
  mesh = one_device_mesh()
  held = Held(jax.jit(lambda x: x * 2.0), released, "the held compile was never released")
  jobs = {("train", 0): (mesh, held, jax.ShapeDtypeStruct((1,), jnp.float32))} | {
    ("train", bucket): (mesh, jax.jit(lambda x: x * 2.0), jax.ShapeDtypeStruct((bucket + 1,), "f4"))
    for bucket in (1, 2)
  }
  steps = compilation.submit_compiles(jobs, "overlap", threads=1)
  try:
    deadline = time.monotonic() + 60
    while not steps.train_steps.futures[0].running() and time.monotonic() < deadline:
      time.sleep(0.01)
    steps.cancel_queued()
    # Dropped at once, not only when the pool closes.
    assert steps.train_steps.futures[1].cancelled() and steps.train_steps.futures[2].cancelled()
  finally:
    released.set()
  steps.close()
  assert steps.train_steps.futures[0].done()  # the compile running when it closed ended first
  memory = steps.train_memory()
  assert memory[1] is None and memory[2] is None  # not compiled on the spot to be measured
  accounting = steps.accounting()
  assert (accounting["train_compiles"], accounting["compiles_dropped"]) == (1, 2)


def test_compiles_outside_the_steps_count_cache_hits_and_the_thread_that_made_them():
  compilation.CompileEvents.install()
  me = threading.get_ident()
  before, before_here = (compilation.CompileEvents.outside_steps(t) for t in (None, me))
  jax.monitoring.record_event(compilation.CACHE_HIT_EVENT)  # a recompile served from the cache
  elsewhere = threading.Thread(
    target=jax.monitoring.record_event_duration_secs, args=(compilation.BACKEND_COMPILE_EVENT, 0.1)
  )
  elsewhere.start()
  elsewhere.join()
  assert compilation.CompileEvents.outside_steps() - before >= 2  # both threads'
  assert compilation.CompileEvents.outside_steps(me) - before_here == 1  # not the other thread's


def test_a_step_is_traced_with_its_mesh_on_the_compiling_thread():
  # The Pallas kernels shard by the mesh in context, which each compile thread must enter.
  meshes = []

  def step(x):
    meshes.append((threading.current_thread().name, jax.sharding.get_abstract_mesh().axis_names))
    return x + 1.0

  spec = jax.ShapeDtypeStruct((3,), jnp.float32)
  compilation.submit_compiles({("train", 0): (one_device_mesh(), jax.jit(step), spec)}, "parallel")
  [(thread, axis_names)] = meshes
  assert thread.startswith(compilation.COMPILE_THREAD_PREFIX) and axis_names == ("data",)


def test_an_unknown_compile_mode_is_refused_naming_the_modes():
  with pytest.raises(ValueError, match=r"compile mode 'eager' is not one of \('overlap'"):
    compilation.submit_compiles({}, "eager")


def test_parallel_compiles_are_done_when_submit_returns_and_the_pool_is_shut_down():
  mesh = one_device_mesh()
  jobs = {
    ("train", bucket): (mesh, Slow(0.2), jax.ShapeDtypeStruct((3,), "f4")) for bucket in range(2)
  }
  steps = compilation.submit_compiles(jobs, "parallel", threads=2)
  assert all(future.done() for future in steps._futures())
  with pytest.raises(RuntimeError, match="shutdown"):
    steps.pool.submit(print)


def test_a_failed_first_compile_still_lets_the_others_compile():
  # In overlap mode the others wait for the first: its error must release them, not hang them.
  mesh = one_device_mesh()
  jobs = {
    ("train", 0): (mesh, Broken(), jax.ShapeDtypeStruct((3,), "f4")),
    ("train", 1): (mesh, jax.jit(lambda x: x + 1.0), jax.ShapeDtypeStruct((5,), "f4")),
  }
  steps = compilation.submit_compiles(jobs, "overlap", threads=2)
  steps.train_steps.futures[1].result(timeout=60)  # a hung compile: TimeoutError, not a hang
  with pytest.raises(ValueError, match="does not compile"):
    steps.wait()
  steps.close()


def test_the_accounting_counts_only_the_cache_hits_and_misses_of_its_own_compiles():
  compilation.CompileEvents.install()
  with compilation.CompileEvents.step_compile():  # an earlier run's compiles, in this process
    for event in (compilation.CACHE_REQUEST_EVENT, compilation.CACHE_HIT_EVENT):
      jax.monitoring.record_event(event)
  before = compilation.CompileEvents.cache_counts()
  job = (one_device_mesh(), jax.jit(lambda x: x + 1.0), jax.ShapeDtypeStruct((7,), "f4"))
  accounting = compilation.submit_compiles({("train", 0): job}, "sequential").accounting()
  after = compilation.CompileEvents.cache_counts()
  assert [accounting["compilation_cache_hits"], accounting["compilation_cache_misses"]] == (
    np.subtract(after, before).tolist()
  )


def test_a_steps_memory_is_read_from_xla_s_analysis_when_the_backend_gives_one():
  # 100 bytes of arguments, 60 of outputs of which 50 written over donated arguments, 7 temporary.
  stats = types.SimpleNamespace(
    argument_size_in_bytes=100,
    output_size_in_bytes=60,
    alias_size_in_bytes=50,
    temp_size_in_bytes=7,
  )
  with_analysis = types.SimpleNamespace(memory_analysis=lambda: stats)
  without = types.SimpleNamespace(memory_analysis=lambda: None)
  assert compilation.StepMemory.of(with_analysis) == compilation.StepMemory(100, 60, 50, 7)
  assert compilation.StepMemory.of(without) is None
