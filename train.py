"""Bucketed, data-parallel LSTM-CTC training.

    python train.py --config=experiments/synthetic.py --workdir=/tmp/run
    python train.py --config=experiments/iam.py --workdir=/tmp/iam --config.bucketing.num_buckets=4
    python train.py --config=experiments/iam.py --workdir=/tmp/iam --mode=evaluate --split=test

The training set's feature lengths are cut into length buckets (`bucketing.make_plan`); every bucket
has one static batch shape, so the train step and the eval step are compiled ahead of time once per
bucket and nothing compiles while training (a recompile is an error). The buckets compile
concurrently on a thread pool, and training starts as soon as the first scheduled bucket is ready.
Batches are sharded over a 1-D mesh of all devices with parameters replicated: `jit` with
`NamedSharding` gives the semantics of pmap + pmean (one global mean loss over the real examples of
the global batch, gradients all-reduced by XLA), and the same code runs on 1 CPU, simulated CPU
devices, GPUs, or several hosts, each process feeding its own slice of the global schedule. The
steps are traced with the mesh in context (`training.compilation.trace_step`): XLA cannot
partition a Pallas kernel, so the kernels split the batch over it themselves
(`models.batch_sharding`).

Importable: `train_and_evaluate(config, workdir)`, `create_train_state`, `train_step`, `eval_step`,
`evaluate_checkpoint` and `transcribe`. The machinery the loop stands on, which takes any state
and any bucket plan and reads no config, is in `training/`: the compile pool
(`training.compilation`), checkpoints (`training.checkpoints`) and stop requests
(`training.stop`).
"""

import collections
import collections.abc
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from flax.training import train_state as train_state_lib
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bucketing
import cli_errors
from handwriting import alphabet as alphabet_lib
from handwriting import dataset as dataset_lib
from handwriting import features as features_lib
from models import ctc, metrics
from models.factory import make_model
from training import compilation
from training.checkpoints import (
  CheckpointMismatchError,
  Checkpoints,
  Progress,
  abstract_on,
  not_orbax_read_noise,
  unless_orbax_read_noise,
)
from training.stop import StopRequest

Batch = dict[str, jax.Array]
LOG = logging.getLogger("train")
# A run of several processes logs once, from process 0: the others' records are dropped here.
LOG.addFilter(lambda record: jax.process_index() == 0)
ALPHABET = alphabet_lib.Alphabet()
SELECTION_METRICS = ("val_loss", "val_cer")  # what picks the best epoch and drives patience
LEARNING_RATE_SCHEDULES = ("cosine", "constant")  # after the warm-up (`learning_rate_schedule`)
# What a run writes in its workdir, beside checkpoints/, tensorboard/ and train.lock.
CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
COST_FILE = "cost_model.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class LossNotFinite(FloatingPointError, ValueError):
  """The training loss became NaN or inf: the model diverged, mostly from its config (the learning
  rate), so the command line ends it in one line as a bad value (`cli_errors`)."""


class TrainState(train_state_lib.TrainState):
  """Parameters, optimiser state and step, plus the key dropout is folded from each step and the
  configured CTC loss (`models.ctc.make_ctc_loss`; static, like `apply_fn`)."""

  dropout_key: jax.Array
  ctc_loss_fn: Any = struct.field(pytree_node=False, default=ctc.ctc_loss)


# ---------------------------------------------------------------------------------------------
# Configuration checks, data and plans.


def check_is_config(config: Any) -> None:
  """The public entry points' first check: a dict instead would fail on its first field read."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(
      f"the config must be an ml_collections.ConfigDict (an experiments/*.py get_config()), "
      f"not a {type(config).__name__}"
    )


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails before any data is read or anything compiled, naming the field that is wrong."""
  choices = {
    "bucketing.strategy": bucketing.STRATEGIES,
    "bucketing.overflow": bucketing.OVERFLOW_POLICIES,
    "compile_mode": compilation.COMPILE_MODES,
    "data.train_split": dataset_lib.SPLITS,
    "data.eval_split": dataset_lib.SPLITS,
    "data.test_split": (None, "", *dataset_lib.SPLITS),  # None or "": none
    "data.bad_examples": dataset_lib.BAD_EXAMPLE_POLICIES,
    "selection_metric": SELECTION_METRICS,
    "optimizer.schedule": LEARNING_RATE_SCHEDULES,
  }
  for field, allowed in choices.items():
    value = functools.reduce(getattr, field.split("."), config)
    if value not in allowed:
      raise ValueError(f"config.{field}={value!r} is not one of {allowed}")
  bucket_config = config.bucketing
  bucketing.check_upper_bounds(
    bucket_config.strategy,
    bucket_config.upper_bounds,
    ("config.bucketing.strategy", "config.bucketing.upper_bounds"),
  )
  for field in ("seed", "data.synthetic.seed"):  # seeds as JAX and numpy take them: 32 bits
    value = functools.reduce(getattr, field.split("."), config)
    if not isinstance(value, int) or not 0 <= value < 2**32:
      raise ValueError(f"config.{field} must be an integer in [0, 2**32), got {value!r}")
  # Counts where 0 means "none" or "all" (see experiments/common.py), and those that must be 1+.
  for field, least in (
    ("bucketing.batch_size", 0),
    ("bucketing.max_tokens", 0),
    ("data.train_limit", 0),
    ("data.eval_limit", 0),
    ("max_steps", 0),
    ("bucketing.num_buckets", 1),
    ("num_epochs", 1),
    ("patience", 1),
    ("checkpoint_every_steps", 1),
    ("bucketing.round_to", 1),
  ):
    value = functools.reduce(getattr, field.split("."), config)
    if value < least:
      raise ValueError(f"config.{field} must be >= {least}, got {value}")
  if bucket_config.round_to > bucketing.boundaries.MAX_LENGTH:  # a bound must be a length too
    raise ValueError(
      f"config.bucketing.round_to must be <= {bucketing.boundaries.MAX_LENGTH}, got "
      f"{bucket_config.round_to}"
    )
  if bool(bucket_config.batch_size) == bool(bucket_config.max_tokens):
    raise ValueError("set exactly one of config.bucketing.batch_size and .max_tokens (other 0)")
  if bucket_config.batch_size and bucket_config.batch_size % num_devices:
    raise ValueError(
      f"config.bucketing.batch_size={bucket_config.batch_size} is not a multiple of the "
      f"{num_devices} devices; use a multiple of {num_devices}"
    )
  if config.eval_batch_size < 1 or config.eval_batch_size % num_devices:
    raise ValueError(
      f"config.eval_batch_size={config.eval_batch_size} is not a positive multiple of the "
      f"{num_devices} devices"
    )
  try:  # the figures the config gives: a negative or NaN one would plan nonsense
    cost_model(config)
  except ValueError as error:
    raise ValueError(f"config.bucketing: {error}") from None
  if config.compile_threads < 0:
    raise ValueError(
      f"config.compile_threads must be >= 0 (0: one per core), got {config.compile_threads}"
    )
  if not config.max_minutes >= 0:  # NaN too
    raise ValueError(f"config.max_minutes must be >= 0 (0: no cap), got {config.max_minutes}")
  # Finite and not negative: a negative rate or clipping norm would ascend the loss, NaN poison
  # it. A rate of 0 trains nothing, which tests and measurements use; a norm of 0 zeroes updates.
  rate, norm = config.optimizer.learning_rate, config.optimizer.grad_clip_norm
  if not 0 <= rate < math.inf:
    raise ValueError(f"config.optimizer.learning_rate must be finite and >= 0, got {rate}")
  if not 0 < norm < math.inf:
    raise ValueError(f"config.optimizer.grad_clip_norm must be finite and > 0, got {norm}")
  if config.optimizer.warmup_steps < 0:
    raise ValueError(
      f"config.optimizer.warmup_steps must be >= 0, got {config.optimizer.warmup_steps}"
    )
  # The model's and the CTC loss's own checks (sizes, implementations), before any data is read.
  for field, build in (
    ("data.features", feature_config),
    ("model", build_model),
    ("ctc", build_ctc_loss),
  ):
    try:
      build(config)
    except (ValueError, TypeError) as error:  # TypeError: e.g. a dtype numpy does not know
      raise ValueError(f"config.{field}: {error}") from None


def feature_config(config: ml_collections.ConfigDict) -> features_lib.FeatureConfig:
  return features_lib.FeatureConfig(**config.data.features.to_dict())


def load_split(
  config: ml_collections.ConfigDict, split: str, limit: int
) -> dataset_lib.SequenceSet:
  """One split as features and label ids (the model's view of the data), every line checked: a
  bad one is an error naming it, or left out under `config.data.bad_examples="skip"`."""
  return _load_checked(config, split, limit)[0]


def _load_checked(
  config: ml_collections.ConfigDict, split: str, limit: int, source: str = ""
) -> tuple[dataset_lib.SequenceSet, list[dict]]:
  """`load_split`, and the lines it skipped ({"id", "split", "reason"}); `source` is named in the
  error on a bad line."""
  synthetic_sizes = config.data.synthetic.to_dict() if config.data.dataset == "synthetic" else {}
  examples = dataset_lib.load_examples(
    config.data.dataset,
    split,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    limit=limit or None,
    **synthetic_sizes,
  )
  policy = config.data.bad_examples
  kept, skipped = dataset_lib.validate_examples(examples, split, ALPHABET, policy, source)
  sequences = dataset_lib.featurize(kept, feature_config(config), ALPHABET)
  sequences, unalignable = dataset_lib.validate_alignable(sequences, split, policy, source)
  return sequences, skipped + unalignable


def make_train_plan(
  config: ml_collections.ConfigDict,
  train: dataset_lib.SequenceSet,
  num_devices: int,
  measured_cost: bucketing.CostModel | None = None,
) -> bucketing.BucketPlan:
  bucket_config = config.bucketing
  return bucketing.make_plan(
    train.lengths,
    strategy=bucket_config.strategy,
    num_buckets=bucket_config.num_buckets,
    upper_bounds=bucket_config.upper_bounds,
    batch_size=bucket_config.batch_size or None,
    max_tokens=bucket_config.max_tokens or None,
    num_devices=num_devices,
    round_to=bucket_config.round_to,
    overflow=bucket_config.overflow,
    label_lengths=train.label_lengths,
    example_ids=train.ids,
    cost_model=cost_model(config, measured_cost),
    num_epochs=config.num_epochs,
  )


COST_FIELDS = ("alpha", "gamma", "beta", "kappa")


def cost_model(
  config: ml_collections.ConfigDict, measured: bucketing.CostModel | None = None
) -> bucketing.CostModel:
  """The step-time and compile cost model `auto` plans with and the plan's report predicts by:
  the config's figures, those it leaves unset (None) from `measured` (else the placeholders)."""
  fallback = measured or bucketing.CostModel()
  return bucketing.CostModel(
    **{
      field: getattr(fallback, field)
      if config.bucketing[field] is None
      else config.bucketing[field]
      for field in COST_FIELDS
    }
  )


