"""A run's Orbax checkpoints and what they are checked against on the way back.

`Checkpoints` writes the latest train state with its `Progress` (the position in the epoch
schedule, the history) and the best epoch's parameters, and reads them back verified: a damaged
step (truncated, zeroed or missing files, values that no longer match their SHA-256) is told apart
from a checkpoint of another model or another schedule (`CheckpointMismatchError`, naming the
config field or what differs).
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils

import bucketing
import cli_errors

# A child of the trainer's logger, so that the command line's handler prints its warnings.
LOG = logging.getLogger("train.checkpoints")


@dataclasses.dataclass
class Progress:
  """Everything besides the parameters that a resumed run needs to continue exactly."""

  epoch: int = 0
  step_in_epoch: int = 0
  history: list = dataclasses.field(default_factory=list)
  # What chose `best_epoch` (its scores are its `history` row). Checkpoints written before the
  # metric could be chosen were selected by the validation loss.
  selection_metric: str = "val_loss"
  best_epoch: int = -1
  epoch_train_loss_sum: float = 0.0
  epoch_train_weight: float = 0.0
  epoch_seconds: float = 0.0  # training, not waiting for compiles
  epoch_compile_wait_seconds: float = 0.0


class Checkpoints:
  """A run's Orbax checkpoints: `checkpoints/train` holds the latest state with its position in
  the schedule and what fixes that schedule (`_schedule`: the training lines, bounds, batches and
  seed), `checkpoints/best` the parameters of the best epoch.

  A latest-state checkpoint also records the state's shapes, a SHA-256 of its values and the
  config fields that shape the model (`shape_fields`, when given), so a restore can tell a
  damaged checkpoint (truncated, zeroed or missing files: fall back to an older step) from a run
  started with another model (name the config field).
  """

  def __init__(
    self,
    workdir: str | pathlib.Path,
    shape_fields: dict | None = None,
    seed: int | None = None,
    create: bool = True,
  ):
    """`shape_fields`: the config fields that decide the state's shapes, as
    {"model.hidden_size": 128, ...}; `seed`: the schedule's. `create=False` reads a run without
    creating its folders (a mistyped workdir stays absent)."""
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.shape_fields = shape_fields
    self.seed = seed
    self.best_selected_by: str | None = None  # the metric that chose the restored best
    self.latest = ocp.CheckpointManager(
      self.directory / "train", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create)
    )
    # Two: a resume that falls back past a best epoch (`align_best`) keeps the one before.
    self.best = ocp.CheckpointManager(
      self.directory / "best", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create)
    )

  def save_latest(self, state: TrainState, progress: Progress, plan: bucketing.BucketPlan) -> None:
    meta = dataclasses.asdict(progress) | {
      "schedule": _schedule(plan, self.seed),
      "shapes": _shapes(state),
      "sha256": _fingerprint(state),
      "shape_config": self.shape_fields,
    }
    self.latest.save(
      int(jax.device_get(state.step)),
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(meta)),
    )

  def restore_latest(
    self, target: TrainState, plan: bucketing.BucketPlan | None = None
  ) -> tuple[TrainState, Progress]:
    """The newest intact state (shaped and placed like `target`) and its progress; `target` and a
    fresh `Progress` when there is none.

    A damaged step is named in a warning and set aside under `checkpoints/damaged/` once an older
    intact one is found; when none is intact, a ValueError names them all. Another schedule
    (with `plan`: other training lines, bounds, batches or seed) or other model shapes are a
    `CheckpointMismatchError` naming what differs.
    """
    damaged = {}
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        state, meta = self._read_latest(step, target, plan)
      except CheckpointMismatchError:
        raise
      except Exception as error:  # Orbax and TensorStore raise bare Exceptions for bad files.
        damaged[step] = _reason(error)
        LOG.warning(
          "checkpoint step %d in %s is damaged: %s", step, self.latest.directory, damaged[step]
        )
        continue
      if damaged:
        self._set_aside(damaged, step)
      return state, Progress(**meta)
    if damaged:
      raise ValueError(
        f"no intact checkpoint in {self.latest.directory}: "
        + "; ".join(f"step {step}: {reason}" for step, reason in damaged.items())
        + f"; move {self.directory} away to start afresh"
      )
    return target, Progress()

  def _read_latest(self, step: int, target: TrainState, plan: bucketing.BucketPlan | None):
    """The state and progress fields of `step`, verified; raises on anything wrong."""
    meta = dict(
      self.latest.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))[
        "progress"
      ]
    )
    meta.pop("best_val_loss", None)  # older checkpoints: the best epoch's, which history holds
    # Older checkpoints recorded only the bounds of the schedule.
    schedule = meta.pop("schedule", None) or {"upper_bounds": meta.pop("upper_bounds")}
    if plan is not None:
      self._check_schedule(schedule, _schedule(plan, self.seed))
    shapes, digest, saved_fields = (
      meta.pop(key, None) for key in ("shapes", "sha256", "shape_config")
    )
    if shapes is not None and shapes != _shapes(target):
      raise CheckpointMismatchError(self._shape_mismatch(shapes, _shapes(target), saved_fields))
    restored = self.latest.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_on(target)))
    )["state"]
    _check_intact(restored, digest)
    return restored, meta

  def _check_schedule(self, saved: dict, planned: dict) -> None:
    """Resuming mid-epoch continues the saved epoch's batches: anything that fixes them (the
    training lines, bounds, batch sizes, seed) must be what this run plans, or the epoch would
    skip some lines and repeat others."""
    differs = [
      key
      for key in _SCHEDULE_FIELDS
      if saved.get(key) is not None and planned[key] is not None and saved[key] != planned[key]
    ]
    if not differs:
      return
    key = differs[0]
    there, here = saved[key], planned[key]
    what = {
      "num_examples": f"on {there} training lines, but this run has {here}",
      "examples_sha256": (
        f"on other training lines than this run's (as many: {planned['num_examples']})"
      ),
      "upper_bounds": f"with bucket bounds {there}, but this run plans {here}",
      "batch_sizes": f"with batches of {there} lines per bucket, but this run plans {here}",
      "seed": f"with config.seed={there}, but this run has config.seed={here}",
    }[key]
    raise CheckpointMismatchError(
      f"the checkpoint in {self.latest.directory} was trained {what}; use the same config or a "
      "new workdir"
    )

  def _shape_mismatch(self, saved: dict, wanted: dict, saved_fields: dict | None) -> str:
    there, here = saved_fields or {}, self.shape_fields or {}
    differing = cli_errors.differences(there, here, there.keys() & here.keys(), prefix="config.")
    leaf = _first_differing_leaf(saved, wanted)
    what = "; ".join(differing) or f"{leaf}: {saved.get(leaf)} there, {wanted.get(leaf)} here"
    return (
      f"the checkpoint in {self.latest.directory} holds a model of other shapes ({what}); "
      "use the same config or a new workdir"
    )

  def _set_aside(self, damaged: dict[int, str], intact: int) -> None:
    """Moves damaged steps out of Orbax's sight (so the step can be saved again), keeping them."""
    if jax.process_index() == 0:
      aside = self.directory / "damaged"
      aside.mkdir(exist_ok=True)
      for step in damaged:
        (self.latest.directory / str(step)).rename(aside / f"train-{step}-{time.time_ns()}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    self.latest.reload()
    LOG.warning(
      "resuming from step %d instead; damaged step(s) %s moved to %s",
      intact,
      ", ".join(map(str, damaged)),
      self.directory / "damaged",
    )

  def save_best(self, epoch: int, params: Any, selected_by: str) -> None:
    """Saves the best epoch's parameters once the latest state in flight is on disk: call it after
    `save_latest` of the state that names the epoch best, so that a kill between the two leaves a
    state whose best `align_best` can save again, never best parameters with no state."""
    self.latest.wait_until_finished()
    integrity = {
      "shapes": _shapes(params),
      "sha256": _fingerprint(params),
      "selected_by": selected_by,
    }
    self.best.save(
      epoch,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), integrity=ocp.args.JsonSave(integrity)
      ),
    )

  def align_best(self, progress: Progress, params: Any) -> None:
    """Makes `checkpoints/best` agree with the `progress` a run resumes from, whose state holds
    `params`. Deletes the best parameters of epochs after its best epoch: the resume trains them
    again (its newest state was damaged, or older checkpoints were written in the other order),
    and they may not end as they did; kept, they would pass for the run's best. Saves the best
    epoch's parameters again when they are missing and the resume starts at that epoch's end
    (killed between `save_latest` and `save_best`): `params` are then exactly them. Every process
    calls it (saving and deleting are collective)."""
    self.best.wait_until_finished()
    for step in self.best.all_steps():
      if step > progress.best_epoch:
        self.best.delete(step)
        LOG.warning(
          "deleted the best parameters of epoch %d in %s: the resumed run trains it again",
          step,
          self.best.directory,
        )
    at_its_end = progress.epoch == progress.best_epoch + 1 and progress.step_in_epoch == 0
    if progress.best_epoch >= 0 and progress.best_epoch not in self.best.all_steps() and at_its_end:
      self.save_best(progress.best_epoch, params, progress.selection_metric)
      LOG.warning(
        "saved the best parameters of epoch %d again in %s, from the state at its end",
        progress.best_epoch,
        self.best.directory,
      )

  def restore_best(self, target: Any) -> Any | None:
    """The best parameters, shaped and placed like `target` (arrays or abstract); None if none.
    `best_selected_by` then names the metric that chose them.

    Raises a ValueError naming the checkpoint when its files are damaged or its values differ
    from the SHA-256 written with them (checkpoints from before that was written load unchecked).
    """
    self.best.wait_until_finished()  # a save in flight sits in a temporary folder until then
    step = self.best.latest_step()
    if step is None:
      return None
    where = self.best.directory / str(step)
    if not (where / "params").exists():  # written before the checksum: chosen by the loss
      self.best_selected_by = "val_loss"
      return self.best.restore(step, args=ocp.args.StandardRestore(abstract_on(target)))
    try:
      integrity = self.best.restore(
        step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore())
      )["integrity"]
    except Exception as error:  # Orbax and TensorStore raise bare Exceptions for bad files.
      raise ValueError(f"the best checkpoint {where} is damaged: {_reason(error)}") from error
    wanted = _shapes(target)
    leaf = _first_differing_leaf(integrity["shapes"], wanted)
    if leaf is not None:
      raise CheckpointMismatchError(
        f"the best checkpoint {where} holds a model of other shapes ({leaf}: "
        f"{integrity['shapes'].get(leaf)} there, {wanted[leaf]} here); use the config it was "
        "trained with"
      )
    try:
      params = self.best.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_on(target)))
      )["params"]
      _check_intact(params, integrity["sha256"])
    except Exception as error:
      raise ValueError(f"the best checkpoint {where} is damaged: {_reason(error)}") from error
    self.best_selected_by = integrity.get("selected_by", "val_loss")  # older ones: by the loss
    return params

  def read_latest_params(self, target: TrainState) -> tuple[Any, dict]:
    """The newest latest-state checkpoint's parameters and where they are from (`global_step`,
    `epoch`), read without touching the workdir (no damaged step set aside, as `restore_latest`
    does for training)."""
    step = self.latest.latest_step()
    if step is None:
      raise FileNotFoundError(f"no latest checkpoint under {self.latest.directory}")
    try:
      state, meta = self._read_latest(step, target, None)
    except CheckpointMismatchError:
      raise
    except Exception as error:  # Orbax and TensorStore raise bare Exceptions for bad files.
      raise ValueError(
        f"checkpoint step {step} in {self.latest.directory} is damaged: {_reason(error)}"
      ) from error
    return state.params, {"global_step": int(step), "epoch": int(meta["epoch"])}

  def close(self) -> None:
    """Waits for the saves in flight, then stops Orbax's background threads."""
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      manager.close()


