"""Bucketed, data-parallel LSTM-CTC training.

    python train.py --config=experiments/synthetic.py --workdir=/tmp/run
    python train.py --config=experiments/iam.py --workdir=/tmp/iam --config.bucketing.num_buckets=4
    python train.py --config=experiments/iam.py --workdir=/tmp/iam --mode=evaluate --split=test

The training set's feature lengths are cut into length buckets (`bucketing.make_plan`); every bucket
has one static batch shape, so the train step and the eval step are compiled ahead of time once per
bucket and nothing compiles while training (a recompile is an error). Batches are sharded over a 1-D
mesh of all devices with parameters replicated: `jit` with `NamedSharding` gives the semantics of
pmap + pmean (one global mean loss over the real examples of the global batch, gradients all-reduced
by XLA), and the same code runs on 1 CPU, simulated CPU devices, GPUs, or several hosts, each
process feeding its own slice of the global schedule.

Importable: `train_and_evaluate(config, workdir)`, `create_train_state`, `train_step`, `eval_step`,
`evaluate_checkpoint` and `transcribe`.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax.training import train_state as train_state_lib
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bucketing
from handwriting import alphabet as alphabet_lib
from handwriting import dataset as dataset_lib
from handwriting import features as features_lib
from models import ctc, metrics
from models.factory import make_model

Batch = dict[str, jax.Array]
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
ALPHABET = alphabet_lib.Alphabet()


class TrainState(train_state_lib.TrainState):
  """Parameters, optimiser state and step, plus the key dropout is folded from each step and the
  configured CTC loss (`models.ctc.make_ctc_loss`; static, like `apply_fn`)."""

  dropout_key: jax.Array
  ctc_loss_fn: Any = struct.field(pytree_node=False, default=ctc.ctc_loss)


# ---------------------------------------------------------------------------------------------
# Configuration checks, data and plans.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails before any data is read or anything compiled, naming the field that is wrong."""
  bucket_config = config.bucketing
  if bucket_config.strategy not in bucketing.STRATEGIES:
    raise ValueError(
      f"config.bucketing.strategy={bucket_config.strategy!r} is not one of {bucketing.STRATEGIES}"
    )
  if bucket_config.num_buckets < 1:
    raise ValueError(f"config.bucketing.num_buckets must be >= 1, got {bucket_config.num_buckets}")
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
  if bucket_config.overflow not in bucketing.OVERFLOW_POLICIES:
    raise ValueError(
      f"config.bucketing.overflow={bucket_config.overflow!r} is not one of "
      f"{bucketing.OVERFLOW_POLICIES}"
    )
  if config.num_epochs < 1:
    raise ValueError(f"config.num_epochs must be >= 1, got {config.num_epochs}")
  if config.optimizer.schedule not in ("cosine", "constant"):
    raise ValueError(f"config.optimizer.schedule={config.optimizer.schedule!r}: cosine|constant")


def feature_config(config: ml_collections.ConfigDict) -> features_lib.FeatureConfig:
  return features_lib.FeatureConfig(**config.data.features.to_dict())


def load_split(
  config: ml_collections.ConfigDict, split: str, limit: int
) -> dataset_lib.SequenceSet:
  """One split as features and label ids (the model's view of the data)."""
  synthetic_sizes = config.data.synthetic.to_dict() if config.data.dataset == "synthetic" else {}
  examples = dataset_lib.load_examples(
    config.data.dataset,
    split,
    data_dir=config.data.data_dir,
    manual_dir=config.data.manual_dir,
    limit=limit or None,
    **synthetic_sizes,
  )
  return dataset_lib.featurize(examples, feature_config(config), ALPHABET)