def gives_cost_model(config: ml_collections.ConfigDict) -> bool:
  """The config sets every figure of the cost model (none is None)."""
  return all(config.bucketing[field] is not None for field in COST_FIELDS)


def measures_cost_model(config: ml_collections.ConfigDict) -> bool:
  """`auto` measures its cost model unless the config gives all of it."""
  return config.bucketing.strategy == "auto" and not gives_cost_model(config)


@contextlib.contextmanager
def _persistent_cache_off():
  """Compiles in the block really compile: a persistent-cache hit would time a file read."""
  enabled = jax.config.jax_enable_compilation_cache
  if enabled:
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
  try:
    yield
  finally:
    if enabled:
      jax.config.update("jax_enable_compilation_cache", True)
      compilation_cache.reset_cache()


@dataclasses.dataclass(frozen=True)
class MeasuredCost:
  """`auto`'s cost model as `measure_cost_model` fitted it, and what it was fitted to: `report`
  holds the timed steps, `measure_s` and `fitted_to` (`_cost_fingerprint`); `reused` when read
  back from the workdir instead of measured by this start."""

  model: bucketing.CostModel
  report: dict
  reused: bool = False


def measure_cost_model(
  config: ml_collections.ConfigDict,
  train: dataset_lib.SequenceSet,
  mesh: jax.sharding.Mesh,
  repeats: int = 3,
) -> MeasuredCost:
  """`auto`'s cost model for this model on these devices.

  Train steps are compiled (past the persistent cache) and timed, median of `repeats` after a
  warm-up, at the corpus's longest and median padded lengths with the batch rule's batch for
  each. A fixed batch size leaves beta inseparable from gamma and needs no more (the steps of
  every bucket have that batch); a token budget adds a third step at half the batch, within the
  budget, when one of at least a row per device exists. `bucketing.fit_step_model` fits alpha,
  gamma and beta; kappa is the steps' median compile time, one train step compiled alone: a
  bucket's eval step adds to what a bucket costs, and compiling beside other compiles or
  overlapped with training takes from it. Every process measures (the steps are collective) and
  process 0's timings are used by all. Needs two distinct padded lengths.
  """
  started = time.perf_counter()
  devices = jax.device_count()
  padded = _padded_lengths(config, train)
  if len(padded) < 2:
    raise ValueError(f"measuring a cost model needs two padded lengths, got {padded.tolist()}")
  longest = int(padded[-1])
  median = median_padded_length(config, train.lengths)
  median = median if median < longest else int(padded[-2])

  def batch_for(length: int) -> int:
    return int(
      bucketing.batch_sizes(
        np.array([length]),
        np.array([np.iinfo(np.int32).max]),
        batch_size=config.bucketing.batch_size or None,
        max_tokens=config.bucketing.max_tokens or None,
        num_devices=devices,
      )[0]
    )

  shapes = [(batch_for(longest), longest), (batch_for(median), median)]
  if config.bucketing.max_tokens:
    halves = [(rows // 2 // devices * devices, n) for rows, n in shapes if rows >= 2 * devices]
    shapes += halves[-1:]
  num_features = feature_config(config).num_features
  state = replicated_state(config, mesh, total_steps=1)
  rng = np.random.default_rng(config.seed)
  steps = []
  with _persistent_cache_off():
    for rows, length in shapes:
      width = widest_label_within(train, length)
      state, seconds, compile_s = time_train_step(
        state, mesh, num_features, rows, length, width, repeats, rng
      )
      steps.append([rows, length, seconds, compile_s])
  measured = np.array(from_process_0(steps), np.float64)
  rows, lengths, seconds, compiles = measured.T
  alpha, gamma, beta = bucketing.fit_step_model(rows, lengths, seconds)
  model = bucketing.CostModel(alpha=alpha, beta=beta, gamma=gamma, kappa=float(np.median(compiles)))
  fitted = model.step_seconds(rows, lengths)
  report = {
    "steps": [
      {"batch": int(b), "length": int(n), "seconds": t, "fitted_seconds": float(f), "compile_s": c}
      for (b, n, t, c), f in zip(measured.tolist(), fitted, strict=True)
    ],
    "measure_s": time.perf_counter() - started,
    "fitted_to": _cost_fingerprint(config),
  }
  return MeasuredCost(model, report)


def widest_label_within(lines: dataset_lib.SequenceSet, length: int) -> int:
  """The longest label among the lines of at most `length` frames (1 if none): the label width
  a step of that length compiles for."""
  return int(lines.label_lengths[lines.lengths <= length].max(initial=1))


def median_padded_length(config: ml_collections.ConfigDict, lengths: np.ndarray) -> int:
  """The median line's length rounded up as the plans round bounds (`bucketing.round_to`)."""
  return int(bucketing.boundaries.round_up(np.median(lengths), config.bucketing.round_to))


def _padded_lengths(
  config: ml_collections.ConfigDict, train: dataset_lib.SequenceSet
) -> np.ndarray:
  """The distinct lengths the training lines round up to: the bounds any plan can choose from."""
  return np.unique(bucketing.boundaries.round_up(train.lengths, config.bucketing.round_to))


def single_shape_plan(
  rows: int, length: int, label_width: int, num_devices: int
) -> bucketing.BucketPlan:
  """One bucket of `rows` lines, `length` frames and labels `label_width` long: what compiles a
  step of one shape (`compile_steps`)."""
  return bucketing.make_plan(
    np.full(rows, length),
    strategy="fixed",
    upper_bounds=[length],
    batch_size=rows,
    num_devices=num_devices,
    label_lengths=np.full(rows, label_width),
  )


def time_train_step(
  state: TrainState,
  mesh: jax.sharding.Mesh,
  num_features: int,
  rows: int,
  length: int,
  label_width: int,
  repeats: int,
  rng: np.random.Generator,
) -> tuple[TrainState, float, float]:
  """Compiles the train step for a `[rows, length]` batch of random features with labels
  `label_width` long, and runs it `repeats` times after a warm-up: the state after, the median
  seconds of a step, and the seconds its compile took."""
  lines = dataset_lib.SequenceSet(
    ids=[str(i) for i in range(rows)],
    texts=[""] * rows,
    features=[rng.normal(size=(length, num_features)).astype(np.float32) for _ in range(rows)],
    labels=[rng.integers(1, ALPHABET.size, label_width).astype(np.int32) for _ in range(rows)],
    lengths=np.full(rows, length, np.int32),
    label_lengths=np.full(rows, label_width, np.int32),
  )
  plan = single_shape_plan(rows, length, label_width, jax.device_count())
  compiled = compile_steps(state, plan, {}, mesh, num_features, mode="sequential")
  try:
    indices = bucketing.process_slice(np.arange(rows), jax.process_index(), jax.process_count())
    batch = make_batch(lines, plan, 0, indices, NamedSharding(mesh, P("data")))
    times = []
    for _ in range(repeats + 1):
      start = time.perf_counter()
      state, _ = compiled.train_steps[0](state, batch)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    return state, float(np.median(times[1:])), compiled.accounting()["compile_seconds_sum"]
  finally:
    compiled.close()


def _shape_config(config: ml_collections.ConfigDict) -> dict:
  """The config fields that decide the state's shapes, as {"model.hidden_size": 128, ...}."""
  fields = {"model": config.model.to_dict(), "data.features": config.data.features.to_dict()}
  return {
    f"{prefix}.{name}": value
    for prefix, values in fields.items()
    for name, value in values.items()
    if not isinstance(value, dict)
  }


def _cost_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What a measured cost model holds for, as JSON: the model's and the CTC loss's settings, the
  batch rule, the devices."""
  return _json_safe(
    {
      "config": _shape_config(config),  # the model's fields (implementation and dtype too)
      "ctc": config.ctc.to_dict(),
      "batch_size": config.bucketing.batch_size,
      "max_tokens": config.bucketing.max_tokens,
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
    }
  )


def describe_cost_model(measured: MeasuredCost) -> str:
  """One line: the figures, the steps they were fitted to, and whether this start measured them."""
  model, report = measured.model, measured.report
  steps = ", ".join(
    f"[{step['batch']} x {step['length']}] {1000 * step['seconds']:.1f} ms "
    f"(fit {1000 * step['fitted_seconds']:.1f})"
    for step in report["steps"]
  )
  fitted_to = report["fitted_to"]
  how = "read back from the workdir" if measured.reused else "measured"
  return (
    f"auto's cost model, {how} ({report['measure_s']:.1f} s on {fitted_to['num_devices']} "
    f"{fitted_to['device_kind']} device(s)): alpha {1000 * model.alpha:.3g} ms per step, gamma "
    f"{1e6 * model.gamma:.3g} us per padded timestep, beta {1e9 * model.beta:.3g} ns per padded "
    f"token, kappa {model.kappa:.3g} s per compiled bucket; steps {steps}"
  )


def make_eval_plans(
  train_upper_bounds: np.ndarray,
  splits: dict[str, dataset_lib.SequenceSet],
  batch_size: int,
  round_to: int,
  num_devices: int,
) -> dict[str, bucketing.BucketPlan]:
  """Plans for evaluation splits that share one set of static shapes (one compile per bucket).

  The buckets are the training buckets, plus one more if an evaluation sequence is longer than
  all of them (evaluation never truncates); label widths and batch sizes are taken over all
  evaluation splits together.
  """
  lengths = np.concatenate([s.lengths for s in splits.values()])
  label_lengths = np.concatenate([s.label_lengths for s in splits.values()])
  bounds = [int(bound) for bound in train_upper_bounds]
  longest = int(bucketing.boundaries.round_up(lengths.max(), round_to))
  if longest > bounds[-1]:
    bounds.append(longest)
  joint = bucketing.make_plan(
    lengths,
    strategy="fixed",
    upper_bounds=bounds,
    batch_size=batch_size,
    num_devices=num_devices,
    label_lengths=label_lengths,
  )
  return {name: joint.for_sequences(split.lengths, split.ids) for name, split in splits.items()}


def make_batch(
  split: dataset_lib.SequenceSet,
  plan: bucketing.BucketPlan,
  bucket: int,
  indices: np.ndarray,
  sharding: NamedSharding,
) -> Batch:
  """Assembles this process's rows of a global batch and places them on the mesh."""
  local = bucketing.assemble_batch(
    split.features,
    split.labels,
    indices,
    int(plan.upper_bounds[bucket]),
    int(plan.label_upper_bounds[bucket]),
    truncate=plan.truncated.size > 0,
  )
  global_rows = int(plan.batch_sizes[bucket])
  return {
    key: jax.make_array_from_process_local_data(sharding, value, (global_rows, *value.shape[1:]))
    for key, value in local.items()
  }


def batch_spec(plan: bucketing.BucketPlan, bucket: int, num_features: int, sharding) -> Batch:
  """Shapes and dtypes of a bucket's global batch, for ahead-of-time compilation."""
  batch_size, length = int(plan.batch_sizes[bucket]), int(plan.upper_bounds[bucket])
  width = int(plan.label_upper_bounds[bucket])
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {
    "inputs": spec((batch_size, length, num_features), jnp.float32),
    "input_paddings": spec((batch_size, length), jnp.float32),
    "labels": spec((batch_size, width), jnp.int32),
    "label_paddings": spec((batch_size, width), jnp.float32),
    "weights": spec((batch_size,), jnp.float32),
  }


# ---------------------------------------------------------------------------------------------
# Model, state and the step functions.


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """A linear warm-up over `warmup_steps` from rate / warmup_steps (> 0: the first step already
  learns) to the rate, then a cosine decay to 0 at `total_steps`, or the rate held constant."""
  opt = config.optimizer
  first = opt.learning_rate / max(opt.warmup_steps, 1)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      first, opt.learning_rate, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1)
    )
  return optax.join_schedules(
    [
      optax.linear_schedule(first, opt.learning_rate, opt.warmup_steps),
      optax.constant_schedule(opt.learning_rate),
    ],
    [opt.warmup_steps],
  )


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """Adam on the `learning_rate_schedule`, the gradient clipped to `grad_clip_norm` first."""
  return optax.chain(
    optax.clip_by_global_norm(config.optimizer.grad_clip_norm),
    optax.adam(learning_rate_schedule(config, total_steps)),
  )