class CheckpointMismatchError(ValueError):
  """A checkpoint that reads fine but belongs to another config: no older step would fit."""


def _shapes(tree: Any) -> dict[str, list[int]]:
  return {
    jax.tree_util.keystr(path): list(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _first_differing_leaf(saved: dict, wanted: dict) -> str | None:
  """The first leaf path (`_shapes` keys) whose saved shape is not the wanted one, if any."""
  return next((path for path in wanted if saved.get(path) != wanted[path]), None)


_SCHEDULE_FIELDS = ("num_examples", "examples_sha256", "upper_bounds", "batch_sizes", "seed")


def _schedule(plan: bucketing.BucketPlan, seed: int | None) -> dict:
  """What fixes every epoch's batches (`bucketing.epoch_batches`), as JSON: the training lines
  (count, and a SHA-256 of their names and lengths), the bounds, batch sizes and seed."""
  names = [plan.example_name(index) for index in range(len(plan.lengths))]
  lines = [names, plan.lengths.tolist()]
  return {
    "num_examples": len(plan.lengths),
    "examples_sha256": hashlib.sha256(json.dumps(lines).encode()).hexdigest(),
    "upper_bounds": plan.upper_bounds.tolist(),
    # Real lines per batch: a bucket smaller than its batch gets another count of filler rows on
    # another device count, but the same batches of lines.
    "batch_sizes": np.minimum(plan.batch_sizes, plan.bucket_sizes).tolist(),
    "seed": seed,
  }


def _fingerprint(tree: Any) -> str:
  """SHA-256 of every leaf's values (this process's first shard: the state is replicated)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    digest.update(np.asarray(leaf.addressable_shards[0].data).tobytes())
  return digest.hexdigest()


def _reason(error: BaseException) -> str:
  """What went wrong reading a checkpoint, on one line: the innermost cause, which names the file
  and the fault (Orbax's own wrapper only says which array index it was reading)."""
  while error.__cause__ is not None:
    error = error.__cause__
  return cli_errors.one_line(error)[:300]


# After a restore fails on a damaged file, Orbax's other reads of that checkpoint go on failing
# on its threads and report through `sys.unraisablehook` and the asyncio logger, tracebacks that
# would follow (or cut into) the one error the restore already raised. train.py's command line
# drops just those with these filters.
_ORBAX_READS = ("_read_array_index_and_device_put", "async_deserialize", "orbax/checkpoint/")


def _is_orbax_read_noise(error: BaseException | None, source: Any) -> bool:
  closed_loop = isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
  return closed_loop or any(read in repr(source) for read in _ORBAX_READS)


def unless_orbax_read_noise(hook):
  """`hook` (a `sys.unraisablehook`), dropping the errors of Orbax's leftover reads."""

  def filtered(unraisable) -> None:
    if not _is_orbax_read_noise(unraisable.exc_value, unraisable.object):
      hook(unraisable)

  return filtered


def not_orbax_read_noise(record: logging.LogRecord) -> bool:
  """An asyncio-logger filter: False for an Orbax read's "exception was never retrieved"."""
  error = record.exc_info[1] if record.exc_info else None
  return not _is_orbax_read_noise(error, record.getMessage())


def _check_intact(restored: Any, digest: str | None) -> None:
  """Raises when restored values differ from their saved SHA-256 or are not finite."""
  if digest is not None and digest != _fingerprint(restored):
    raise ValueError("its values do not match the SHA-256 written when it was saved")
  for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
    values = np.asarray(leaf.addressable_shards[0].data)
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
      raise ValueError(f"{jax.tree_util.keystr(path)} holds NaN or inf")


def abstract_on(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Shapes and dtypes of `tree` placed on `sharding` (default: where each leaf is): a restore
  target for any topology, and what lowering needs (no buffers, which training donates)."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding or x.sharding, weak_type=x.weak_type
    ),
    tree,
  )