def make_train_plan(
  config: ml_collections.ConfigDict, train: dataset_lib.SequenceSet, num_devices: int
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
    cost_model=bucketing.CostModel(bucket_config.alpha, bucket_config.beta, bucket_config.kappa),
    num_epochs=config.num_epochs,
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
  plans = {}
  for name, split in splits.items():
    plans[name] = dataclasses.replace(
      joint,
      bucket_of_example=np.searchsorted(joint.upper_bounds, split.lengths, side="left"),
      lengths=split.lengths,
      example_ids=split.ids,
    )
  return plans


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
  rows, length = int(plan.batch_sizes[bucket]), int(plan.upper_bounds[bucket])
  width = int(plan.label_upper_bounds[bucket])
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {
    "inputs": spec((rows, length, num_features), jnp.float32),
    "input_paddings": spec((rows, length), jnp.float32),
    "labels": spec((rows, width), jnp.int32),
    "label_paddings": spec((rows, width), jnp.float32),
    "weights": spec((rows,), jnp.float32),
  }


# ---------------------------------------------------------------------------------------------
# Model, state and the step functions.


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  opt = config.optimizer
  first = opt.learning_rate / max(opt.warmup_steps, 1)  # > 0: the first step already learns
  if opt.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
      first, opt.learning_rate, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1)
    )
  else:
    schedule = optax.join_schedules(
      [
        optax.linear_schedule(first, opt.learning_rate, opt.warmup_steps),
        optax.constant_schedule(opt.learning_rate),
      ],
      [opt.warmup_steps],
    )
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), optax.adam(schedule))


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
    loss, per_example = state.ctc_loss_fn(
      logits, batch["input_paddings"], batch["labels"], batch["label_paddings"], batch["weights"]
    )
    return loss, per_example

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


@dataclasses.dataclass
class CompiledSteps:
  """The executables of every bucket; calling one with another shape is an error, not a compile."""

  train: dict[int, Any]
  eval: dict[int, Any]
  seconds: float


def compile_steps(
  state: TrainState,
  train_plan: bucketing.BucketPlan,
  eval_plans: dict[str, bucketing.BucketPlan],
  mesh: jax.sharding.Mesh,
  num_features: int,
) -> CompiledSteps:
  """Compiles one train step per training bucket and one eval step per bucket any eval split uses.

  The eval plans share their shapes (`make_eval_plans`).
  """
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  train_jit = jax.jit(
    train_step, in_shardings=(replicated, rows), out_shardings=replicated, donate_argnums=0
  )
  start = time.perf_counter()
  train = {
    b: train_jit.lower(state, batch_spec(train_plan, b, num_features, rows)).compile()
    for b in range(train_plan.num_buckets)
  }
  evals = compile_eval_steps(
    state.apply_fn, state.ctc_loss_fn, state.params, eval_plans, mesh, num_features
  )
  return CompiledSteps(train, evals, time.perf_counter() - start)


def compile_eval_steps(
  apply_fn,
  ctc_loss_fn,
  params: Any,
  eval_plans: dict[str, bucketing.BucketPlan],
  mesh: jax.sharding.Mesh,
  num_features: int,
) -> dict[int, Any]:
  """One eval executable per bucket that any of the (shape-sharing) eval plans uses."""
  if not eval_plans:
    return {}
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  eval_jit = jax.jit(
    functools.partial(eval_step, apply_fn, ctc_loss_fn),
    in_shardings=(replicated, rows),
    out_shardings=replicated,
  )
  used = set()
  for eval_plan in eval_plans.values():
    used.update(np.flatnonzero(eval_plan.bucket_sizes > 0).tolist())
  shapes = next(iter(eval_plans.values()))
  return {
    b: eval_jit.lower(params, batch_spec(shapes, b, num_features, rows)).compile()
    for b in sorted(used)
  }