def build_model(config: ml_collections.ConfigDict):
  """The configured LSTM-CTC model over the alphabet plus the CTC blank."""
  return make_model(num_classes=ALPHABET.size, **config.model.to_dict())


def build_ctc_loss(config: ml_collections.ConfigDict):
  """The configured CTC loss (`optax.ctc_loss` or the Pallas kernel)."""
  return ctc.make_ctc_loss(**config.ctc.to_dict())


def make_data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named "data" over `devices` (default: all), with auto-sharded axes."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(AxisType.Auto,))


def create_train_state(
  config: ml_collections.ConfigDict, num_features: int, total_steps: int
) -> TrainState:
  """Fresh parameters and optimiser state from `config.seed`."""
  model = build_model(config)
  # Raw uint32 keys: they checkpoint as plain arrays.
  params_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
  inputs = jnp.zeros((1, 8, num_features), jnp.float32)
  params = jax.jit(functools.partial(model.init, train=False))(
    params_key, inputs, jnp.zeros((1, 8), jnp.float32)
  )["params"]
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=make_optimizer(config, total_steps),
    dropout_key=dropout_key,
    ctc_loss_fn=build_ctc_loss(config),
  )


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on the mean CTC loss of the real sequences in the global batch."""
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    logits = state.apply_fn(
      {"params": params},
      batch["inputs"],
      batch["input_paddings"],
      train=True,
      rngs={"dropout": dropout_key},
    )
    return state.ctc_loss_fn(  # the mean loss, and each line's for the metrics
      logits, batch["input_paddings"], batch["labels"], batch["label_paddings"], batch["weights"]
    )

  (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics_out = {
    "loss": loss,
    "loss_sum": jnp.sum(per_example * batch["weights"]),
    "weight": jnp.sum(batch["weights"]),
    "grad_norm": optax.tree.norm(grads),
  }
  return state.apply_gradients(grads=grads), metrics_out


def eval_step(apply_fn, ctc_loss_fn, params: Any, batch: Batch) -> dict[str, jax.Array]:
  """Summed CTC loss and greedy transcriptions of a batch (no dropout)."""
  logits = apply_fn({"params": params}, batch["inputs"], batch["input_paddings"], train=False)
  _, per_example = ctc_loss_fn(
    logits, batch["input_paddings"], batch["labels"], batch["label_paddings"], batch["weights"]
  )
  decoded, decoded_lengths = ctc.greedy_decode(logits, batch["input_paddings"])
  return {
    "loss_sum": jnp.sum(per_example * batch["weights"]),
    "weight": jnp.sum(batch["weights"]),
    "decoded": decoded,
    "decoded_lengths": decoded_lengths,
  }


# ---------------------------------------------------------------------------------------------
# Compiling the steps: one train and one eval executable per bucket (`training.compilation`).


def compile_steps(
  state: TrainState,
  train_plan: bucketing.BucketPlan,
  eval_plans: dict[str, bucketing.BucketPlan],
  mesh: jax.sharding.Mesh,
  num_features: int,
  *,
  train_order: list[int] | None = None,
  mode: str = "parallel",
  threads: int = 0,
) -> compilation.CompiledSteps:
  """Starts compiling one train step per training bucket that holds lines (fixed bounds can leave
  one empty), then one eval step per bucket any eval split uses (the eval plans share their
  shapes, `make_eval_plans`).

  Train steps compile in `train_order` (default: bucket order), then the rest. `mode`:
  "overlap" returns at once and compiles in the background on `threads` threads (0: one per CPU
  core): the first step alone (only it delays training, and compiles beside it would slow it
  down), then the rest; "parallel" compiles the same way but returns when all are done;
  "sequential" compiles one at a time and returns when all are done.
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  train_jit = jax.jit(
    train_step,
    in_shardings=(replicated, batch_sharding),
    out_shardings=replicated,
    donate_argnums=0,
  )
  abstract_state = abstract_on(state)
  jobs = {
    ("train", bucket): (
      mesh,
      train_jit,
      abstract_state,
      batch_spec(train_plan, bucket, num_features, batch_sharding),
    )
    for bucket in dict.fromkeys([*(train_order or []), *range(train_plan.num_buckets)])
    if train_plan.bucket_sizes[bucket] > 0
  }
  jobs |= _eval_jobs(
    state.apply_fn, state.ctc_loss_fn, state.params, eval_plans, mesh, num_features
  )
  return compilation.submit_compiles(jobs, mode, threads)


def compile_eval_steps(
  apply_fn,
  ctc_loss_fn,
  params: Any,
  eval_plans: dict[str, bucketing.BucketPlan],
  mesh: jax.sharding.Mesh,
  num_features: int,
) -> compilation.Executables:
  """One eval executable per bucket that any of the (shape-sharing) eval plans uses."""
  jobs = _eval_jobs(apply_fn, ctc_loss_fn, params, eval_plans, mesh, num_features)
  return compilation.submit_compiles(jobs, "parallel").eval_steps


def _eval_jobs(
  apply_fn, ctc_loss_fn, params, eval_plans, mesh, num_features
) -> dict[tuple[str, int], tuple]:
  if not eval_plans:
    return {}
  batch_sharding = NamedSharding(mesh, P("data"))
  eval_jit = jax.jit(
    functools.partial(eval_step, apply_fn, ctc_loss_fn),
    in_shardings=(NamedSharding(mesh, P()), batch_sharding),
    out_shardings=NamedSharding(mesh, P()),
  )
  used = set()
  for eval_plan in eval_plans.values():
    used.update(np.flatnonzero(eval_plan.bucket_sizes > 0).tolist())
  shapes = next(iter(eval_plans.values()))
  abstract_params = abstract_on(params)
  return {
    ("eval", bucket): (
      mesh,
      eval_jit,
      abstract_params,
      batch_spec(shapes, bucket, num_features, batch_sharding),
    )
    for bucket in sorted(used)
  }


def first_needed_buckets(plan: bucketing.BucketPlan, seed: int, epoch: int, step: int) -> list[int]:
  """The buckets in the order the epoch's schedule first uses them from `step` on."""
  schedule = bucketing.epoch_batches(plan, seed, epoch)[step:]
  return list(dict.fromkeys(int(bucket) for bucket, _ in schedule))


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(
  params: Any,
  split: dataset_lib.SequenceSet,
  plan: bucketing.BucketPlan,
  eval_steps: collections.abc.Mapping[int, Any],
  mesh: jax.sharding.Mesh,
) -> dict[str, float]:
  """Mean CTC loss, CER and WER of a split (every process returns the same numbers); a batch's
  outputs are read and decoded once the next batch is dispatched (`ReadOneLate`)."""
  batch_sharding = NamedSharding(mesh, P("data"))
  loss_sum = weight = 0.0
  references, hypotheses = [], []

  def read(indices: np.ndarray, outputs: dict[str, jax.Array]) -> None:
    nonlocal loss_sum, weight
    outputs = jax.device_get(outputs)
    loss_sum += float(outputs["loss_sum"])
    weight += float(outputs["weight"])
    for position, index in enumerate(indices):
      if index == bucketing.FILLER:
        continue
      ids = outputs["decoded"][position, : outputs["decoded_lengths"][position]]
      references.append(split.texts[index])
      hypotheses.append(ALPHABET.decode(ids))

  late = ReadOneLate(read)
  for bucket, indices in bucketing.epoch_batches(plan, seed=0, epoch=0):
    local = bucketing.process_slice(indices, jax.process_index(), jax.process_count())
    batch = make_batch(split, plan, bucket, local, batch_sharding)
    late.push(indices, eval_steps[bucket](params, batch))
  late.flush()
  return {
    "loss": loss_sum / weight,
    "cer": metrics.cer(references, hypotheses),
    "wer": metrics.wer(references, hypotheses),
    "examples": int(weight),
  }


# ---------------------------------------------------------------------------------------------
# Logs and the loop.


