"""Checkpoints read back what was saved, or say why not: a damaged step is named as damaged, a
checkpoint of another model or another schedule as a mismatch naming what differs."""

import contextlib
import logging
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training.train_state import TrainState

import bucketing
from training import checkpoints as checkpoints_lib
from training.checkpoints import CheckpointMismatchError, Checkpoints, Progress


def damage(step_dir, how):
  """Truncates, zeroes (same size) or deletes every data file of a checkpoint step (the files of
  its OCDBT `d/` folders, which hold the arrays). Damaging only the largest file once left a step
  that still read back (one full-suite run, the machine loaded): its arrays span several files."""
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  data = [p for p in files if p.parent.name == "d"]
  for path in data or [max(files, key=lambda p: p.stat().st_size)]:
    size = path.stat().st_size
    if how == "truncate":
      path.write_bytes(path.read_bytes()[: size // 2])
    elif how == "zero":
      path.write_bytes(bytes(size))
    else:
      path.unlink()


def saved_best(workdir, params):
  with contextlib.closing(Checkpoints(workdir)) as checkpoints:
    checkpoints.save_best(3, params, "val_loss")
  return workdir / "checkpoints" / "best" / "3"


def restored_best(workdir, target):
  with contextlib.closing(Checkpoints(workdir)) as checkpoints:
    return checkpoints.restore_best(target)


def test_the_best_checkpoint_reads_back_while_its_save_is_in_flight(tmp_path):
  # What the test split does at the end of training: restore what was just saved, asynchronously.
  params = {"dense": {"kernel": jnp.arange(4096.0).reshape(64, 64), "bias": jnp.ones(64)}}
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_best(3, params, "val_loss")
    jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_best(params), params)


def test_a_best_checkpoint_of_another_model_names_the_shapes_not_damage(tmp_path):
  params = {"dense": {"kernel": jnp.zeros((64, 64)), "bias": jnp.ones(64)}}
  saved_best(tmp_path, params)
  other = {"dense": {"kernel": jnp.zeros((64, 32)), "bias": jnp.ones(32)}}
  with pytest.raises(CheckpointMismatchError, match=r"\['bias'\]: \[64\] there, \[32\] here"):
    restored_best(tmp_path, other)


@pytest.mark.parametrize("how", ["truncate", "zero", "delete", "other values", "no checksum"])
def test_a_damaged_best_checkpoint_is_an_error_naming_it_not_wrong_parameters(tmp_path, how):
  params = {"dense": {"kernel": jnp.arange(4096.0).reshape(64, 64), "bias": jnp.ones(64)}}
  best = saved_best(tmp_path / "run", params)
  jax.tree.map(np.testing.assert_array_equal, restored_best(tmp_path / "run", params), params)
  if how == "other values":  # every file reads fine: only the checksum can tell
    other = saved_best(tmp_path / "other", jax.tree.map(lambda leaf: leaf + 1, params))
    shutil.rmtree(best / "params")
    shutil.copytree(other / "params", best / "params")
  elif how == "no checksum":  # the record of its SHA-256 and shapes is lost
    damage(best / "integrity", "delete")
  else:
    damage(best / "params", how)
  with pytest.raises(ValueError, match=rf"the best checkpoint {re.escape(str(best))} is damaged"):
    restored_best(tmp_path / "run", params)


def small_state(scale: float, step: int = 0, units: int = 4) -> TrainState:
  """A one-layer model of `units` units, its parameters scaled by `scale`."""
  params = {
    "kernel": scale * jnp.arange(3.0 * units).reshape(3, units),
    "bias": jnp.full(units, scale),
  }
  state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
  return state.replace(step=jnp.asarray(step))


def plan_of(batch_size: int) -> bucketing.BucketPlan:
  lengths = np.array([5, 9, 13, 17, 21, 25])
  return bucketing.make_plan(lengths, strategy="none", batch_size=batch_size, num_devices=1)


def test_the_latest_state_and_progress_read_back_as_saved(tmp_path):
  saved = small_state(2.0, step=7)
  progress = Progress(epoch=1, step_in_epoch=2, history=[{"epoch": 0, "val_loss": 3.5}])
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_latest(saved, progress, plan_of(2))
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored, restored_progress = checkpoints.restore_latest(small_state(0.0), plan_of(2))
  jax.tree.map(np.testing.assert_array_equal, restored.params, saved.params)
  assert int(restored.step) == 7 and restored_progress == progress


def test_no_latest_checkpoint_gives_back_the_target_and_a_fresh_progress(tmp_path):
  fresh = small_state(1.0)
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    assert checkpoints.restore_latest(fresh, plan_of(2)) == (fresh, Progress())


def test_the_latest_state_of_another_schedule_is_a_mismatch_not_damage(tmp_path):
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_latest(small_state(2.0, step=1), Progress(), plan_of(2))
  with (
    contextlib.closing(Checkpoints(tmp_path)) as checkpoints,
    pytest.raises(CheckpointMismatchError, match=r"batches of \[2\] lines .* plans \[3\]"),
  ):
    checkpoints.restore_latest(small_state(0.0), plan_of(3))


def test_the_checksum_covers_every_leaf():
  state = small_state(2.0)
  changed = state.replace(params=state.params | {"kernel": state.params["kernel"].at[2, 3].add(1)})
  assert jax.tree.leaves(state.params)[-1] is state.params["kernel"]  # the last leaf changed
  assert checkpoints_lib._fingerprint(changed) != checkpoints_lib._fingerprint(state)


def test_the_newest_of_the_kept_best_checkpoints_is_restored(tmp_path):
  params = {"kernel": jnp.zeros((2, 2))}
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_best(0, params, "val_loss")
    checkpoints.save_best(1, jax.tree.map(lambda leaf: leaf + 1, params), "val_cer")
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored = checkpoints.restore_best(params)
    assert checkpoints.best_selected_by == "val_cer"
  np.testing.assert_array_equal(restored["kernel"], np.ones((2, 2)))


def saved_steps(workdir, plan=None, seed=None):
  """Latest states of steps 1 and 2, at positions 1 and 2 of epoch 0, scaled 1 and 2."""
  with contextlib.closing(Checkpoints(workdir, seed=seed)) as checkpoints:
    for step in (1, 2):
      progress = Progress(epoch=0, step_in_epoch=step)
      checkpoints.save_latest(small_state(float(step), step=step), progress, plan or plan_of(2))


def test_the_newest_of_several_latest_states_is_restored(tmp_path):
  saved_steps(tmp_path)
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored, progress = checkpoints.restore_latest(small_state(0.0), plan_of(2))
  assert int(restored.step) == 2 and progress.step_in_epoch == 2
  np.testing.assert_array_equal(restored.params["bias"], [2.0] * 4)


def test_a_damaged_newest_state_falls_back_to_the_older_one_and_is_set_aside(tmp_path):
  saved_steps(tmp_path)
  damage(tmp_path / "checkpoints" / "train" / "2" / "state", "truncate")
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored, progress = checkpoints.restore_latest(small_state(0.0), plan_of(2))
    assert checkpoints.latest.all_steps() == [1]
  assert int(restored.step) == 1 and progress.step_in_epoch == 1
  np.testing.assert_array_equal(restored.params["bias"], [1.0] * 4)
  assert [p.name.split("-")[:2] for p in (tmp_path / "checkpoints" / "damaged").iterdir()] == [
    ["train", "2"]
  ]


def test_the_latest_state_of_another_seed_is_a_mismatch(tmp_path):
  saved_steps(tmp_path, seed=1)
  with (
    contextlib.closing(Checkpoints(tmp_path, seed=2)) as checkpoints,
    pytest.raises(CheckpointMismatchError, match=r"config.seed=1, but this run has config.seed=2"),
  ):
    checkpoints.restore_latest(small_state(0.0), plan_of(2))


def test_the_latest_state_of_other_bounds_with_the_same_batches_is_a_mismatch(tmp_path):
  # Bounds 10 and 30, or 12 and 30: the same buckets of 2 and 4 lines, in batches of 2.
  lengths = [5, 9, 13, 17, 21, 25]
  saved_steps(tmp_path, fixed_plan(lengths, [10, 30]))
  with (
    contextlib.closing(Checkpoints(tmp_path)) as checkpoints,
    pytest.raises(
      CheckpointMismatchError, match=r"bounds \[10, 30\], but this run plans \[12, 30\]"
    ),
  ):
    checkpoints.restore_latest(small_state(0.0), fixed_plan(lengths, [12, 30]))


def test_a_resume_on_more_devices_with_the_same_batches_of_lines_is_no_mismatch(tmp_path):
  # 6 lines in batches of 8: 6 rows on one device, 6 and 2 filler rows on 4; the same lines.
  plan_on = lambda devices: bucketing.make_plan(
    np.array([5, 9, 13, 17, 21, 25]), strategy="none", batch_size=8, num_devices=devices
  )
  assert (plan_on(1).batch_sizes.tolist(), plan_on(4).batch_sizes.tolist()) == ([6], [8])
  saved_steps(tmp_path, plan_on(1))
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored, _ = checkpoints.restore_latest(small_state(0.0), plan_on(4))
  assert int(restored.step) == 2


def test_aligning_the_best_deletes_only_the_epochs_after_the_best(tmp_path):
  params = {"bias": jnp.ones(4)}
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_best(1, params, "val_loss")
    checkpoints.save_best(2, jax.tree.map(lambda leaf: leaf + 1, params), "val_loss")
    checkpoints.align_best(Progress(epoch=2, step_in_epoch=5, best_epoch=1), params)
    assert checkpoints.best.all_steps() == [1]
    jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_best(params), params)