class CompileCounter:
  """Counts XLA backend compilations, to prove that training compiles nothing after the AOT step."""

  _count = 0
  _registered = False

  @classmethod
  def install(cls) -> None:
    if not cls._registered:
      jax.monitoring.register_event_duration_secs_listener(cls._listen)
      cls._registered = True

  @classmethod
  def _listen(cls, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      cls._count += 1

  @classmethod
  def count(cls) -> int:
    return cls._count


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(
  params: Any,
  split: dataset_lib.SequenceSet,
  plan: bucketing.BucketPlan,
  compiled_eval: dict[int, Any],
  mesh: jax.sharding.Mesh,
) -> dict[str, float]:
  """Mean CTC loss, CER and WER of a split (every process returns the same numbers)."""
  rows = NamedSharding(mesh, P("data"))
  loss_sum = weight = 0.0
  references, hypotheses = [], []
  for bucket, indices in bucketing.epoch_batches(plan, seed=0, epoch=0):
    local = bucketing.process_slice(indices, jax.process_index(), jax.process_count())
    outputs = jax.device_get(
      compiled_eval[bucket](params, make_batch(split, plan, bucket, local, rows))
    )
    loss_sum += float(outputs["loss_sum"])
    weight += float(outputs["weight"])
    for row, index in enumerate(indices):
      if index == bucketing.FILLER:
        continue
      ids = outputs["decoded"][row, : outputs["decoded_lengths"][row]]
      references.append(split.texts[index])
      hypotheses.append(ALPHABET.decode(ids))
  return {
    "loss": loss_sum / weight,
    "cer": metrics.cer(references, hypotheses),
    "wer": metrics.wer(references, hypotheses),
    "examples": int(weight),
  }


# ---------------------------------------------------------------------------------------------
# Checkpoints, logs and the loop.


def checkpoint_managers(
  workdir: pathlib.Path,
) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """`checkpoints/train`: the latest state and data position; `checkpoints/best`: best params."""
  latest = ocp.CheckpointManager(
    (workdir / "checkpoints" / "train").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
  )
  best = ocp.CheckpointManager(
    (workdir / "checkpoints" / "best").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
  )
  return latest, best


@dataclasses.dataclass
class Progress:
  """Everything besides the parameters that a resumed run needs to continue exactly."""

  epoch: int = 0
  step_in_epoch: int = 0
  history: list = dataclasses.field(default_factory=list)
  best_val_loss: float = math.inf
  best_epoch: int = -1
  epoch_train_loss_sum: float = 0.0
  epoch_train_weight: float = 0.0
  epoch_seconds: float = 0.0


class Logger:
  """metrics.jsonl and TensorBoard in the workdir, written by process 0 only."""

  def __init__(self, workdir: pathlib.Path, history: list):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.writer = None
    if self.enabled:
      # Rewritten from the checkpoint, so a resumed run never repeats or loses an epoch's row.
      self.path.write_text("".join(json.dumps(row) + "\n" for row in history))
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as file:
      file.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if isinstance(value, (int, float)) and key != "epoch":
        self.writer.add_scalar(key, value, row["epoch"])
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def save_checkpoint(manager, state: TrainState, progress: Progress, plan) -> None:
  meta = dataclasses.asdict(progress) | {"upper_bounds": plan.upper_bounds.tolist()}
  manager.save(
    int(jax.device_get(state.step)),
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(meta)),
  )


def restore_checkpoint(manager, state: TrainState, plan) -> tuple[TrainState, Progress]:
  step = manager.latest_step()
  if step is None:
    return state, Progress()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
    ),
  )
  meta = dict(restored["progress"])
  bounds = meta.pop("upper_bounds")
  if bounds != plan.upper_bounds.tolist():
    raise ValueError(
      f"the checkpoint in {manager.directory} was trained with bucket bounds {bounds}, but this "
      f"run plans {plan.upper_bounds.tolist()}; use the same config or a new workdir"
    )
  return restored["state"], Progress(**meta)