def _json_safe(value: Any) -> Any:
  """`value` with NaN and inf floats as None, so it is strict JSON (`allow_nan=False`)."""
  if isinstance(value, dict):
    return {key: _json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(item) for item in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def metrics_line(row: dict) -> str:
  """An epoch's row as a line of `metrics.jsonl`."""
  return json.dumps(_json_safe(row), allow_nan=False) + "\n"


class MetricsWriter:
  """metrics.jsonl and TensorBoard in the workdir, written by process 0 only."""

  def __init__(self, workdir: pathlib.Path, history: list):
    self.enabled = jax.process_index() == 0
    self.path = workdir / METRICS_FILE
    self.writer = None
    if self.enabled:
      # Both rewritten from the checkpoint's history, so a resumed run never repeats or loses an
      # epoch's row, and TensorBoard reads one event stream (two would plot replayed epochs twice).
      self.path.write_text("")
      for events in (workdir / "tensorboard").glob("events.out.tfevents.*"):
        events.unlink()
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(str(workdir / "tensorboard"))
      for row in history:
        self.write(row)

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as file:
      file.write(metrics_line(row))
    for key, value in row.items():
      if isinstance(value, (int, float)) and key != "epoch":
        self.writer.add_scalar(key, value, row["epoch"])
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def default_compilation_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else a per-user folder ($XDG_CACHE_HOME or ~/.cache)."""
  cache_home = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_home / "bucketed-rnn" / "jax")


def setup_runtime(config: ml_collections.ConfigDict) -> None:
  """Multi-host initialisation, and the persistent compilation cache: on by default so that a run
  started again loads its steps instead of compiling them; `compilation_cache_dir=""` turns it
  off."""
  if config.distributed.initialize:
    jax.distributed.initialize(
      coordinator_address=config.distributed.coordinator_address,
      num_processes=config.distributed.num_processes,
      process_id=config.distributed.process_id,
    )
  path = config.compilation_cache_dir
  if path:  # one the user chose: JAX would only warn and compile everything
    path = os.path.expanduser(path)
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as error:
      raise ValueError(
        f"config.compilation_cache_dir={path!r}: cannot make it ({error.strerror or error}); "
        "'' turns the cache off"
      ) from None
  path = default_compilation_cache_dir() if path is None else path
  wanted = (bool(path), path or jax.config.jax_compilation_cache_dir)
  if wanted != (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir):
    jax.config.update("jax_enable_compilation_cache", bool(path))
    if path:
      compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # the cache reads its settings once; make it read them again
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def progress_bar(total: int, initial: int, description: str, enabled: bool):
  """A tqdm bar on a terminal or in a notebook; none when off, or when stderr goes to a file or a
  pipe (a log full of redraws)."""
  if not (enabled and cli_errors.shows_progress_bars()):
    return contextlib.nullcontext()
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, desc=description, unit="step", leave=False)


@dataclasses.dataclass
class Run:
  """What every part of the loop reads: the config, the data and their plans, the mesh, the
  compiled steps, and where checkpoints and metrics go."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_set: dataset_lib.SequenceSet
  eval_sets: dict[str, dataset_lib.SequenceSet]
  plan: bucketing.BucketPlan
  eval_plans: dict[str, bucketing.BucketPlan]
  steps: compilation.CompiledSteps
  checkpoints: Checkpoints
  metrics_writer: MetricsWriter
  stop: StopRequest
  training_thread: int | None = None  # `threading.get_ident()` of the thread that trains
  compiles_expected: int = 0

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def start_watching_compiles(self) -> None:
    """From here on the steps, batches and evaluation, which run on this thread, must compile
    nothing (checkpointing may, inside `save_latest` and `save_best`:
    `compilation.CompileEvents.allowed`); other threads of the process are not watched."""
    self.training_thread = threading.get_ident()
    self.compiles_expected = compilation.CompileEvents.outside_steps(self.training_thread)

  def check_no_recompile(self, where: Callable[[], str]) -> None:
    """Raises if this thread compiled anything since `start_watching_compiles`; `where()`
    (formatted only then, since this runs at every step) says when."""
    if compilation.CompileEvents.outside_steps(self.training_thread) != self.compiles_expected:
      raise RuntimeError(
        f"a compilation happened {where()}: every train and eval step must reuse its bucket's "
        "ahead-of-time executable"
      )

  def save_latest(self, state: TrainState, progress: Progress) -> None:
    with compilation.CompileEvents.allowed():
      self.checkpoints.save_latest(state, progress, self.plan)

  def save_best(self, epoch: int, params: Any, selected_by: str) -> None:
    with compilation.CompileEvents.allowed():
      self.checkpoints.save_best(epoch, params, selected_by)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains until early stopping, `num_epochs`, `max_steps`, `max_minutes`, SIGINT or SIGTERM,
  resuming from `workdir` when it holds a run. Training starts once the first scheduled bucket is
  compiled; the other buckets compile in the background. Returns the summary also written to
  `workdir/summary.json` (`ended_by` says why it ended: `num_epochs`, `patience`, `max_steps`,
  `max_minutes` or a signal; `stopped_by` the signal or time cap that cut it short, or the signal
  that came once training was done and left the test split unscored). A run that an earlier start
  finished is not compiled or trained again: its `summary.json` is returned.
  """
  check_is_config(config)
  workdir = workdir_path(workdir)
  stop = StopRequest(config.max_minutes)
  setup_runtime(config)
  mesh = make_data_mesh()
  validate_config(config, jax.device_count())
  train_set, eval_sets, skipped = load_data(config)  # before the workdir: bad data leaves none
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock(workdir):
    return _train_in(workdir, config, stop, mesh, train_set, eval_sets, skipped)


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds `workdir/train.lock` (process 0) while a run trains there: a second trainer started in
  the same workdir is refused, where both would resume the same checkpoint and write the same
  epochs. The operating system lets the lock go when its process ends, however it ends."""
  if jax.process_index():
    yield
    return
  path = workdir / "train.lock"
  with open(path, "a") as file:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(
        f"another trainer is running in {workdir} (it holds {path}); wait for it to end, or use "
        "another workdir"
      ) from None
    except OSError as error:  # a file system without locks: train, unguarded
      LOG.warning("cannot lock %s (%s): a second trainer there would not be refused", path, error)
    yield


def _train_in(workdir, config, stop, mesh, train_set, eval_sets, skipped) -> dict:
  """`train_and_evaluate` once the data is loaded and the workdir is this run's."""
  measured = auto_cost_model(config, train_set, mesh, workdir)
  plan, eval_plans, plan_summary = plan_buckets(config, train_set, eval_sets, skipped, measured)
  with (
    contextlib.closing(Checkpoints(workdir, _shape_config(config), config.seed)) as checkpoints,
    stop.on_signals(),
  ):
    state, progress = restore(config, workdir, checkpoints, initial_state(config, plan, mesh), plan)
    global_step = int(jax.device_get(state.step))
    earlier = finished_earlier(config, workdir, progress, global_step)
    if earlier is not None:  # nothing to compile, train or score
      if jax.process_index() == 0:
        repair_records(config, workdir, plan_summary, progress.history)
      return earlier
    # Only now: a start refused, or one with nothing to do, leaves the run's records as they were
    # (`--mode=evaluate` checks its config against config.json).
    if jax.process_index() == 0:
      _write_atomically(workdir / PLAN_FILE, json.dumps(plan_summary, indent=2))
      record_config(config, workdir, resumed=bool(global_step))
    steps = start_compiling(config, state, plan, eval_plans, mesh, progress)
    with (
      contextlib.closing(steps),
      contextlib.closing(MetricsWriter(workdir, progress.history)) as metrics_writer,
    ):
      run = Run(
        config,
        mesh,
        train_set,
        eval_sets,
        plan,
        eval_plans,
        steps,
        checkpoints,
        metrics_writer,
        stop,
      )
      state, progress = train_epochs(run, state, progress)
      ending = how_training_ended(run, progress, int(jax.device_get(state.step)))
      # After a signal or the time cap only the compiles already running finish; an eval step
      # the test split still needs compiles when it is looked up.
      if stop.reason:
        steps.close()
      else:
        steps.wait()
    test_scores = {} if ending.stopped_by else evaluate_test_split(run, state.params)
  summary = _summary(run, state, progress, skipped, ending, measured) | test_scores
  if jax.process_index() == 0:
    log_ending(run, progress, summary, ending)
    _write_atomically(workdir / SUMMARY_FILE, json.dumps(_json_safe(summary), indent=2))
  return summary


def train_epochs(run: Run, state: TrainState, progress: Progress) -> tuple[TrainState, Progress]:
  """Trains until the run is `finished`: an epoch trained to its end is evaluated
  (`end_epoch`), one cut short is checkpointed where it stopped."""
  run.start_watching_compiles()
  while not finished(run, progress, int(jax.device_get(state.step))):
    state = train_one_epoch(run, state, progress)
    if progress.step_in_epoch == run.plan.num_steps:
      progress = end_epoch(run, state, progress)
    else:  # stopped within the epoch: max_steps, a signal or the time cap
      if run.stop.reason:  # no more steps: compile nothing more, not even while saving
        run.steps.cancel_queued()
      run.save_latest(state, progress)
  return state, progress


@dataclasses.dataclass(frozen=True)
class Ending:
  """How training ended. `ended_by`: `num_epochs`, `patience`, `max_steps`, or the signal or
  time cap that cut the schedule short. `stopped_by`: the stop that left work for the same
  command to do (the rest of the schedule, or the test split's scoring), else None.
  `late_signal`: a signal that came once the schedule was done, else None."""

  ended_by: str
  stopped_by: str | None
  late_signal: str | None


def how_training_ended(run: Run, progress: Progress, global_step: int) -> Ending:
  """A stop that comes once the schedule is done (the time cap at the last step, a signal during
  the last validation) finds training over. A signal still skips what is left, the test split's
  scoring, which the same command then does. Every process agrees: the schedule is the same on
  all, a stop that ended the loop before it was done was agreed on by `stop.requested`, and
  `stop.signalled` is collective."""
  done = schedule_done(run.config, progress, global_step)
  stopped_by = None if done else run.stop.reason
  late_signal = run.stop.signalled() if done else None
  reason = stopped_by or ended_by(run.config, progress)
  if late_signal and run.config.data.test_split:
    stopped_by = late_signal
  return Ending(reason, stopped_by, late_signal)


def log_ending(run: Run, progress: Progress, summary: dict, ending: Ending) -> None:
  """Says how the run ended, what it compiled, and what the same command would do next."""
  config, global_step = run.config, summary["global_step"]
  if ending.late_signal:
    LOG.warning(
      "%s came after the last train step: training had finished%s",
      ending.late_signal,
      f"; the test split {config.data.test_split!r} is not scored, the same command scores it"
      if ending.stopped_by
      else "",
    )
  if ending.ended_by == "patience":
    LOG.info(
      "early stopping: no epoch better by %s than epoch %d (%.4g) in the %d since (patience)",
      progress.selection_metric,
      progress.best_epoch,
      summary[f"best_{progress.selection_metric}"],
      progress.epoch - 1 - progress.best_epoch,
    )
  if ending.ended_by == "max_steps":
    LOG.info(
      "stopped at config.max_steps=%d (epoch %d, step %d of the schedule); a larger max_steps "
      "resumes from there",
      config.max_steps,
      progress.epoch,
      progress.step_in_epoch,
    )
  log_compile_accounting(summary)
  if ending.stopped_by and not global_step:
    LOG.warning(
      "stopped by %s before the first train step: nothing to checkpoint; the same command "
      "starts the run",
      ending.stopped_by,
    )
  elif ending.stopped_by and not ending.late_signal:
    LOG.warning(
      "stopped by %s at global step %d (epoch %d, step %d of the schedule), checkpointed in %s; "
      "run the same command to resume",
      ending.stopped_by,
      global_step,
      progress.epoch,
      progress.step_in_epoch,
      run.checkpoints.directory,
    )


def check_fresh_start(checkpoints: Checkpoints, workdir: pathlib.Path) -> None:
  """A start with no training checkpoint to resume, in a workdir an earlier run left its files in
  (its training checkpoints removed or all damaged): its best checkpoints would pass for this
  run's (saving a best epoch skips one that exists), so they are refused; its metrics are
  replaced, with a warning. Decided by process 0, which writes the metrics, for all."""
  best = checkpoints.best.latest_step() is not None
  metrics_path = workdir / METRICS_FILE
  epochs = len(metrics_path.read_text().splitlines()) if metrics_path.is_file() else 0
  best, epochs = from_process_0([best, epochs])
  if best:
    raise ValueError(
      f"{checkpoints.best.directory} holds an earlier run's best parameters, and there is no "
      "training checkpoint to resume that run from: a new run would be scored with them; use a "
      f"new workdir, or remove {checkpoints.best.directory}"
    )
  if epochs:
    LOG.warning(
      "no training checkpoint to resume in %s: starting afresh, replacing the %d epoch(s) of %s",
      workdir,
      epochs,
      metrics_path,
    )


def restore(
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  checkpoints: Checkpoints,
  fresh: TrainState,
  plan: bucketing.BucketPlan,
) -> tuple[TrainState, Progress]:
  """The newest intact checkpoint's state and progress (else `fresh`, in a workdir that
  `check_fresh_start` accepts), saying where it resumes. A run resumes only with the selection
  metric it started with: its best epoch was chosen by it. `checkpoints/best` is made to agree
  with the restored progress (`Checkpoints.align_best`)."""
  try:
    state, progress = checkpoints.restore_latest(fresh, plan)
  except CheckpointMismatchError as error:  # the checkpoint says what differs, config.json why
    raise CheckpointMismatchError(f"{error}{schedule_changes(config, workdir)}") from None
  global_step = int(jax.device_get(state.step))
  selection_metric = config.selection_metric
  if not global_step:
    check_fresh_start(checkpoints, workdir)
    progress = dataclasses.replace(progress, selection_metric=selection_metric)
  elif progress.selection_metric != selection_metric:
    raise ValueError(
      f"config.selection_metric={selection_metric!r}, but the run in {checkpoints.directory} "
      f"chose its best epoch by {progress.selection_metric!r}; use that or a new workdir"
    )
  else:
    checkpoints.align_best(progress, state.params)
    LOG.info(
      "resumed from checkpoint at global step %d: epoch %d, step %d of the schedule",
      global_step,
      progress.epoch,
      progress.step_in_epoch,
    )
  return state, progress


def start_compiling(
  config, state, plan, eval_plans, mesh, progress: Progress
) -> compilation.CompiledSteps:
  """Compiles the steps (`compile_steps`), the buckets the schedule needs first first."""
  order = first_needed_buckets(plan, config.seed, progress.epoch, progress.step_in_epoch)
  steps = compile_steps(
    state,
    plan,
    eval_plans,
    mesh,
    feature_config(config).num_features,
    train_order=order,
    mode=config.compile_mode,
    threads=config.compile_threads,
  )
  LOG.info(
    "compiling %d train and %d eval steps on %d thread(s), %s; persistent cache: %s",
    len(steps.train_steps),
    len(steps.eval_steps),
    steps.workers,
    config.compile_mode,
    jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else "off",
  )
  return steps


def data_source(config: ml_collections.ConfigDict) -> dataset_lib.DataSource:
  """Where the configured data comes from. An export found only in the default data dir with
  nothing configured is refused: it may be an old file the user forgot."""
  data = config.data
  synthetic_sizes = data.synthetic.to_dict() if data.dataset == "synthetic" else {}
  source = dataset_lib.data_source(
    data.dataset, data_dir=data.data_dir, manual_dir=data.manual_dir, **synthetic_sizes
  )
  if source.default_location and data.manual_dir is None:
    raise ValueError(
      f"no data dir is configured, and the only data found is {source}; to train on it, pass "
      f"--config.data.data_dir={dataset_lib.default_data_dir()}, or point IAM_ONDB_DIR or "
      "--config.data.manual_dir at the IAM-OnDB download"
    )
  return source


def load_data(config) -> tuple[dataset_lib.SequenceSet, dict[str, dataset_lib.SequenceSet], list]:
  """The training set, the evaluation sets by split name (validation, then test if set) and the
  lines skipped as bad (`config.data.bad_examples`), after saying where the data comes from."""
  source = data_source(config)
  LOG.info("data: %s", source)
  loads = {}  # (split, limit): (sequences, skipped lines); a split and limit asked twice load once

  def load(split: str, limit: int) -> dataset_lib.SequenceSet:
    if (split, limit) not in loads:
      loads[split, limit] = _load_checked(config, split, limit, str(source))
    return loads[split, limit][0]

  train_set = load(config.data.train_split, config.data.train_limit)
  splits = dict.fromkeys(filter(None, (config.data.eval_split, config.data.test_split)))
  eval_sets = {split: load(split, config.data.eval_limit) for split in splits}
  # A split loaded under two limits (evaluating on the training split) lists its skipped lines
  # once: the wider load's, which hold the other's, since a limit takes a split's first lines.
  widest = {}
  for (split, limit), (_, skipped) in loads.items():
    if split not in widest or (limit or math.inf) > (widest[split][0] or math.inf):
      widest[split] = (limit, skipped)
  return train_set, eval_sets, [line for _, skipped in widest.values() for line in skipped]


def workdir_path(workdir: str | pathlib.Path) -> pathlib.Path:
  """`workdir` as a path (`~` expanded). An empty one is refused, since it would be the current
  folder, and so is an existing file or a path inside one, before anything is loaded or
  compiled."""
  if not str(workdir).strip():
    raise ValueError("the workdir (--workdir) is empty; name the run's folder")
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"the workdir (--workdir) {path} is a file, not a folder")
  for parent in path.parents:
    if parent.exists() and not parent.is_dir():
      raise NotADirectoryError(f"the workdir (--workdir) {path} is inside {parent}, a file")
  return path