@pytest.mark.parametrize(
  ("progress", "saved"),
  [
    # Killed between `save_latest` at the end of epoch 1, its best, and `save_best`.
    (Progress(epoch=2, step_in_epoch=0, best_epoch=1, selection_metric="val_cer"), [1]),
    (Progress(epoch=2, step_in_epoch=3, best_epoch=1), []),  # mid-epoch 2: not epoch 1's
    (Progress(epoch=3, step_in_epoch=0, best_epoch=1), []),  # epoch 2's end: epoch 2's params
    (Progress(), []),  # no epoch trained: no best to save
  ],
  ids=["at-its-end", "mid-next-epoch", "a-later-end", "no-best-yet"],
)
def test_aligning_saves_a_missing_best_only_from_the_state_at_its_epochs_end(
  tmp_path, progress, saved
):
  params = {"bias": jnp.full(4, 3.0)}
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.align_best(progress, params)
    assert checkpoints.best.all_steps() == saved
    if saved:
      jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_best(params), params)
      assert checkpoints.best_selected_by == progress.selection_metric


def fixed_plan(lengths, upper_bounds=(10, 30)) -> bucketing.BucketPlan:
  return bucketing.make_plan(
    np.array(lengths), strategy="fixed", upper_bounds=list(upper_bounds), batch_size=2
  )


