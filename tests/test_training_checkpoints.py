"""Checkpoints read back what was saved, or say why not: a damaged step is named as damaged, a
checkpoint of another model or another schedule as a mismatch naming what differs."""

import contextlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

import bucketing
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


@pytest.mark.parametrize("how", ["truncate", "zero", "delete", "other values"])
def test_a_damaged_best_checkpoint_is_an_error_naming_it_not_wrong_parameters(tmp_path, how):
  params = {"dense": {"kernel": jnp.arange(4096.0).reshape(64, 64), "bias": jnp.ones(64)}}
  best = saved_best(tmp_path / "run", params)
  jax.tree.map(np.testing.assert_array_equal, restored_best(tmp_path / "run", params), params)
  if how == "other values":  # every file reads fine: only the checksum can tell
    other = saved_best(tmp_path / "other", jax.tree.map(lambda leaf: leaf + 1, params))
    shutil.rmtree(best / "params")
    shutil.copytree(other / "params", best / "params")
  else:
    damage(best / "params", how)
  with pytest.raises(ValueError, match=rf"the best checkpoint {re.escape(str(best))} is damaged"):
    restored_best(tmp_path / "run", params)


def small_state(scale: float, step: int = 0) -> TrainState:
  params = {"kernel": scale * jnp.arange(12.0).reshape(3, 4), "bias": jnp.full(4, scale)}
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
