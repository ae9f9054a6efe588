"""Compiling the steps ahead of time: one executable per bucket, on a thread pool, in the order
training needs them, with every compilation counted.

`submit_compiles` takes `(kind, bucket) -> (mesh, jitted, *abstract args)` jobs and returns
`CompiledSteps`, whose `train_steps[bucket]` and `eval_steps[bucket]` wait for that bucket's own
compile only. `CompileEvents` counts XLA compilations and persistent-cache hits apart for these
compiles, so that any other compilation while training can be caught as a recompile. What the jobs
compile (the train and eval steps, their shardings and batch shapes) is `train.py`'s business.
"""

import collections
import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import numpy as np

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"

COMPILE_MODES = ("overlap", "parallel", "sequential")
COMPILE_THREAD_PREFIX = "compile-step"


class CompileEvents:
  """Counts XLA compilations and persistent-cache hits and misses by what made them: the step
  compiles (`_lower_and_compile`, on the pool or inline), whose counts are the run's compile
  accounting; helpers the caller allows (`allowed`: checkpointing compiles small ones of its
  own); and anything else, which while training is a recompile (an error) when the training
  thread made it: another thread of the process (a notebook's, while a run trains in the
  background) may compile what it likes."""

  _lock = threading.Lock()
  _counts: ClassVar[collections.Counter] = collections.Counter()
  _registered = False
  _compiling = threading.local()  # .kind: "step", "allowed", or None (unset)

  @classmethod
  def install(cls) -> None:
    if not cls._registered:
      jax.monitoring.register_event_listener(cls._record)
      jax.monitoring.register_event_duration_secs_listener(cls._record)
      cls._registered = True

  @classmethod
  @contextlib.contextmanager
  def _marked(cls, kind: str):
    before = getattr(cls._compiling, "kind", None)
    cls._compiling.kind = kind
    try:
      yield
    finally:
      cls._compiling.kind = before

  @classmethod
  def step_compile(cls):
    """Marks this thread's compilations as a step's until the block ends."""
    return cls._marked("step")

  @classmethod
  def allowed(cls):
    """Marks this thread's compilations as allowed while training until the block ends."""
    return cls._marked("allowed")

  @classmethod
  def _record(cls, event: str, *args, **kwargs) -> None:
    del args, kwargs
    kind = getattr(cls._compiling, "kind", None)
    with cls._lock:  # of every thread (None), and of this one: each count is one lookup
      cls._counts[event, kind, None] += 1
      cls._counts[event, kind, threading.get_ident()] += 1

  @classmethod
  def count(cls, event: str, in_steps: bool, thread: int | None = None) -> int:
    """The `event`s of the step compiles (`in_steps`), or of everything unmarked; of every
    thread, or of the one whose `threading.get_ident()` is `thread`."""
    with cls._lock:
      return cls._counts[event, "step" if in_steps else None, thread]

  @classmethod
  def outside_steps(cls, thread: int | None = None) -> int:
    """Compilations neither a step's nor allowed, from the backend or the persistent cache; of
    every thread, or of `thread` alone."""
    compiled = (BACKEND_COMPILE_EVENT, CACHE_HIT_EVENT)
    return sum(cls.count(event, False, thread) for event in compiled)

  @classmethod
  def cache_counts(cls) -> tuple[int, int]:
    """(hits, misses) of the persistent compilation cache in the steps' compiles."""
    hits = cls.count(CACHE_HIT_EVENT, True)
    return hits, cls.count(CACHE_REQUEST_EVENT, True) - hits


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's buffer plan of a compiled step, in bytes per device: its arguments, its outputs, the
  part of the outputs written over donated arguments, and its temporaries."""

  arguments: int
  outputs: int
  aliased: int
  temporaries: int

  @property
  def total(self) -> int:
    """The planned footprint of one call (not counting generated code or other live buffers)."""
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @classmethod
  def of(cls, executable) -> "StepMemory | None":
    """None where the backend gives no memory analysis."""
    stats = executable.memory_analysis()
    if stats is None:
      return None
    return cls(
      stats.argument_size_in_bytes,
      stats.output_size_in_bytes,
      stats.alias_size_in_bytes,
      stats.temp_size_in_bytes,
    )


@dataclasses.dataclass
class CompiledSteps:
  """Every bucket's train and eval executable, each compiled once on a thread pool.

  `train_steps[bucket]` and `eval_steps[bucket]` wait for that bucket's own compile only, so
  training starts as soon as the first scheduled bucket is ready; a bucket still queued behind
  other compiles is compiled at once on the calling thread instead. Calling an executable with
  another bucket's shape is an error, not a compile.
  """

  train_steps: "Executables"
  eval_steps: "Executables"
  pool: concurrent.futures.ThreadPoolExecutor
  workers: int
  started: float
  cache_counts_before: tuple[int, int]
  first_train_step_at: float | None = None
  # Seconds the first train step waited for its compile (part of `time_to_first_step_s`), and
  # those later steps waited for theirs.
  first_step_wait_s: float = 0.0
  train_wait_s: float = 0.0

  def train_step(self, bucket: int):
    """The bucket's executable; the first call marks when training started."""
    waited_from = time.perf_counter()
    executable = self.train_steps[bucket]
    now = time.perf_counter()
    if self.first_train_step_at is None:
      self.first_train_step_at = now
      self.first_step_wait_s = now - waited_from
    else:
      self.train_wait_s += now - waited_from
    return executable

  def wait(self) -> None:
    """Returns when every step is compiled; re-raises a compile's error."""
    for future in self._futures():
      future.result()

  def cancel_queued(self) -> None:
    """Drops the compiles not yet started, at once; those running go on (`close` waits for them).
    A lookup of a dropped step compiles it on the spot, as for one still queued."""
    self.pool.shutdown(wait=False, cancel_futures=True)

  def close(self) -> None:
    """Stops the pool: the compiles not yet started are dropped, those running finish (after an
    error in training, or a stop that needs no more steps)."""
    self.pool.shutdown(wait=True, cancel_futures=True)

  def accounting(self) -> dict[str, float | int | None]:
    """Compile times and cache counts of the steps compiled, after `wait` (all of them) or
    `close` (those started before it; `compiles_dropped` counts the others)."""
    compiled = {
      kind: [future for future in steps.futures.values() if not future.cancelled()]
      for kind, steps in (("train", self.train_steps), ("eval", self.eval_steps))
    }
    spans = [future.result()[1:] for future in compiled["train"] + compiled["eval"]]
    hits, misses = np.subtract(CompileEvents.cache_counts(), self.cache_counts_before).tolist()
    first = self.first_train_step_at
    return {
      "compile_threads": self.workers,
      "train_compiles": len(compiled["train"]),
      "eval_compiles": len(compiled["eval"]),
      "compiles_dropped": len(self._futures()) - len(spans),
      "time_to_first_step_s": None if first is None else first - self.started,
      "compile_wall_s": max(end for _, end in spans) - min(start for start, _ in spans),
      "compile_seconds_sum": sum(end - start for start, end in spans),
      "compilation_cache_hits": hits,
      "compilation_cache_misses": misses,
    }

  def train_memory(self) -> dict[int, StepMemory | None]:
    """Each compiled bucket's train step's buffer plan (waits for its compile; None for one
    `close` dropped): for a train step, the arguments are the state and the batch, the outputs
    the new state (donated, so aliased), and the temporaries mostly what the backward pass keeps
    of the forward's activations."""
    futures = self.train_steps.futures
    return {
      bucket: None if futures[bucket].cancelled() else StepMemory.of(self.train_steps[bucket])
      for bucket in sorted(futures)
    }

  def _futures(self) -> list[concurrent.futures.Future]:
    return [*self.train_steps.futures.values(), *self.eval_steps.futures.values()]