@pytest.mark.parametrize(
  ("resumed_lengths", "message"),
  [
    # One length changed (features built another way), the bounds and batches alike.
    ([6, 9, 13, 17, 21, 25], r"trained on other training lines than this run's \(as many: 6\)"),
    # One line fewer, the bounds and batches alike.
    ([5, 9, 13, 17, 21], r"trained on 6 training lines, but this run has 5"),
  ],
  ids=["a-length-changed", "a-line-fewer"],
)
def test_the_latest_state_of_other_training_lines_is_a_mismatch_naming_them(
  tmp_path, resumed_lengths, message
):
  saved_steps(tmp_path, fixed_plan([5, 9, 13, 17, 21, 25]))
  resumed = fixed_plan(resumed_lengths)
  assert resumed.upper_bounds.tolist() == [10, 30] and resumed.batch_sizes.tolist() == [2, 2]
  with (
    contextlib.closing(Checkpoints(tmp_path)) as checkpoints,
    pytest.raises(CheckpointMismatchError, match=message),
  ):
    checkpoints.restore_latest(small_state(0.0), resumed)


def test_a_latest_state_holding_nan_is_damaged_and_the_older_one_restored(tmp_path):
  # A run that diverged: the checksum matches its NaN value, which no resume can train on.
  diverged = small_state(2.0, step=2)
  diverged = diverged.replace(params=diverged.params | {"bias": jnp.array([2.0, np.nan, 2.0, 2.0])})
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_latest(small_state(1.0, step=1), Progress(step_in_epoch=1), plan_of(2))
    checkpoints.save_latest(diverged, Progress(step_in_epoch=2), plan_of(2))
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored, progress = checkpoints.restore_latest(small_state(0.0), plan_of(2))
  assert int(restored.step) == 1 and progress.step_in_epoch == 1
  np.testing.assert_array_equal(restored.params["bias"], [1.0] * 4)


def test_the_newest_latest_parameters_are_read_with_their_step_and_epoch(tmp_path):
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.save_latest(
      small_state(1.0, step=4), Progress(epoch=0, step_in_epoch=4), plan_of(2)
    )
    checkpoints.save_latest(
      small_state(2.0, step=9), Progress(epoch=1, step_in_epoch=3), plan_of(2)
    )
  with contextlib.closing(Checkpoints(tmp_path, create=False)) as checkpoints:
    params, origin = checkpoints.read_latest_params(small_state(0.0))
  assert origin == {"global_step": 9, "epoch": 1}
  np.testing.assert_array_equal(params["bias"], [2.0] * 4)