def auto_cost_model(config, train_set, mesh, workdir: pathlib.Path) -> MeasuredCost | None:
  """The measured cost model `auto` plans with, when the config leaves some of it unset.

  Kept in `workdir/cost_model.json`. A run with a checkpoint plans with the figures it started
  with, whatever changed since: new figures could plan other buckets, and the resume would be
  refused (without the file, with the copy its `plan.json` keeps, which writes the file again;
  with neither, it measures again and says so). A fresh run reuses the file's figures when they
  were measured for this model, CTC loss, batch rule and devices, and measures
  (`measure_cost_model`) otherwise. None when measuring cannot matter: a corpus of one padded
  length has one bucket whatever the costs.
  """
  if not measures_cost_model(config):
    return None
  if len(_padded_lengths(config, train_set)) < 2:
    return None
  path = workdir / COST_FILE
  saved = _read_cost_file(path) if path.exists() else None
  with contextlib.closing(Checkpoints(workdir, create=False)) as checkpoints:
    resuming = checkpoints.latest.latest_step() is not None
  if saved is None and resuming:
    try:
      saved = _read_cost_file(workdir / PLAN_FILE, within="measured_cost")
    except ValueError as error:  # missing, damaged, or planned without a measured cost model
      LOG.warning(
        "%s is missing, and its copy in %s cannot be used (%s): measuring the cost model "
        "again; figures that plan other buckets than the run's will have the resume refused",
        path,
        PLAN_FILE,
        error,
      )
    else:
      if jax.process_index() == 0:
        LOG.warning("%s is missing: the resumed run plans with the copy in %s", path, PLAN_FILE)
        _write_atomically(path, json.dumps(saved, indent=2))
  same = saved is not None and saved["report"]["fitted_to"] == _cost_fingerprint(config)
  reuse = saved is not None and (resuming or same)
  reuse = from_process_0(reuse)  # one decision for all: the measuring steps are collective
  if reuse:
    measured = MeasuredCost(bucketing.CostModel(**saved["cost_model"]), saved["report"], True)
    if not same:
      LOG.warning(
        "%s was measured for other settings than this run's; the resumed run keeps it, to plan "
        "the buckets it started with",
        path,
      )
  else:
    measured = measure_cost_model(config, train_set, mesh)
    if jax.process_index() == 0:
      cost = {"cost_model": dataclasses.asdict(measured.model), "report": measured.report}
      _write_atomically(path, json.dumps(cost, indent=2))
  LOG.info("%s", describe_cost_model(measured))
  return measured