@dataclasses.dataclass
class Executables(collections.abc.Mapping):
  """bucket -> executable, waiting for the bucket's compile when it is looked up.

  A compile that has not started yet (the pool's threads busy with others) is taken off the queue
  and run on the caller's thread, so a lookup waits for its own bucket's compile, never for the
  compiles queued ahead of it.
  """

  futures: dict[int, concurrent.futures.Future]
  compile_now: dict[int, Callable[[], tuple[Any, float, float]]]

  def __getitem__(self, bucket: int):
    if self.futures[bucket].cancel():
      done = concurrent.futures.Future()
      try:
        done.set_result(self.compile_now[bucket]())
      except Exception as error:  # kept for `wait`, as a pool thread's error would be
        done.set_exception(error)
      self.futures[bucket] = done
    return self.futures[bucket].result()[0]

  def __iter__(self):
    return iter(self.futures)

  def __len__(self) -> int:
    return len(self.futures)


def trace_step(mesh: jax.sharding.Mesh, jitted, *abstract_args) -> jax.stages.Traced:
  """`jitted` traced for `abstract_args` with `mesh` in context, so that the Pallas kernels in the
  model and the loss run per device on their batch shard (`models.batch_sharding`) instead of
  being replicated by XLA. The context is per thread, so each compiling thread enters it."""
  with jax.set_mesh(mesh):
    return jitted.trace(*abstract_args)