def setup_runtime(config: ml_collections.ConfigDict) -> None:
  """Multi-host initialisation and the persistent compilation cache, when configured."""
  if config.distributed.initialize:
    jax.distributed.initialize(
      coordinator_address=config.distributed.coordinator_address,
      num_processes=config.distributed.num_processes,
      process_id=config.distributed.process_id,
    )
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def progress_bar(total: int, initial: int, description: str, enabled: bool):
  if not enabled:
    return contextlib.nullcontext()
  from tqdm import tqdm

  return tqdm(total=total, initial=initial, desc=description, unit="step", leave=False)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains until early stopping or `num_epochs`, resuming from `workdir` when it holds a run.

  Returns the summary also written to `workdir/summary.json`.
  """
  setup_runtime(config)
  mesh = make_data_mesh()
  validate_config(config, jax.device_count())
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  log = logging.getLogger("train")

  train = load_split(config, config.data.train_split, config.data.train_limit)
  evals = {
    config.data.eval_split: load_split(config, config.data.eval_split, config.data.eval_limit)
  }
  if config.data.test_split:
    evals[config.data.test_split] = load_split(
      config, config.data.test_split, config.data.eval_limit
    )
  plan = make_train_plan(config, train, jax.device_count())
  eval_plans = make_eval_plans(
    plan.upper_bounds, evals, config.eval_batch_size, config.bucketing.round_to, jax.device_count()
  )
  plan_summary = plan.summary()
  if is_chief:
    (workdir / "plan.json").write_text(json.dumps(plan_summary, indent=2))
    log.info("bucket plan:\n%s", bucketing.format_report(plan_summary))

  num_features = feature_config(config).num_features
  total_steps = plan.num_steps * config.num_epochs
  state = create_train_state(config, num_features, total_steps)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  latest_manager, best_manager = checkpoint_managers(workdir)
  state, progress = restore_checkpoint(latest_manager, state, plan)

  CompileCounter.install()
  compiled = compile_steps(state, plan, eval_plans, mesh, num_features)
  if is_chief:
    log.info(
      "compiled %d train and %d eval steps (one per bucket) in %.1f s",
      len(compiled.train),
      len(compiled.eval),
      compiled.seconds,
    )
  # Checkpointing compiles small helpers of its own; steps and batches must compile nothing.
  compiles_expected = CompileCounter.count()
  rows = NamedSharding(mesh, P("data"))
  logger = Logger(workdir, progress.history)
  real_timesteps = int(plan_summary["real_timesteps"])
  padded_timesteps = int(plan_summary["padded_timesteps_with_filler"])
  steps_done = int(jax.device_get(state.step))
  stop = False

  for epoch in range(progress.epoch, config.num_epochs):
    if progress.best_epoch >= 0 and epoch - 1 - progress.best_epoch >= config.patience:
      break  # early-stopped (also when a finished run is started again)
    schedule = bucketing.iterate(
      plan,
      config.seed,
      start_epoch=epoch,
      start_step=progress.step_in_epoch,
      num_epochs=epoch + 1,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    epoch_start = time.perf_counter()
    with progress_bar(
      plan.num_steps, progress.step_in_epoch, f"epoch {epoch}", config.progress_bar and is_chief
    ) as bar:
      pending = None
      for scheduled in _prefetch(
        (s, make_batch(train, plan, s.bucket, s.indices, rows)) for s in schedule
      ):
        step_info, batch = scheduled
        state, step_metrics = compiled.train[step_info.bucket](state, batch)
        if CompileCounter.count() != compiles_expected:
          raise RuntimeError(
            f"a compilation happened at epoch {epoch}, step {step_info.step} (bucket "
            f"{step_info.bucket}): every step must reuse its bucket's ahead-of-time executable"
          )
        if pending is not None:
          _account(progress, pending, plan, bar)
        pending = (step_info, step_metrics)
        steps_done += 1
        progress.step_in_epoch = step_info.step + 1
        if config.max_steps and steps_done >= config.max_steps:
          stop = True
          break
        at_epoch_end = progress.step_in_epoch == plan.num_steps
        if progress.step_in_epoch % config.checkpoint_every_steps == 0 and not at_epoch_end:
          _account(progress, pending, plan, bar)
          pending = None
          progress.epoch_seconds += time.perf_counter() - epoch_start
          epoch_start = time.perf_counter()
          save_checkpoint(latest_manager, state, progress, plan)
          compiles_expected = CompileCounter.count()
      if pending is not None:
        _account(progress, pending, plan, bar)
    jax.block_until_ready(state)
    progress.epoch_seconds += time.perf_counter() - epoch_start
    if stop and progress.step_in_epoch < plan.num_steps:
      save_checkpoint(latest_manager, state, progress, plan)
      break

    eval_start = time.perf_counter()
    val = evaluate(
      state.params,
      evals[config.data.eval_split],
      eval_plans[config.data.eval_split],
      compiled.eval,
      mesh,
    )
    row = {
      "epoch": epoch,
      "train_loss": progress.epoch_train_loss_sum / progress.epoch_train_weight,
      "val_loss": val["loss"],
      "val_cer": val["cer"],
      "val_wer": val["wer"],
      "epoch_time_s": progress.epoch_seconds,
      "eval_time_s": time.perf_counter() - eval_start,
      "real_timesteps": real_timesteps,
      "padded_timesteps": padded_timesteps,
      "sequences_per_s": plan_summary["num_examples"] / progress.epoch_seconds,
      "steps": steps_done,
    }
    improved = val["loss"] < progress.best_val_loss
    if improved:
      progress.best_val_loss, progress.best_epoch = val["loss"], epoch
      if epoch not in best_manager.all_steps():  # a resumed run may have saved it already
        best_manager.save(epoch, args=ocp.args.StandardSave(state.params))
    progress.history.append(row | {"best_epoch": progress.best_epoch})
    logger.write(progress.history[-1])
    if is_chief:
      log.info(
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
    )
    save_checkpoint(latest_manager, state, progress, plan)
    compiles_expected = CompileCounter.count()
    if stop:
      break

  latest_manager.wait_until_finished()
  best_manager.wait_until_finished()
  logger.close()
  summary = _summary(config, plan, compiled, progress, evals, eval_plans, best_manager, state, mesh)
  if is_chief:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _account(progress: Progress, pending, plan: bucketing.BucketPlan, bar) -> None:
  """Reads a finished step's metrics (one step late, so the host never waits on the device)."""
  step_info, step_metrics = pending
  values = jax.device_get(step_metrics)
  if not np.isfinite(values["loss"]):
    raise FloatingPointError(
      f"loss is {values['loss']} at epoch {step_info.epoch}, step {step_info.step} "
      f"(bucket {step_info.bucket}, length bound {plan.upper_bounds[step_info.bucket]})"
    )
  progress.epoch_train_loss_sum += float(values["loss_sum"])
  progress.epoch_train_weight += float(values["weight"])
  if bar is not None:
    bar.update(step_info.step + 1 - bar.n)
    seconds = bar.format_dict["elapsed"]
    sequences = progress.epoch_train_weight
    bar.set_postfix(loss=f"{values['loss']:.3f}", seq_per_s=f"{sequences / max(seconds, 1e-9):.1f}")