def _write_atomically(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` whole or not at all (a kill mid-write leaves the old file)."""
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(text)
  temporary.replace(path)


# Fields that choose how, not what, the model computes: implementations, loop unrolling, kernel
# launches, the evaluation's batch.
HOW_NOT_WHAT_FIELDS = (
  "model.lstm_impl",
  "model.unroll",
  "model.kernel.",
  "ctc.",
  "eval_batch_size",
)
# Fields that steer a run but not what it computes: a resume may change them without a warning.
RUN_CONTROL_FIELDS = (
  *HOW_NOT_WHAT_FIELDS,
  "max_minutes",
  "max_steps",
  "progress_bar",
  "compile_mode",
  "compile_threads",
  "compilation_cache_dir",
  "checkpoint_every_steps",
  "data.data_dir",
  "data.manual_dir",
  "distributed.",
)


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"model.hidden_size": 128, ...}: every field, as JSON values."""
  return _json_safe(cli_errors.flat_keys(config.to_dict()))


def _read_cost_file(path: pathlib.Path, within: str | None = None) -> dict:
  """`cost_model.json` as `auto_cost_model` wrote it, or the copy in the file's `within` field;
  anything else is an error naming the file."""
  keys = ("cost_model", "report")
  saved = cli_errors.read_json_object(path, (within,) if within else keys)
  if within:
    saved = saved[within]
    if not (isinstance(saved, dict) and set(keys) <= saved.keys()):
      raise ValueError(f"{path}: its {within} is not a cost model with its report")
  saved = {key: saved[key] for key in keys}  # the file's own fields, without a copy's others
  report, figures = saved["report"], saved["cost_model"]
  if not (isinstance(report, dict) and {"steps", "fitted_to", "measure_s"} <= report.keys()):
    raise ValueError(f"{path}: its report lacks the steps, fitted_to or measure_s written there")
  try:
    bucketing.CostModel(**figures)
  except (TypeError, ValueError) as error:  # other fields, or figures no cost can have
    raise ValueError(f"{path}: not the cost model written there ({error})") from None
  return saved


def check_trained_with(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses to load a run's parameters for a config whose features or model differ from the
  run's (its `config.json`; runs older than that file are not checked, nor fields it lacks): a
  model scores, and transcribes, only the features it was trained on. How the model computes may
  differ (`HOW_NOT_WHAT_FIELDS`), and dropout, which inference leaves out."""
  path = workdir / CONFIG_FILE
  if not path.is_file():
    LOG.warning(
      "%s is missing: the config's model and features cannot be checked against the run's", path
    )
    return
  trained, current = cli_errors.read_json_object(path), flat_config(config)
  compared = [
    field
    for field in trained.keys() & current.keys()
    if field.startswith(("model.", "data.features."))
    and not field.startswith((*HOW_NOT_WHAT_FIELDS, "model.dropout_rate"))
  ]
  differ = cli_errors.differences(trained, current, compared, prefix="config.")
  if differ:
    raise ValueError(
      f"the run in {workdir} was trained with another model or features ({path}): "
      f"{'; '.join(differ)}; use the config it was trained with"
    )


def schedule_changes(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
  """The fields that fix a run's schedule (data, bucketing, seed) that its config.json, its last
  start's, has otherwise, as a clause to end an error with; "" without that file or such fields."""
  path = workdir / CONFIG_FILE
  try:
    before = cli_errors.read_json_object(path) if path.is_file() else {}
  except ValueError:  # damaged: the error this clause ends says enough without it
    return ""
  current = flat_config(config)
  compared = [
    field
    for field in before.keys() | current.keys()
    if field.startswith(("data.", "bucketing.", "seed"))
    and not field.startswith(RUN_CONTROL_FIELDS)
  ]
  changed = cli_errors.differences(before, current, compared, prefix="config.")
  return f"; its {path} differs in {'; '.join(changed)}" if changed else ""


def repair_records(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, plan: dict, history: list[dict]
) -> None:
  """Writes again the `plan.json` and `config.json` of a finished run that lost them or has them
  damaged, which `--mode=evaluate` needs, and its `metrics.jsonl` (from the checkpoint's
  history) when it no longer holds a row per epoch; a start with nothing to do leaves sound ones
  as they were."""
  for path, record in ((workdir / PLAN_FILE, plan), (workdir / CONFIG_FILE, flat_config(config))):
    try:
      cli_errors.read_json_object(path)
    except ValueError as error:
      LOG.warning("%s; written again from this start", error)
      _write_atomically(path, json.dumps(record, indent=2))
  metrics_path = workdir / METRICS_FILE
  try:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
  except (OSError, ValueError):  # missing, unreadable, a line cut short
    rows = None
  if rows is None or len(rows) != len(history):
    LOG.warning("%s does not hold the run's %d epochs; written again", metrics_path, len(history))
    _write_atomically(metrics_path, "".join(metrics_line(row) for row in history))


def record_config(config: ml_collections.ConfigDict, workdir: pathlib.Path, resumed: bool) -> None:
  """Writes the start's config to `workdir/config.json`; a resume first warns of the fields it
  changes that change what the run computes (the learning rate's horizon with `num_epochs`, the
  optimizer, dropout, ...: accepted, since the state's shapes still fit, but worth knowing)."""
  path = workdir / CONFIG_FILE
  current = flat_config(config)
  if resumed and path.is_file():
    try:
      before = cli_errors.read_json_object(path)
    except ValueError as error:  # a record, rewritten below: what it held is lost, not the run
      LOG.warning("%s; the resume cannot say which fields it changes, and rewrites it", error)
      before = current
    compared = [
      field for field in before.keys() | current.keys() if not field.startswith(RUN_CONTROL_FIELDS)
    ]
    changed = cli_errors.differences(before, current, compared, prefix="config.")
    if changed:
      LOG.warning(
        "resuming with another config than the run's last start (%s): %s", path, "; ".join(changed)
      )
  _write_atomically(path, json.dumps(current, indent=2))


def plan_buckets(
  config,
  train_set,
  eval_sets,
  skipped: list,
  measured: MeasuredCost | None = None,
) -> tuple[bucketing.BucketPlan, dict, dict | None]:
  """The training plan, the eval plans and, on process 0, the plan's summary for `plan.json`
  (with the measured cost model, if any), after printing the plan and the lines skipped as bad."""
  measured_model = measured.model if measured else None
  plan = make_train_plan(config, train_set, jax.device_count(), measured_model)
  eval_plans = make_eval_plans(
    plan.upper_bounds,
    eval_sets,
    config.eval_batch_size,
    config.bucketing.round_to,
    jax.device_count(),
  )
  plan_summary = None
  if jax.process_index() == 0:
    # The cost model's prediction only where there is one: measured, or given in full.
    predicts = measured or gives_cost_model(config)
    plan_summary = plan.summary(cost_model(config, measured_model) if predicts else None)
    if measured:
      plan_summary["measured_cost"] = {
        "cost_model": dataclasses.asdict(measured.model),
        "report": measured.report,
        "reused": measured.reused,
      }
    LOG.info("bucket plan:\n%s", bucketing.format_report(plan_summary))
    if len(plan.truncated):
      LOG.warning(
        "%d training line(s) longer than the last bound, %d frames, are cut to it "
        "(config.bucketing.overflow='truncate') but keep their whole label: CTC may find no "
        "alignment for them",
        len(plan.truncated),
        plan.upper_bounds[-1],
      )
    log_skipped(skipped)
  return plan, eval_plans, plan_summary


def log_skipped(skipped: list[dict]) -> None:
  """One line on the lines left out as bad, if any: how many per split, and the first."""
  if not skipped:
    return
  per_split = collections.Counter(line["split"] for line in skipped)
  first = skipped[0]
  LOG.info(
    "skipped %d bad line(s) (config.data.bad_examples='skip'): %s; the first: %s in %s, %s",
    len(skipped),
    ", ".join(f"{split} {count}" for split, count in per_split.items()),
    first["id"],
    first["split"],
    first["reason"],
  )


def replicated_state(config, mesh: jax.sharding.Mesh, total_steps: int) -> TrainState:
  """A fresh train state (`create_train_state`) replicated over `mesh`."""
  state = create_train_state(config, feature_config(config).num_features, total_steps)
  return jax.device_put(state, NamedSharding(mesh, P()))


def initial_state(config, plan: bucketing.BucketPlan, mesh) -> TrainState:
  """The fresh replicated state a run starts from, its learning rate scheduled over all of the
  plan's epochs; logs the LSTM and CTC implementations `auto` chose."""
  state = replicated_state(config, mesh, plan.num_steps * config.num_epochs)
  LOG.info("%s", describe_implementations(config))
  return state


def describe_implementations(config: ml_collections.ConfigDict) -> str:
  """What `auto` chose on this backend for the LSTM recurrence and the CTC loss."""
  model = build_model(config)
  kernel = "the fused Pallas kernel"
  recurrence = (
    f"{kernel} ({model.kernel_config.describe()})"
    if model.lstm_implementation == "pallas"
    else f"lax.scan, unroll {model.unroll}"
  )
  ctc_loss = kernel if build_ctc_loss(config).keywords["implementation"] == "pallas" else "optax"
  return (
    f"on {jax.default_backend()}: LSTM recurrence {recurrence} "
    f"(lstm_impl={config.model.lstm_impl!r}), CTC loss {ctc_loss} (ctc.impl={config.ctc.impl!r})"
  )


def finished(run: Run, progress: Progress, global_step: int) -> bool:
  """The run is over: its schedule is done (`schedule_done`) or a stop was asked for."""
  # The time cap is checked after steps only, so that every start takes at least one.
  return schedule_done(run.config, progress, global_step) or run.stop.requested(
    check_time_cap=False
  )


def schedule_done(config: ml_collections.ConfigDict, progress: Progress, global_step: int) -> bool:
  """All epochs trained, early-stopped on patience, or `max_steps` taken."""
  return (
    progress.epoch >= config.num_epochs
    or stalled(config, progress)
    or out_of_steps(config, global_step)
  )


def out_of_steps(config: ml_collections.ConfigDict, global_step: int) -> bool:
  """`config.max_steps` (0: no limit) taken."""
  return bool(config.max_steps) and global_step >= config.max_steps


def finished_earlier(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, progress: Progress, global_step: int
) -> dict | None:
  """The `summary.json` of a run that an earlier start finished, when this start has nothing to
  do: its schedule is done and process 0 holds the summary written at this global step by a
  start that was not stopped, with scores of this config's test split if it has one. None when
  this start goes on (no such summary, a stopped start's, or a test split it did not score): it
  compiles, and scores the test split. Every process gets process 0's decision and summary."""
  if not schedule_done(config, progress, global_step):
    return None
  summary = None
  if jax.process_index() == 0:
    path = workdir / SUMMARY_FILE
    try:
      summary = cli_errors.read_json_object(path)
    except ValueError as error:  # none, or damaged: this start writes it
      if path.exists():
        LOG.warning("%s; this start compiles and writes it again", error)
    split = config.data.test_split
    if not (
      summary is not None
      and summary.get("global_step") == global_step
      and summary.get("stopped_by") is None
      and (not split or summary.get("test_split") == split)
    ):
      summary = None
  summary = from_process_0(summary)
  if summary is not None:
    LOG.info(
      "this run already ended (%s) at global step %d after %d epoch(s): nothing to train; %s "
      "stands (--mode=evaluate scores a checkpoint)",
      summary.get("ended_by", "finished"),
      global_step,
      progress.epoch,
      workdir / SUMMARY_FILE,
    )
  return summary


def from_process_0(value: Any) -> Any:
  """`value`, anything JSON can hold, as process 0 has it, on every process."""
  if jax.process_count() == 1:
    return value
  text = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(text.size)))
  if jax.process_index() != 0:
    text = np.zeros(size, np.uint8)
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(text)).tobytes())


def stalled(config: ml_collections.ConfigDict, progress: Progress) -> bool:
  """`patience` epochs have passed without a better `selection_metric`: early stopping."""
  return progress.best_epoch >= 0 and progress.epoch - 1 - progress.best_epoch >= config.patience


def ended_by(config: ml_collections.ConfigDict, progress: Progress) -> str:
  """Why a run whose schedule is done ended: `num_epochs`, `patience` (early stopping) or
  `max_steps`."""
  if progress.epoch >= config.num_epochs:
    return "num_epochs"
  return "patience" if stalled(config, progress) else "max_steps"


# With several processes, agreeing on a stop is a collective that waits for the step just
# dispatched, so the host would stall at every step: they agree every this many global steps.
STOP_AGREED_EVERY = 8


def cut_short(run: Run, global_step: int) -> bool:
  """`max_steps` taken, or a stop requested (a signal, the time cap): checked at every step, and
  with several processes at every `STOP_AGREED_EVERY`-th global step (the same on all)."""
  if out_of_steps(run.config, global_step):
    return True
  if jax.process_count() > 1 and global_step % STOP_AGREED_EVERY:
    return False
  return run.stop.requested()


def train_one_epoch(run: Run, state: TrainState, progress: Progress) -> TrainState:
  """Trains from `progress`'s position to the end of its epoch or until `cut_short`,
  checkpointing every `checkpoint_every_steps` global steps; `progress` follows each step."""
  config, plan = run.config, run.plan
  schedule = bucketing.iterate(
    plan,
    config.seed,
    start_epoch=progress.epoch,
    start_step=progress.step_in_epoch,
    num_epochs=progress.epoch + 1,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  batches = _prefetch(
    (s, make_batch(run.train_set, plan, s.bucket, s.indices, run.batch_sharding)) for s in schedule
  )
  global_step = int(jax.device_get(state.step))
  show_bar = config.progress_bar and jax.process_index() == 0
  clock = _EpochClock(progress, run.steps)
  with progress_bar(
    plan.num_steps, progress.step_in_epoch, f"epoch {progress.epoch}", show_bar
  ) as bar:
    counted = progress.epoch_train_weight  # a resumed epoch's lines before this start
    late = ReadOneLate(lambda *step: _account(progress, step, plan, bar, counted))
    for scheduled, batch in batches:
      state, step_metrics = run.steps.train_step(scheduled.bucket)(state, batch)
      run.check_no_recompile(
        lambda at=scheduled: f"at epoch {at.epoch}, step {at.step} (bucket {at.bucket})"
      )
      late.push(scheduled, step_metrics)
      progress.step_in_epoch, global_step = scheduled.step + 1, global_step + 1
      if cut_short(run, global_step):
        break
      if (
        global_step % config.checkpoint_every_steps == 0 and progress.step_in_epoch < plan.num_steps
      ):
        late.flush()  # the checkpoint's progress counts every step it holds
        clock.stop()
        run.save_latest(state, progress)
        clock.start()
    late.flush()
  jax.block_until_ready(state)
  clock.stop()
  return state


class _EpochClock:
  """Adds the time between `start` and `stop` to the progress's epoch seconds, less the seconds
  spent waiting for compiles: the first step's wait (counted in `time_to_first_step_s`) and those
  of later steps (counted in `epoch_compile_wait_seconds`)."""

  def __init__(self, progress: Progress, steps: compilation.CompiledSteps):
    self.progress, self.steps = progress, steps
    self.start()

  def start(self) -> None:
    self.started = time.perf_counter()
    self.waits = (self.steps.first_step_wait_s, self.steps.train_wait_s)

  def stop(self) -> None:
    first_step_wait = self.steps.first_step_wait_s - self.waits[0]
    wait = self.steps.train_wait_s - self.waits[1]
    self.progress.epoch_seconds += time.perf_counter() - self.started - first_step_wait - wait
    self.progress.epoch_compile_wait_seconds += wait


def end_epoch(run: Run, state: TrainState, progress: Progress) -> Progress:
  """Evaluates on the validation split, keeps the best parameters, writes the metrics row, and
  checkpoints the start of the next epoch."""
  config, epoch = run.config, progress.epoch
  eval_start = time.perf_counter()
  split = config.data.eval_split
  val = evaluate(
    state.params, run.eval_sets[split], run.eval_plans[split], run.steps.eval_steps, run.mesh
  )
  plan_summary = run.plan.summary()
  row = {
    "epoch": epoch,
    "train_loss": progress.epoch_train_loss_sum / progress.epoch_train_weight,
    "val_loss": val["loss"],
    "val_cer": val["cer"],
    "val_wer": val["wer"],
    "epoch_time_s": progress.epoch_seconds,
    "compile_wait_s": progress.epoch_compile_wait_seconds,
    "eval_time_s": time.perf_counter() - eval_start,
    "real_timesteps": int(plan_summary["real_timesteps"]),
    "padded_timesteps_with_filler": int(plan_summary["padded_timesteps_with_filler"]),
    "sequences_per_s": plan_summary["num_examples"] / progress.epoch_seconds,
    "steps": int(jax.device_get(state.step)),
  }

  # A tie on the metric (a CER still 1.0 while CTC emits only blanks) goes to the lower loss.
  def score(scores: dict) -> tuple[float, float]:
    return scores[progress.selection_metric], scores["val_loss"]

  improved = progress.best_epoch < 0 or score(row) < score(progress.history[progress.best_epoch])
  if improved:
    progress.best_epoch = epoch
  progress.history.append(row | {"best_epoch": progress.best_epoch})
  run.metrics_writer.write(progress.history[-1])
  LOG.info(
    "epoch %d: train loss %.3f, val loss %.3f, val CER %.3f, %.1f s",
    epoch,
    row["train_loss"],
    row["val_loss"],
    row["val_cer"],
    row["epoch_time_s"],
  )
  progress = dataclasses.replace(
    progress,
    epoch=epoch + 1,
    step_in_epoch=0,
    epoch_train_loss_sum=0.0,
    epoch_train_weight=0.0,
    epoch_seconds=0.0,
    epoch_compile_wait_seconds=0.0,
  )
  run.save_latest(state, progress)
  if improved:  # after the state that names it best (`Checkpoints.save_best`)
    run.save_best(epoch, state.params, progress.selection_metric)
  run.check_no_recompile(lambda: f"while evaluating epoch {epoch}")
  return progress


def evaluate_test_split(run: Run, params: Any) -> dict[str, float]:
  """Loss, CER and WER of the best parameters on the test split, when one is configured."""
  split = run.config.data.test_split
  if not split:
    return {}
  best_params = run.checkpoints.restore_best(params)
  if best_params is None:  # no epoch ended, or its checkpoint was removed
    LOG.warning(
      "the test split %r is not scored: no best checkpoint in %s",
      split,
      run.checkpoints.best.directory,
    )
    return {}
  test = evaluate(
    best_params, run.eval_sets[split], run.eval_plans[split], run.steps.eval_steps, run.mesh
  )
  return {
    "test_split": split,
    "test_loss": test["loss"],
    "test_cer": test["cer"],
    "test_wer": test["wer"],
  }


def log_compile_accounting(summary: dict) -> None:
  """Logs what the run compiled and how long it took (`CompiledSteps.accounting`), and XLA's
  planned memory of the train steps when the backend gives it (`_step_memory`)."""
  first = summary["time_to_first_step_s"]
  dropped = summary["compiles_dropped"]
  LOG.info(
    "compiled %d train steps %s and %d eval steps %s: first train step after %s, %.1f s wall, "
    "%.1f s summed over steps; persistent cache %d hits, %d misses",
    summary["train_compiles"],
    "before the stop" if dropped else "(one per bucket the training lines use)",
    summary["eval_compiles"],
    f"({dropped} more left for the next start)"
    if dropped
    else "(one per bucket the evaluation splits use)",
    "-" if first is None else f"{first:.1f} s",
    summary["compile_wall_s"],
    summary["compile_seconds_sum"],
    summary["compilation_cache_hits"],
    summary["compilation_cache_misses"],
  )
  if summary["peak_step_memory_mb"] is not None:
    LOG.info(
      "XLA plans a train step at %.1f MB per device at the most (bucket %d), %.1f MB on average "
      "over an epoch's steps",
      summary["peak_step_memory_mb"],
      summary["peak_step_bucket"],
      summary["mean_step_memory_mb"],
    )


class ReadOneLate:
  """Reads each step's outputs once the next step is dispatched. Reading waits for the step to
  end: read right after its dispatch, the device would sit idle while the host reads, decodes and
  makes the next batch. `push` a step's outputs after dispatching it; `flush` reads the last."""

  def __init__(self, read: Callable[..., None]):
    self._read, self._pending = read, None

  def push(self, *outputs) -> None:
    self.flush()
    self._pending = outputs

  def flush(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._read(*pending)


def _account(
  progress: Progress, step: tuple, plan: bucketing.BucketPlan, bar, counted_before: float = 0.0
) -> None:
  """Adds a finished step's loss to the epoch's (`ReadOneLate`), and fails on a NaN or inf one;
  the progress bar's rate counts the lines since `counted_before`, the epoch's when its clock
  started."""
  step_info, step_metrics = step
  values = jax.device_get(step_metrics)
  if not np.isfinite(values["loss"]):
    raise LossNotFinite(
      f"loss is {values['loss']} at epoch {step_info.epoch}, step {step_info.step} "
      f"(bucket {step_info.bucket}, length bound {plan.upper_bounds[step_info.bucket]}); the "
      "latest checkpoint precedes it: run again with a lower config.optimizer.learning_rate (or "
      "config.optimizer.grad_clip_norm) to resume from it"
    )
  progress.epoch_train_loss_sum += float(values["loss_sum"])
  progress.epoch_train_weight += float(values["weight"])
  if bar is not None:
    bar.update(step_info.step + 1 - bar.n)
    seconds = bar.format_dict["elapsed"]
    sequences = progress.epoch_train_weight - counted_before
    bar.set_postfix(loss=f"{values['loss']:.3f}", seq_per_s=f"{sequences / max(seconds, 1e-9):.1f}")


def _prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
  """Assembles the next batches on a host thread while the device runs the current step. A
  consumer that stops early (a stop, an error) waits for the batch being assembled only: those
  queued behind it are dropped."""
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  try:
    sentinel = object()
    next_item = lambda: next(iterator, sentinel)
    queue = [pool.submit(next_item) for _ in range(depth)]
    while True:
      item = queue.pop(0).result()
      if item is sentinel:
        return
      queue.append(pool.submit(next_item))
      yield item
  finally:
    pool.shutdown(cancel_futures=True)


def step_memory_mb(
  memory: dict[int, compilation.StepMemory], plan: bucketing.BucketPlan
) -> tuple[np.ndarray, int, float]:
  """Each bucket's train-step footprint in MB (NaN for a bucket that holds no line, so has no
  step), the bucket of the largest among those an epoch uses, and the mean over an epoch's
  steps."""
  totals = [
    memory[bucket].total if bucket in memory else np.nan for bucket in range(plan.num_buckets)
  ]
  megabytes = np.array(totals) / 1e6
  steps = plan.steps_per_epoch
  used = steps > 0
  peak = int(np.argmax(np.where(used, megabytes, -np.inf)))
  return megabytes, peak, float(np.average(megabytes[used], weights=steps[used]))


def _step_memory(run: Run) -> dict:
  """XLA's planned footprint of each bucket's train step per device (`step_memory_mb`), rounded
  to 0.1 MB; None for a bucket that holds no line, where the backend gives no memory analysis,
  or for a step a stop left uncompiled (and then for the peak and the mean)."""
  memory = run.steps.train_memory()
  if None in memory.values():
    known = [
      None if memory.get(bucket) is None else round(memory[bucket].total / 1e6, 1)
      for bucket in range(run.plan.num_buckets)
    ]
    return {
      "train_step_memory_mb": None if all(mb is None for mb in known) else known,
      **dict.fromkeys(("peak_step_memory_mb", "peak_step_bucket", "mean_step_memory_mb")),
    }
  megabytes, peak, mean = step_memory_mb(memory, run.plan)
  return {
    # numpy's rounding for all three
    "train_step_memory_mb": [None if np.isnan(mb) else mb for mb in megabytes.round(1).tolist()],
    "peak_step_memory_mb": float(megabytes[peak].round(1)),
    "peak_step_bucket": peak,
    "mean_step_memory_mb": float(np.round(mean, 1)),
  }


def _summary(
  run: Run,
  state: TrainState,
  progress: Progress,
  skipped: list[dict],
  ending: Ending,
  measured: MeasuredCost | None,
) -> dict:
  """What `train_and_evaluate` returns and writes to `summary.json`, less the test scores."""
  best = progress.history[progress.best_epoch] if progress.best_epoch >= 0 else {}
  return {
    "num_buckets": run.plan.num_buckets,
    "upper_bounds": run.plan.upper_bounds.tolist(),
    "batch_sizes": run.plan.batch_sizes.tolist(),
    "strategy": run.plan.strategy,
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "compile_mode": run.config.compile_mode,
    **run.steps.accounting(),
    **_step_memory(run),
    # The epochs', and that of an epoch a stop cut short (max_steps, a signal, the time cap).
    "train_time_s": sum(row["epoch_time_s"] for row in progress.history) + progress.epoch_seconds,
    "compile_wait_s": (
      sum(row.get("compile_wait_s", 0.0) for row in progress.history)
      + progress.epoch_compile_wait_seconds
    ),
    "epochs": len(progress.history),
    "selection_metric": progress.selection_metric,
    "best_epoch": progress.best_epoch,
    "best_val_loss": best.get("val_loss"),
    "best_val_cer": best.get("val_cer"),
    "efficiency": run.plan.summary()["efficiency_with_filler"],
    "stopped_by": ending.stopped_by,
    "num_skipped_examples": len(skipped),
    "skipped_examples": skipped,
    # Lines longer than the last bound (config.bucketing.overflow "drop" or "truncate").
    "num_dropped_examples": len(run.plan.dropped),
    "num_truncated_examples": len(run.plan.truncated),
    "ended_by": ending.ended_by,
    "global_step": int(jax.device_get(state.step)),  # where a resume continues
    # What measuring auto's cost model took, in this start or the one that measured it.
    "cost_model_measure_s": measured.report["measure_s"] if measured else 0.0,
    "measured_cost_model": dataclasses.asdict(measured.model) if measured else None,
  }


# ---------------------------------------------------------------------------------------------
# Using a trained model.


CHECKPOINTS = ("best", "latest")  # which parameters load_params reads


def load_params(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  sharding: jax.sharding.Sharding | None = None,
  checkpoint: str = "best",
) -> Any:
  """The parameters a run in `workdir` saved, on `sharding`: its best epoch's (by the selection
  metric the run trained with, which the log line names), or with `checkpoint="latest"` its
  latest state's.

  The default sharding is this process's first device, whatever topology the run trained on.
  """
  check_is_config(config)
  return _load_params(config, workdir, sharding, checkpoint)[0]


def _load_params(config, workdir, sharding, checkpoint: str) -> tuple[Any, dict]:
  """`load_params`, and where the parameters are from: `{"checkpoint": "best", "epoch",
  "selected_by"}` or `{"checkpoint": "latest", "global_step", "epoch"}` (`epoch` counts finished
  epochs for the latest state, and is the best epoch's index for the best)."""
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint={checkpoint!r} is not one of {CHECKPOINTS}")
  workdir = workdir_path(workdir)
  check_trained_with(config, workdir)
  state = jax.eval_shape(lambda: create_train_state(config, feature_config(config).num_features, 1))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with contextlib.closing(Checkpoints(workdir, create=False)) as checkpoints:
    if checkpoint == "latest":
      params, origin = checkpoints.read_latest_params(abstract_on(state, sharding))
      where = f"global step {origin['global_step']} ({origin['epoch']} epoch(s) finished)"
    else:
      params = checkpoints.restore_best(abstract_on(state.params, sharding))
      if params is None:
        raise FileNotFoundError(
          f"no best checkpoint under {checkpoints.best.directory} (none until an epoch ends); "
          "--checkpoint=latest scores the latest state"
        )
      origin = {"epoch": int(checkpoints.best.latest_step())}
      origin["selected_by"] = checkpoints.best_selected_by
      where = f"epoch {origin['epoch']}, the best by {origin['selected_by']}"
  LOG.info("loaded the %s parameters: %s, in %s", checkpoint, where, checkpoints.directory)
  return params, {"checkpoint": checkpoint, **origin}


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  split: str,
  checkpoint: str = "best",
) -> dict[str, float]:
  """Loss, CER and WER of the best (or latest) checkpoint in `workdir` on any split of the
  configured data, with the lines scored and those skipped as bad (`config.data.bad_examples`),
  and where the parameters are from (`_load_params`)."""
  check_is_config(config)
  workdir = workdir_path(workdir)
  setup_runtime(config)
  mesh = make_data_mesh()
  validate_config(config, jax.device_count())
  plan_path = workdir / PLAN_FILE
  if not plan_path.exists():
    raise FileNotFoundError(f"{plan_path} is missing: is {workdir} a training workdir?")
  saved_bounds = cli_errors.read_json_object(plan_path, ("upper_bounds",))["upper_bounds"]
  try:
    train_bounds = bucketing.boundaries.fixed_bounds(saved_bounds)
  except ValueError as error:
    message = f"{plan_path}: upper_bounds {saved_bounds!r} are no bucket bounds ({error})"
    raise ValueError(message) from None
  source = data_source(config)
  data, skipped = _load_checked(config, split, config.data.eval_limit, str(source))
  plan = make_eval_plans(
    train_bounds,
    {split: data},
    config.eval_batch_size,
    config.bucketing.round_to,
    jax.device_count(),
  )[split]
  params, origin = _load_params(config, workdir, NamedSharding(mesh, P()), checkpoint)
  # Said after the parameters load: a damaged checkpoint is an error of one line.
  LOG.info("data: %s", source)
  log_skipped(skipped)
  limit = config.data.eval_limit
  if limit and len(data) + len(skipped) == limit:  # perhaps the split has more
    LOG.warning(
      "scoring the first %d lines of %r only (config.data.eval_limit; 0: all)", limit, split
    )
  eval_steps = compile_eval_steps(
    build_model(config).apply,
    build_ctc_loss(config),
    params,
    {split: plan},
    mesh,
    feature_config(config).num_features,
  )
  scores = evaluate(params, data, plan, eval_steps, mesh)
  skips = {"num_skipped_examples": len(skipped), "skipped_examples": skipped}
  return {**scores, "split": split, **skips, **origin}


@functools.cache
def _inference_apply(model: nn.Module) -> Callable:
  """The model's jitted inference, one per model (equal configs build equal, hashable modules),
  so transcribing line after line compiles once per padded length, not once per call."""
  return jax.jit(functools.partial(model.apply, train=False))


def inference_length(length: int, round_to: int) -> int:
  """`length` rounded up to a multiple of `round_to` that is one of four an octave: less than a
  quarter more timesteps than `round_to` alone pads to, in shapes as many as the log of the
  length."""
  multiples = -(-length // round_to)
  step = 1 << max(0, multiples.bit_length() - 3)  # 4 steps from 2**k to 2**(k+1) multiples
  return -(-multiples // step) * step * round_to


def transcribe(
  params: Any, config: ml_collections.ConfigDict, points: np.ndarray, stroke_end: np.ndarray
) -> str:
  """The greedy transcription of one line of ink: `points [N, 3]` (x, y, t), `stroke_end [N]`.

  The line is padded to one of four lengths an octave (multiples of `round_to`), so that
  transcribing line after line compiles a few programs, not one per length.
  """
  features = features_lib.ink_to_features(points, stroke_end, feature_config(config))
  length = inference_length(len(features), config.bucketing.round_to)
  inputs = np.zeros((1, length, features.shape[1]), np.float32)
  inputs[0, : len(features)] = features
  paddings = (np.arange(length) >= len(features)).astype(np.float32)[None]
  logits = _inference_apply(build_model(config))({"params": params}, inputs, paddings)
  ids, lengths = jax.device_get(ctc.greedy_decode(logits, paddings))  # slicing: no compile
  return ALPHABET.decode(ids[0, : int(lengths[0])])


if __name__ == "__main__":
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags

  import experiments.cli

  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go", required=True)
  _MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "train, or evaluate a run")
  _SPLIT = flags.DEFINE_enum(
    "split", "test", list(dataset_lib.SPLITS), "the split --mode=evaluate scores"
  )
  _CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "best", list(CHECKPOINTS), "the parameters --mode=evaluate scores"
  )

  def main(argv):
    if len(argv) > 1:
      raise cli_errors.UsageError(f"unexpected arguments: {argv[1:]}")
    config = experiments.cli.config_value(flags.FLAGS["config"])
    given = [f"--{name}" for name in ("split", "checkpoint") if flags.FLAGS[name].present]
    if given and _MODE.value == "train":  # else silently ignored
      verb = "go" if len(given) > 1 else "goes"
      raise cli_errors.UsageError(f"{' and '.join(given)} {verb} with --mode=evaluate")
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax's INFO lines out of the way
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    if _MODE.value == "train":
      summary = train_and_evaluate(config, _WORKDIR.value)
    else:
      summary = evaluate_checkpoint(config, _WORKDIR.value, _SPLIT.value, _CHECKPOINT.value)
    if jax.process_index() == 0:  # one summary for the run, as it has one log
      print(json.dumps(_json_safe(summary), indent=2))
    # Stopped by a signal: the shell's code for death by it, so a scheduler sees an unfinished job.
    stopped_by = summary.get("stopped_by")
    return 128 + signal.Signals[stopped_by] if stopped_by in ("SIGINT", "SIGTERM") else 0

  def quit_now(signum: int, frame) -> None:
    """Ctrl-C where training does not stop cleanly itself (loading, measuring, compiling), or a
    second one once a stop is under way (`StopRequest`): the process ends at once, as a kill
    would (the checkpoints survive one). A KeyboardInterrupt instead waited for compiles running
    on other threads, or, raised inside a callback of XLA's, aborted the process."""
    del frame
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(128 + signum)

  if not cli_errors.debugging():  # there, KeyboardInterrupt's traceback
    signal.signal(signal.SIGINT, quit_now)
  sys.unraisablehook = unless_orbax_read_noise(sys.unraisablehook)
  logging.getLogger("asyncio").addFilter(not_orbax_read_noise)
  sys.exit(cli_errors.run(lambda: app.run(main, flags_parser=experiments.cli.parse_flags)))