def _lower_and_compile(mesh, jitted, *abstract_args) -> tuple[Any, float, float]:
  """An executable with the perf_counter times its lowering started and its compile ended."""
  start = time.perf_counter()
  with CompileEvents.step_compile():
    executable = trace_step(mesh, jitted, *abstract_args).lower().compile()
  return executable, start, time.perf_counter()


def _compile_then_signal(compiled: threading.Event, job: tuple) -> tuple[Any, float, float]:
  try:
    return _lower_and_compile(*job)
  finally:
    compiled.set()


def _after(first_compiled: threading.Event, job: tuple) -> tuple[Any, float, float]:
  first_compiled.wait()
  return _lower_and_compile(*job)


def submit_compiles(
  jobs: dict[tuple[str, int], tuple], mode: str, threads: int = 0
) -> CompiledSteps:
  """Submits `jobs` ((kind, bucket) -> (mesh, jitted, *abstract args)) in order to a thread pool
  of `threads` (0: one per core; never more than the jobs).

  "overlap" returns at once, the first job compiling alone and the others after it; "parallel"
  (the pool) and "sequential" (one thread) return when every job is compiled, with the pool shut
  down.
  """
  if mode not in COMPILE_MODES:
    raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
  CompileEvents.install()
  if threads < 0:
    raise ValueError(f"compile threads must be >= 0 (0: one per core), got {threads}")
  workers = 1 if mode == "sequential" else max(1, min(len(jobs), threads or os.cpu_count() or 1))
  pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=COMPILE_THREAD_PREFIX)
  cache_counts_before = CompileEvents.cache_counts()
  started = time.perf_counter()
  # What compiles a job at once on any thread; in overlap mode the first job (the step training
  # waits for) compiles alone, the others wait for it, whichever thread ends up compiling it.
  compile_now = {key: functools.partial(_lower_and_compile, *job) for key, job in jobs.items()}
  futures = {}
  first_compiled = threading.Event()
  for key, job in jobs.items():
    if mode != "overlap":
      futures[key] = pool.submit(compile_now[key])
    elif not futures:
      compile_now[key] = functools.partial(_compile_then_signal, first_compiled, job)
      futures[key] = pool.submit(compile_now[key])
    else:
      futures[key] = pool.submit(_after, first_compiled, job)
  compiled = CompiledSteps(
    train_steps=_executables(futures, compile_now, "train"),
    eval_steps=_executables(futures, compile_now, "eval"),
    pool=pool,
    workers=workers,
    started=started,
    cache_counts_before=cache_counts_before,
  )
  if mode != "overlap":
    compiled.wait()
    compiled.close()
  return compiled


def _executables(futures: dict, compile_now: dict, kind: str) -> Executables:
  """The `kind` ("train" or "eval") part of (kind, bucket)-keyed futures and compile calls."""
  buckets = [bucket for job_kind, bucket in futures if job_kind == kind]
  return Executables(
    {bucket: futures[kind, bucket] for bucket in buckets},
    {bucket: compile_now[kind, bucket] for bucket in buckets},
  )