def test_a_latest_state_of_another_model_names_only_the_config_fields_that_differ(tmp_path):
  # The checkpoint predates `model.num_layers` among the shape fields: that one is not named.
  with contextlib.closing(Checkpoints(tmp_path, shape_fields={"model.hidden_size": 4})) as saving:
    saving.save_latest(small_state(1.0, step=1), Progress(), plan_of(2))
  fields = {"model.hidden_size": 8, "model.num_layers": 1}
  with (
    contextlib.closing(Checkpoints(tmp_path, shape_fields=fields)) as checkpoints,
    pytest.raises(
      CheckpointMismatchError,
      match=r"other shapes \(config\.model\.hidden_size=4 there, 8 here\); use the same config",
    ),
  ):
    checkpoints.restore_latest(small_state(0.0, units=8), plan_of(2))


def test_no_best_checkpoint_restores_as_none(tmp_path):
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    assert checkpoints.restore_best({"bias": jnp.ones(4)}) is None


def test_reading_the_latest_parameters_of_no_run_says_there_are_none(tmp_path):
  with (
    contextlib.closing(Checkpoints(tmp_path, create=False)) as checkpoints,
    pytest.raises(FileNotFoundError, match=r"no latest checkpoint under .*checkpoints/train"),
  ):
    checkpoints.read_latest_params(small_state(0.0))


def test_reading_the_latest_parameters_of_another_model_is_a_mismatch_not_damage(tmp_path):
  saved_steps(tmp_path)
  with (
    contextlib.closing(Checkpoints(tmp_path, create=False)) as checkpoints,
    pytest.raises(CheckpointMismatchError, match=r"other shapes \(\.params\['bias'\]: \[4\] there"),
  ):
    checkpoints.read_latest_params(small_state(0.0, units=8))


def test_a_restore_target_is_placed_on_the_sharding_asked_for():
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = checkpoints_lib.abstract_on({"bias": jnp.ones(4)}, sharding)
  assert abstract["bias"].sharding == sharding and abstract["bias"].shape == (4,)


def test_only_the_errors_of_orbaxs_leftover_reads_are_dropped():
  reported = []
  hook = checkpoints_lib.unless_orbax_read_noise(reported.append)
  leftover_read = types.SimpleNamespace(
    exc_value=OSError("short read"), object="<function _read_array_index_and_device_put>"
  )
  closed_loop = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
  ours = types.SimpleNamespace(exc_value=ValueError("a bug of ours"), object="<function step>")
  for unraisable in (leftover_read, closed_loop, ours):
    hook(unraisable)
  assert reported == [ours]
  log = lambda message: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (), None)
  orbax_task = log("Task exception was never retrieved: <Task orbax/checkpoint/serialization.py>")
  assert not checkpoints_lib.not_orbax_read_noise(orbax_task)
  assert checkpoints_lib.not_orbax_read_noise(log("Task exception was never retrieved: <Task x>"))


def test_a_damaged_checkpoints_reason_is_the_innermost_error_naming_the_file():
  try:
    try:
      raise OSError("checkpoints/train/2/state/d/1f2e: short read\nat offset 512")
    except OSError as cause:
      raise ValueError("error reading array index 3") from cause
  except ValueError as error:
    reason = checkpoints_lib._reason(error)
  assert reason == "checkpoints/train/2/state/d/1f2e: short read; at offset 512"


def test_a_latest_state_in_the_first_format_still_resumes(tmp_path):
  # The first checkpoints (95fc13e) recorded the best validation loss, and of the schedule only
  # its bounds; no selection metric, compile waits, shapes or checksum.
  meta = {"epoch": 1, "step_in_epoch": 2, "history": [{"val_loss": 9.5}], "best_val_loss": 9.5}
  meta |= {"best_epoch": 0, "epoch_train_loss_sum": 3.0, "epoch_train_weight": 2.0}
  meta |= {"epoch_seconds": 1.5, "upper_bounds": plan_of(2).upper_bounds.tolist()}
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.latest.save(
      4,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(small_state(1.0, step=4)), progress=ocp.args.JsonSave(meta)
      ),
    )
  with contextlib.closing(Checkpoints(tmp_path, seed=0)) as checkpoints:
    restored, progress = checkpoints.restore_latest(small_state(0.0), plan_of(2))
  jax.tree.map(np.testing.assert_array_equal, restored.params, small_state(1.0).params)
  assert progress == Progress(
    epoch=1,
    step_in_epoch=2,
    history=[{"val_loss": 9.5}],
    best_epoch=0,
    epoch_train_loss_sum=3.0,
    epoch_train_weight=2.0,
    epoch_seconds=1.5,
  )


def test_a_best_checkpoint_written_before_its_checksum_loads_as_chosen_by_the_loss(tmp_path):
  params = {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.best.save(2, args=ocp.args.StandardSave(params))  # the parameters alone
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    restored = checkpoints.restore_best(jax.tree.map(jnp.zeros_like, params))
    assert checkpoints.best_selected_by == "val_loss"
  jax.tree.map(np.testing.assert_array_equal, restored, params)