def _prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
  """Assembles the next batches on a host thread while the device runs the current step."""
  import concurrent.futures

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    queue = []
    sentinel = object()
    next_item = lambda: next(iterator, sentinel)
    for _ in range(depth):
      queue.append(pool.submit(next_item))
    while True:
      item = queue.pop(0).result()
      if item is sentinel:
        return
      queue.append(pool.submit(next_item))
      yield item


def _summary(config, plan, compiled, progress, evals, eval_plans, best_manager, state, mesh):
  best = progress.history[progress.best_epoch] if progress.best_epoch >= 0 else {}
  summary = {
    "num_buckets": plan.num_buckets,
    "upper_bounds": plan.upper_bounds.tolist(),
    "batch_sizes": plan.batch_sizes.tolist(),
    "strategy": plan.strategy,
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "train_compiles": len(compiled.train),
    "eval_compiles": len(compiled.eval),
    "compile_time_s": compiled.seconds,
    "train_time_s": sum(row["epoch_time_s"] for row in progress.history),
    "epochs": len(progress.history),
    "best_epoch": progress.best_epoch,
    "best_val_loss": best.get("val_loss"),
    "best_val_cer": best.get("val_cer"),
    "efficiency": plan.summary()["efficiency_with_filler"],
  }
  test_split = config.data.test_split
  if test_split and best_manager.latest_step() is not None:
    params = best_manager.restore(
      best_manager.latest_step(),
      args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state.params)),
    )
    test = evaluate(params, evals[test_split], eval_plans[test_split], compiled.eval, mesh)
    summary |= {"test_loss": test["loss"], "test_cer": test["cer"], "test_wer": test["wer"]}
  return summary


# ---------------------------------------------------------------------------------------------
# Using a trained model.


def abstract_on(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shapes and dtypes of `tree` placed on `sharding`: a restore target for any topology."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def load_params(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  sharding: jax.sharding.Sharding | None = None,
) -> Any:
  """The best parameters a run in `workdir` saved (by validation loss), on `sharding`.

  The default is this process's first device, whatever topology the run was trained on.
  """
  _, best_manager = checkpoint_managers(pathlib.Path(workdir))
  step = best_manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no best checkpoint under {pathlib.Path(workdir) / 'checkpoints'}")
  params = jax.eval_shape(
    lambda: create_train_state(config, feature_config(config).num_features, 1).params
  )
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return best_manager.restore(step, args=ocp.args.StandardRestore(abstract_on(params, sharding)))


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, split: str
) -> dict[str, float]:
  """Loss, CER and WER of the best checkpoint in `workdir` on any split of the configured data."""
  setup_runtime(config)
  mesh = make_data_mesh()
  validate_config(config, jax.device_count())
  plan_path = pathlib.Path(workdir) / "plan.json"
  if not plan_path.exists():
    raise FileNotFoundError(f"{plan_path} is missing: is {workdir} a training workdir?")
  train_bounds = np.array(json.loads(plan_path.read_text())["upper_bounds"])
  data = load_split(config, split, config.data.eval_limit)
  plan = make_eval_plans(
    train_bounds,
    {split: data},
    config.eval_batch_size,
    config.bucketing.round_to,
    jax.device_count(),
  )[split]
  params = load_params(config, workdir, NamedSharding(mesh, P()))
  num_features = feature_config(config).num_features
  compiled = compile_eval_steps(
    build_model(config).apply, build_ctc_loss(config), params, {split: plan}, mesh, num_features
  )
  return evaluate(params, data, plan, compiled, mesh)


def transcribe(
  params: Any, config: ml_collections.ConfigDict, points: np.ndarray, stroke_end: np.ndarray
) -> str:
  """The greedy transcription of one line of ink: `points [N, 3]` (x, y, t), `stroke_end [N]`."""
  features = features_lib.ink_to_features(points, stroke_end, feature_config(config))
  length = int(bucketing.boundaries.round_up(len(features), config.bucketing.round_to))
  inputs = np.zeros((1, length, features.shape[1]), np.float32)
  inputs[0, : len(features)] = features
  paddings = (np.arange(length) >= len(features)).astype(np.float32)[None]
  model = build_model(config)
  logits = jax.jit(functools.partial(model.apply, train=False))(
    {"params": params}, inputs, paddings
  )
  ids, lengths = ctc.greedy_decode(logits, paddings)
  return ALPHABET.decode(np.asarray(ids[0, : int(lengths[0])]))


if __name__ == "__main__":
  from absl import app, flags
  from absl import logging as absl_logging
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file", lock_config=True
  )
  _WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go", required=True)
  _MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "train, or evaluate a run")
  _SPLIT = flags.DEFINE_string("split", "test", "the split --mode=evaluate scores")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax's INFO lines out of the way
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if _MODE.value == "train":
      summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      summary = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _SPLIT.value)
    print(json.dumps(summary, indent=2))

  app.run(main)
