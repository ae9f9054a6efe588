"""The trainer: one compile per bucket (parallel, overlapped, cached), data-parallel equivalence,
resume, errors, end to end."""

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bucketing
import cli_errors
import train
from experiments import iam, synthetic
from models import ctc
from models import metrics as metrics_lib
from tests.test_models_batch_sharding import assert_kernels_run_per_device
from tests.test_training_checkpoints import damage
from tests.test_training_compilation import Held
from training import compilation
from training.checkpoints import CheckpointMismatchError, Checkpoints, abstract_on

REQUIRED_ROW_KEYS = {
  "epoch",
  "train_loss",
  "val_loss",
  "val_cer",
  "val_wer",
  "epoch_time_s",
  "real_timesteps",
  "padded_timesteps_with_filler",
}
REQUIRED_SUMMARY_KEYS = {
  "num_buckets",
  "upper_bounds",
  "global_step",
  "num_devices",
  "train_compiles",
  "eval_compiles",
  "compiles_dropped",
  "time_to_first_step_s",
  "compile_wall_s",
  "compile_seconds_sum",
  "compilation_cache_hits",
  "compilation_cache_misses",
  "train_time_s",
  "epochs",
  "selection_metric",
  "best_epoch",
  "best_val_loss",
  "best_val_cer",
}


def tiny_config(**overrides):
  config = synthetic.get_config("tiny")  # locked: a misspelt override fails
  config.update_from_flattened_dict(overrides)
  return config


def token_budget(max_tokens):
  return {"bucketing.batch_size": 0, "bucketing.max_tokens": max_tokens}


def latest_checkpoint(config, workdir):
  """The run's latest state, on the first device, and its progress."""
  target = abstract_on(
    jax.eval_shape(lambda: train.create_train_state(config, 3, 1)),
    jax.sharding.SingleDeviceSharding(jax.devices()[0]),
  )
  with contextlib.closing(Checkpoints(workdir)) as checkpoints:
    return checkpoints.restore_latest(target)


def latest_params(config, workdir):
  state, _ = latest_checkpoint(config, workdir)
  return jax.device_get(state.params)


def read_rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_resumed_like(reference_dir, workdir):
  expected = latest_params(tiny_config(), reference_dir)
  got = latest_params(tiny_config(), workdir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), expected, got)
  for ref_row, row in zip(read_rows(reference_dir), read_rows(workdir), strict=True):
    for key in ("epoch", "train_loss", "val_loss", "val_cer", "steps"):
      assert row[key] == pytest.approx(ref_row[key], rel=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A tiny synthetic run from start to end, shared by the tests that inspect a finished run."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def test_tiny_run_writes_everything_a_user_reads(uninterrupted):
  workdir, summary = uninterrupted
  assert set(summary) >= REQUIRED_SUMMARY_KEYS
  assert summary == json.loads((workdir / "summary.json").read_text())
  steps_per_epoch = sum(json.loads((workdir / "plan.json").read_text())["steps_per_epoch"])
  assert summary["global_step"] == summary["epochs"] * steps_per_epoch
  rows = read_rows(workdir)
  assert [row["epoch"] for row in rows] == [0, 1]
  # Each row: the global step at its epoch's end, and the epoch's time, which the total sums.
  assert [row["steps"] for row in rows] == [steps_per_epoch, 2 * steps_per_epoch]
  assert summary["train_time_s"] == pytest.approx(sum(row["epoch_time_s"] for row in rows))
  for row in rows:
    assert set(row) >= REQUIRED_ROW_KEYS
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    assert row["padded_timesteps_with_filler"] >= row["real_timesteps"] > 0
  assert summary["best_val_loss"] == min(row["val_loss"] for row in rows)
  assert rows[1]["train_loss"] < rows[0]["train_loss"]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "checkpoints" / "train").is_dir()
  assert (workdir / "checkpoints" / "best").is_dir()
  plan = json.loads((workdir / "plan.json").read_text())
  assert plan["upper_bounds"] == summary["upper_bounds"]


def test_the_summary_gives_each_buckets_step_memory_its_peak_and_its_mean(uninterrupted):
  workdir, summary = uninterrupted
  per_bucket = summary["train_step_memory_mb"]
  assert len(per_bucket) == summary["num_buckets"] and min(per_bucket) > 0
  assert summary["peak_step_memory_mb"] == max(per_bucket)
  assert per_bucket[summary["peak_step_bucket"]] == summary["peak_step_memory_mb"]
  steps = json.loads((workdir / "plan.json").read_text())["steps_per_epoch"]
  mean = np.average(per_bucket, weights=steps)
  assert summary["mean_step_memory_mb"] == pytest.approx(mean, abs=0.05)
  # Buckets of one batch size, in order of their bounds: a longer one's step holds more.
  pairs = 0
  for batch in set(summary["batch_sizes"]):
    same = [mb for b, mb in zip(summary["batch_sizes"], per_bucket, strict=True) if b == batch]
    assert same == sorted(same)
    pairs += len(same) - 1
  assert pairs >= 1


def test_rows_and_summary_count_the_padding_of_filler_rows_too(uninterrupted):
  """Every step runs a whole batch of its bucket's bound, filler rows included: the padded
  timesteps an epoch computes, against which the efficiency is taken."""
  workdir, summary = uninterrupted
  plan = json.loads((workdir / "plan.json").read_text())
  assert sum(plan["filler_rows"]) > 0  # else filler would make no difference here
  computed = sum(
    steps * batch * bound
    for steps, batch, bound in zip(
      plan["steps_per_epoch"], plan["batch_sizes"], plan["upper_bounds"], strict=True
    )
  )
  real = int(train.load_split(tiny_config(), "train", 48).lengths.sum())
  for row in read_rows(workdir):
    assert (row["real_timesteps"], row["padded_timesteps_with_filler"]) == (real, computed)
    assert row["sequences_per_s"] * row["epoch_time_s"] == pytest.approx(48)
  assert summary["efficiency"] == pytest.approx(real / computed)


def test_step_memory_is_per_device_a_sharded_batch_takes_less_of_each(tmp_path):
  config = tiny_config()
  plan = train.single_shape_plan(16, 96, 6, num_devices=8)
  temporaries = []
  for devices in (1, 8):
    mesh = train.make_data_mesh(jax.devices()[:devices])
    state = train.replicated_state(config, mesh, total_steps=1)
    steps = train.compile_steps(state, plan, {}, mesh, train.feature_config(config).num_features)
    temporaries.append(steps.train_memory()[0].temporaries)
  assert temporaries[1] < temporaries[0] / 4


def test_a_bucket_no_line_falls_in_compiles_no_train_step():
  config = tiny_config()
  lengths = np.array([20, 24, 90, 96])  # nothing between 32 and 64
  plan = bucketing.make_plan(
    lengths,
    strategy="fixed",
    upper_bounds=[32, 64, 96],
    batch_size=8,
    num_devices=8,
    label_lengths=np.full(4, 3),
  )
  assert plan.bucket_sizes.tolist() == [2, 0, 2]
  mesh = train.make_data_mesh()
  state = train.replicated_state(config, mesh, total_steps=1)
  steps = train.compile_steps(
    state, plan, {}, mesh, train.feature_config(config).num_features, mode="sequential"
  )
  assert steps.accounting()["train_compiles"] == 2
  memory = steps.train_memory()
  assert sorted(memory) == [0, 2]
  megabytes, peak, mean = train.step_memory_mb(memory, plan)
  assert np.isnan(megabytes[1]) and peak == 2
  assert mean == pytest.approx((megabytes[0] + megabytes[2]) / 2)


def blank_lines(lengths, label_lengths=None) -> train.dataset_lib.SequenceSet:
  """Lines of zero features, 3 per frame, at `lengths`, labelled with `label_lengths` ones each
  (one by default): what planning and measuring read of lines, no more."""
  lengths = np.asarray(lengths, np.int32)
  label_lengths = np.ones_like(lengths) if label_lengths is None else np.asarray(label_lengths)
  return train.dataset_lib.SequenceSet(
    ids=[str(line) for line in range(len(lengths))],
    texts=[""] * len(lengths),
    features=[np.zeros((n, 3), np.float32) for n in lengths],
    labels=[np.ones(n, np.int32) for n in label_lengths],
    lengths=lengths,
    label_lengths=label_lengths.astype(np.int32),
  )


def test_eval_steps_compile_for_the_buckets_some_eval_split_uses_only():
  config = tiny_config()
  # Nothing between 32 and 64; the first split uses the first bucket, the second the last.
  splits = {"validation": blank_lines([20, 24]), "test": blank_lines([90, 96])}
  plans = train.make_eval_plans(np.array([32, 64, 96]), splits, 8, 1, 8)
  state = train.create_train_state(config, 3, 1)
  jobs = train._eval_jobs(
    state.apply_fn, state.ctc_loss_fn, state.params, plans, train.make_data_mesh(), 3
  )
  assert sorted(jobs) == [("eval", 0), ("eval", 2)]


def test_an_eval_bucket_added_for_longer_eval_lines_is_rounded_as_the_bounds_are():
  plan = train.make_eval_plans(np.array([32]), {"v": blank_lines([20, 45])}, 8, 8, 8)["v"]
  assert plan.upper_bounds.tolist() == [32, 48]  # 45 rounded up to a multiple of 8
  assert plan.bucket_sizes.tolist() == [1, 1]


def test_starting_a_finished_run_again_trains_no_further(uninterrupted, monkeypatch, caplog):
  workdir, summary = uninterrupted
  rows = read_rows(workdir)
  params = latest_params(tiny_config(), workdir)
  written = (workdir / "summary.json").read_text()

  def compile_nothing(*args, **kwargs):
    raise AssertionError("a finished run compiled its steps again")

  monkeypatch.setattr(train, "start_compiling", compile_nothing)
  with caplog.at_level(logging.INFO, logger=train.LOG.name):
    again = train.train_and_evaluate(tiny_config(), workdir)
  assert "this run already ended (num_epochs) at global step" in caplog.text
  assert again == summary and (workdir / "summary.json").read_text() == written
  assert read_rows(workdir) == rows
  # One TensorBoard stream, each epoch once: a second file would plot replayed epochs twice.
  scalars, num_files = tensorboard_scalars(workdir)
  assert num_files == 1
  assert sorted(step for tag, step in scalars if tag == "val_loss") == [0, 1]
  assert again["best_val_loss"] == summary["best_val_loss"]
  jax.tree.map(np.testing.assert_array_equal, latest_params(tiny_config(), workdir), params)


def test_starting_a_finished_run_with_another_config_leaves_its_records(uninterrupted, tmp_path):
  """Nothing is trained, so config.json still names what was: --mode=evaluate with the run's own
  config is not refused for the dtype the idle start was given."""
  copy = tmp_path / "run"
  shutil.copytree(uninterrupted[0], copy)
  records = {name: (copy / name).read_text() for name in ("config.json", "plan.json")}
  train.train_and_evaluate(tiny_config(**{"model.dtype": "bfloat16"}), copy)
  assert {name: (copy / name).read_text() for name in records} == records
  train.load_params(tiny_config(), copy)


@pytest.mark.parametrize("damaged", [False, True])
def test_a_finished_run_without_its_summary_writes_it_again(
  uninterrupted, tmp_path, caplog, damaged
):
  workdir, summary = uninterrupted
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  if damaged:  # before, replaced without a word
    (copy / "summary.json").write_text("{")
  else:  # as if the start that finished was killed before writing it
    (copy / "summary.json").unlink()
  with caplog.at_level(logging.WARNING, logger="train"):
    again = train.train_and_evaluate(tiny_config(), copy)
  assert (f"{copy / 'summary.json'}: not valid JSON" in caplog.text) == damaged
  assert json.loads((copy / "summary.json").read_text()) == again
  assert again["global_step"] == summary["global_step"] and again["train_compiles"] > 0
  assert read_rows(copy) == read_rows(workdir)


def test_a_finished_run_started_again_repairs_its_lost_or_damaged_records(
  uninterrupted, tmp_path, monkeypatch, caplog
):
  """--mode=evaluate needs both; a sound one is left as it was."""
  workdir, _ = uninterrupted
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "plan.json").unlink()
  (copy / "config.json").write_text("[]")
  rows = (copy / "metrics.jsonl").read_text()
  (copy / "metrics.jsonl").write_text(rows[: len(rows) // 2])  # its last line cut short
  with pytest.raises(FileNotFoundError, match=r"plan\.json is missing"):
    train.evaluate_checkpoint(tiny_config(), copy, "validation")
  monkeypatch.setattr(train, "start_compiling", None)  # nothing to compile: a finished run
  with caplog.at_level(logging.WARNING, logger=train.LOG.name):
    train.train_and_evaluate(tiny_config(), copy)
  assert "plan.json: cannot be read (No such file or directory); written again" in caplog.text
  assert "config.json: not a JSON object, so not the file this trainer writes there; written" in (
    caplog.text
  )
  assert "metrics.jsonl does not hold the run's 2 epochs; written again" in caplog.text
  for name in ("plan.json", "config.json", "metrics.jsonl"):
    assert (copy / name).read_text() == (workdir / name).read_text()
  # Rows past the run's epochs (a row written twice) are as wrong as rows missing.
  (copy / "metrics.jsonl").write_text(rows + rows.splitlines(keepends=True)[-1])
  train.train_and_evaluate(tiny_config(), copy)
  assert (copy / "metrics.jsonl").read_text() == rows
  scores = train.evaluate_checkpoint(tiny_config(), copy, "validation")
  assert scores == train.evaluate_checkpoint(tiny_config(), workdir, "validation")
  # Without the record, parameters still load, but not silently unchecked.
  (copy / "config.json").unlink()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=train.LOG.name):
    train.load_params(tiny_config(), copy)
  assert "config.json is missing: the config's model and features cannot be checked" in caplog.text


def test_a_finished_run_started_again_with_a_test_split_scores_it_once(
  uninterrupted, tmp_path, monkeypatch
):
  workdir, _ = uninterrupted
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  config = tiny_config(**{"data.test_split": "test"})
  scored = train.train_and_evaluate(config, copy)  # nothing to train, a split to score
  assert scored["test_split"] == "test" and scored["test_cer"] >= 0
  assert read_rows(copy) == read_rows(workdir)

  def compile_nothing(*args, **kwargs):
    raise AssertionError("a finished run compiled its steps again")

  monkeypatch.setattr(train, "start_compiling", compile_nothing)
  assert train.train_and_evaluate(config, copy) == scored


def test_a_summary_a_finished_run_did_not_write_at_its_step_is_not_taken_for_its_own(tmp_path):
  """A start with nothing to train returns the summary.json of the start that finished the run,
  not one a stopped start wrote, nor one of an earlier step (a start killed before writing its
  own): those make it go on, compile, and write the run's."""
  earlier = train.train_and_evaluate(tiny_config(max_steps=3), tmp_path)
  assert (earlier["global_step"], earlier["stopped_by"]) == (3, None)
  earlier_text = (tmp_path / "summary.json").read_text()
  stopped = train.train_and_evaluate(tiny_config(max_minutes=1e-9), tmp_path)  # one more step
  assert (stopped["global_step"], stopped["stopped_by"]) == (4, "max_minutes")
  for summary_text in ((tmp_path / "summary.json").read_text(), earlier_text):
    (tmp_path / "summary.json").write_text(summary_text)
    summary = train.train_and_evaluate(tiny_config(max_steps=4), tmp_path)
    assert (summary["global_step"], summary["stopped_by"], summary["ended_by"]) == (
      4,
      None,
      "max_steps",
    )
    assert summary["train_compiles"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path, caplog):
  with caplog.at_level(logging.INFO, logger="train"):
    summary = train.train_and_evaluate(
      tiny_config(num_epochs=6, patience=1, **{"optimizer.learning_rate": 0.0}), tmp_path
    )
  rows = read_rows(tmp_path)
  # With a zero learning rate the validation loss never improves after epoch 0.
  assert summary["best_epoch"] == 0
  assert [row["epoch"] for row in rows] == [0, 1]
  assert summary["ended_by"] == "patience" and summary["stopped_by"] is None
  assert "early stopping: no epoch better by val_loss than epoch 0 (" in caplog.text
  assert "in the 1 since (patience)" in caplog.text


@pytest.mark.parametrize(
  ("metric", "best_epoch", "epochs"), [("val_loss", 1, 4), ("val_cer", 2, 5)]
)
def test_the_selection_metric_picks_the_best_epoch_and_drives_patience(
  tmp_path, monkeypatch, metric, best_epoch, epochs
):
  """Scripted validation scores in which loss and CER disagree (CTC's loss can rise while its
  CER falls): the best checkpoint and early stopping follow the chosen one."""
  losses, cers = [5.0, 3.0, 4.0, 4.5, 6.0, 7.0], [0.9, 0.8, 0.6, 0.7, 0.65, 0.66]
  scores = iter(
    {"loss": loss, "cer": cer, "wer": 1.0} for loss, cer in zip(losses, cers, strict=True)
  )
  monkeypatch.setattr(train, "evaluate", lambda *args: next(scores))
  config = tiny_config(num_epochs=6, patience=2, selection_metric=metric)
  summary = train.train_and_evaluate(config, tmp_path)
  assert (summary["best_epoch"], summary["epochs"]) == (best_epoch, epochs)
  assert summary["selection_metric"] == metric
  # Each row names the best epoch so far.
  rows = read_rows(tmp_path)
  assert [row["best_epoch"] for row in rows] == [min(epoch, best_epoch) for epoch in range(epochs)]
  assert (summary["best_val_loss"], summary["best_val_cer"]) == (
    losses[best_epoch],
    cers[best_epoch],
  )
  with contextlib.closing(Checkpoints(tmp_path)) as checkpoints:
    checkpoints.restore_best(train.load_params(config, tmp_path))
    assert checkpoints.best.latest_step() == best_epoch
    assert checkpoints.best_selected_by == metric  # what evaluating it later says
  # The best epoch was chosen by one metric: resuming with the other would mix them.
  other = "val_cer" if metric == "val_loss" else "val_loss"
  with pytest.raises(ValueError, match=f"chose its best epoch by '{metric}'"):
    train.train_and_evaluate(tiny_config(num_epochs=6, selection_metric=other), tmp_path)


def test_a_tie_on_the_selection_metric_goes_to_the_lower_loss(tmp_path, monkeypatch):
  """CER stays 1.0 while CTC emits only blanks, but the loss falls: that is progress."""
  scripted = iter({"loss": loss, "cer": 1.0, "wer": 1.0} for loss in (5.0, 4.0, 3.0))
  monkeypatch.setattr(train, "evaluate", lambda *args: next(scripted))
  config = tiny_config(num_epochs=3, patience=1, selection_metric="val_cer")
  summary = train.train_and_evaluate(config, tmp_path)
  assert (summary["best_epoch"], summary["epochs"]) == (2, 3)


def test_one_compiled_train_step_per_bucket(uninterrupted):
  _, summary = uninterrupted
  assert summary["num_buckets"] == len(summary["upper_bounds"]) == 2
  assert summary["train_compiles"] == summary["num_buckets"]
  assert 1 <= summary["eval_compiles"] <= summary["num_buckets"] + 1
  assert summary["num_devices"] == jax.device_count() == 8


def test_resume_after_a_kill_ends_with_the_uninterrupted_parameters(uninterrupted, tmp_path):
  reference_dir, reference_summary = uninterrupted
  # Stop after 6 global steps (mid-epoch; checkpoints at steps 4 and 6), then lose the last
  # checkpoint, as if the process died between checkpoints: the restart replays steps 5 and 6.
  assert train.train_and_evaluate(tiny_config(max_steps=6), tmp_path)["ended_by"] == "max_steps"
  assert (tmp_path / "checkpoints" / "train" / "6").is_dir()
  shutil.rmtree(tmp_path / "checkpoints" / "train" / "6")
  resumed_summary = train.train_and_evaluate(tiny_config(), tmp_path)

  assert_resumed_like(reference_dir, tmp_path)
  assert resumed_summary["best_val_loss"] == pytest.approx(reference_summary["best_val_loss"])


def mesh_and_state(config, devices):
  """A 1-D data mesh over `devices` and a fresh train state replicated on it."""
  mesh = train.make_data_mesh(devices)
  return mesh, jax.device_put(train.create_train_state(config, 3, 10), NamedSharding(mesh, P()))


def one_bucket_plan(train_set, batch_size):
  return bucketing.make_plan(
    train_set.lengths,
    strategy="none",
    batch_size=batch_size,
    num_devices=8,
    label_lengths=train_set.label_lengths,
  )


def one_step(devices, config, train_set, plan, indices):
  """One train step traced as the trainer traces it, with the mesh in context: the new
  parameters and the step's metrics, on the host."""
  mesh, state = mesh_and_state(config, devices)
  batch = train.make_batch(train_set, plan, 0, indices, NamedSharding(mesh, P("data")))
  step = jax.jit(train.train_step, out_shardings=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    new_state, metrics = step(state, batch)
  return jax.device_get(new_state.params), jax.device_get(metrics)


KERNELS = {"model.lstm_impl": "pallas", "ctc.impl": "pallas"}


def with_filler(plan, rows):
  """The plan's first bucket's lines, then filler rows up to `rows`."""
  members = plan.members(0)
  return np.concatenate([members, np.full(rows - len(members), bucketing.FILLER)])


@pytest.mark.parametrize("overrides", [{}, KERNELS], ids=["scan", "kernels"])
def test_one_device_and_eight_devices_take_the_same_step(overrides):
  """With the kernels, each of the eight devices runs them on its own 2 rows; the last two
  devices hold filler rows only. The first Adam step moves each parameter by about the
  learning rate whatever its gradient's size, so the gradient's norm is compared too: a sum over
  devices where a mean is due would show there, not in the parameters."""
  config = tiny_config(**overrides)
  train_set = train.load_split(config, "train", 12)
  plan = one_bucket_plan(train_set, 16)
  indices = with_filler(plan, 16)
  params_1, metrics_1 = one_step(jax.devices()[:1], config, train_set, plan, indices)
  params_8, metrics_8 = one_step(jax.devices(), config, train_set, plan, indices)
  assert metrics_1["weight"] == metrics_8["weight"] == 12
  for name in ("loss", "loss_sum", "grad_norm"):
    assert metrics_1[name] == pytest.approx(metrics_8[name], rel=1e-5), name
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_1, params_8
  )


def test_the_train_steps_loss_and_gradient_are_those_of_its_real_lines():
  """Against optax's CTC loss on the real rows alone, outside the trainer's loss function:
  filler rows add nothing to the loss, its weight or its gradient."""
  config = tiny_config(**{"model.dropout_rate": 0.0})  # so that train=True is deterministic
  train_set = train.load_split(config, "train", 12)
  plan = one_bucket_plan(train_set, 16)
  indices = with_filler(plan, 16)
  mesh, state = mesh_and_state(config, jax.devices()[:1])
  batch = train.make_batch(train_set, plan, 0, indices, NamedSharding(mesh, P("data")))
  _, metrics = jax.jit(train.train_step)(state, batch)
  real = {name: value[:12] for name, value in batch.items()}

  def per_line_losses(params):
    logits = state.apply_fn({"params": params}, real["inputs"], real["input_paddings"])
    return optax.ctc_loss(logits, real["input_paddings"], real["labels"], real["label_paddings"])

  losses = per_line_losses(state.params)
  gradient = jax.grad(lambda params: jnp.mean(per_line_losses(params)))(state.params)
  assert float(metrics["weight"]) == 12
  assert float(metrics["loss_sum"]) == pytest.approx(float(jnp.sum(losses)), rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(float(jnp.mean(losses)), rel=1e-5)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(gradient)), rel=1e-4)


def test_each_step_draws_its_own_dropout_mask_and_a_repeated_step_the_same():
  config = tiny_config(**{"model.dropout_rate": 0.5})
  train_set = train.load_split(config, "train", 8)
  plan = one_bucket_plan(train_set, 8)
  mesh, state = mesh_and_state(config, jax.devices()[:1])
  batch = train.make_batch(train_set, plan, 0, plan.members(0), NamedSharding(mesh, P("data")))
  step = jax.jit(train.train_step)

  def loss_at(step_number):
    return float(step(state.replace(step=jnp.asarray(step_number)), batch)[1]["loss"])

  assert loss_at(3) == loss_at(3)  # resumable: the mask is a function of the step
  assert loss_at(3) != loss_at(4)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learning_rate_warms_up_linearly_then_decays_or_holds(schedule):
  config = tiny_config(
    **{
      "optimizer.learning_rate": 1e-2,
      "optimizer.warmup_steps": 10,
      "optimizer.schedule": schedule,
    }
  )
  rate = train.learning_rate_schedule(config, total_steps=110)
  assert float(rate(0)) == pytest.approx(1e-3)  # a tenth: the first step already learns
  assert float(rate(5)) == pytest.approx(1e-3 + 5 / 10 * 9e-3)
  assert float(rate(10)) == pytest.approx(1e-2)
  if schedule == "cosine":  # half-way down the cosine, then at 0
    assert float(rate(60)) == pytest.approx(5e-3)
    assert float(rate(110)) == pytest.approx(0.0, abs=1e-9)
  else:
    assert float(rate(60)) == float(rate(110)) == pytest.approx(1e-2)


def test_the_learning_rate_decays_over_all_the_runs_epochs(tmp_path, monkeypatch):
  """The cosine reaches 0 at the run's last step, num_epochs epochs in, not after the first."""
  schedules = []
  schedule = train.learning_rate_schedule

  def recorded(config, total_steps):
    schedules.append((total_steps, schedule(config, total_steps)))
    return schedules[-1][1]

  monkeypatch.setattr(train, "learning_rate_schedule", recorded)
  config = tiny_config(num_epochs=3, max_steps=1)
  train.train_and_evaluate(config, tmp_path)
  last_step = 3 * sum(json.loads((tmp_path / "plan.json").read_text())["steps_per_epoch"])
  ((total_steps, rate),) = schedules
  assert total_steps == last_step
  assert float(rate(last_step - 1)) > 0 and float(rate(last_step)) == pytest.approx(0.0, abs=1e-9)


def test_the_optimizer_clips_the_gradient_to_its_global_norm_before_adam():
  """Adam's first update hardly depends on the gradient's scale, so the clip shows in the second:
  a first gradient above the clip norm and ten times that leave the same state after clipping."""
  config = tiny_config(**{"optimizer.grad_clip_norm": 1.0})
  tx = train.make_optimizer(config, total_steps=100)
  params = {"w": jnp.zeros(3)}
  first, second = {"w": jnp.array([3.0, -4.0, 0.0])}, {"w": jnp.array([1.0, 2.0, -0.5])}
  # Adam's first step moves each weight against its gradient's sign by the scheduled rate.
  rate = float(train.learning_rate_schedule(config, total_steps=100)(0))
  update = tx.update(first, tx.init(params), params)[0]["w"]
  np.testing.assert_allclose(update, [-rate, rate, 0.0], rtol=1e-5)

  def second_update(scale):
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(lambda g: scale * g, first), state, params)
    return tx.update(second, state, params)[0]["w"]

  np.testing.assert_allclose(second_update(1.0), second_update(10.0), rtol=1e-6)
  unclipped = tiny_config(**{"optimizer.grad_clip_norm": 1e6})
  tx = train.make_optimizer(unclipped, total_steps=100)
  assert not np.allclose(second_update(1.0), second_update(10.0), rtol=1e-3)


def test_the_traced_train_step_runs_the_kernels_per_device():
  """`compile_steps` traces each step through `compilation.trace_step`: on 8 devices every kernel
  call (LSTM and CTC, forward and backward) runs on the device's own 16 rows of the 128."""
  config = tiny_config(**KERNELS)
  mesh, state = mesh_and_state(config, jax.devices())
  plan = one_bucket_plan(train.load_split(config, "train", 128), 128)
  batch = train.batch_spec(plan, 0, 3, NamedSharding(mesh, P("data")))
  traced = compilation.trace_step(mesh, jax.jit(train.train_step), abstract_on(state), batch)
  assert_kernels_run_per_device(
    traced.jaxpr,
    {"lstm_forward": 2, "lstm_backward": 2, "ctc_alpha": 0, "ctc_beta": 0},
    rows=16,
    num_devices=8,
  )


def test_pallas_kernels_give_the_trainers_loss_and_gradients():
  """The fused LSTM and CTC kernels (in the Pallas interpreter here) give the loss and gradients
  of the scan and optax, through the trainer's state, on a bucket with filler rows."""
  train_set = train.load_split(tiny_config(), "train", 12)
  plan = one_bucket_plan(train_set, 16)
  indices = with_filler(plan, 16)
  results = []
  for overrides in ({"model.lstm_impl": "scan", "ctc.impl": "optax"}, KERNELS):
    mesh, state = mesh_and_state(tiny_config(**overrides), jax.devices()[:1])
    batch = train.make_batch(train_set, plan, 0, indices, NamedSharding(mesh, P("data")))

    def loss_fn(params, state=state, batch=batch):
      logits = state.apply_fn({"params": params}, batch["inputs"], batch["input_paddings"])
      return state.ctc_loss_fn(
        logits, batch["input_paddings"], batch["labels"], batch["label_paddings"], batch["weights"]
      )[0]

    results.append(jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(state.params)))
  (reference_loss, reference_grads), (kernel_loss, kernel_grads) = results
  assert kernel_loss == pytest.approx(reference_loss, rel=1e-5)
  # An untrained line costs ~1e3 nats, so float32 CTC posteriors carry ~1e-4 relative error in
  # either implementation: compare each gradient relative to its largest element.
  deviation = jax.tree.map(
    lambda a, b: np.max(np.abs(a - b)) / np.max(np.abs(b)), kernel_grads, reference_grads
  )
  assert max(jax.tree.leaves(deviation)) < 1e-3, deviation


def test_one_step_changes_every_parameter():
  config = tiny_config()
  train_set = train.load_split(config, "train", 8)
  plan = one_bucket_plan(train_set, 8)
  before = jax.device_get(train.create_train_state(config, 3, 10).params)
  after, _ = one_step(jax.devices(), config, train_set, plan, plan.members(0))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed)), changed


def test_bucketed_and_unbucketed_evaluation_agree():
  config = tiny_config()
  data = train.load_split(config, "validation", 24)
  mesh, state = mesh_and_state(config, jax.devices())
  results = []
  for bounds in (
    [int(data.lengths.max())],
    list(np.quantile(data.lengths, [0.3, 0.6]).astype(int)),
  ):
    plan = train.make_eval_plans(np.array(bounds), {"v": data}, 8, 1, 8)["v"]
    compiled = train.compile_eval_steps(
      state.apply_fn, state.ctc_loss_fn, state.params, {"v": plan}, mesh, 3
    )
    results.append(train.evaluate(state.params, data, plan, compiled, mesh))
  unbucketed, bucketed = results
  assert bucketed["examples"] == unbucketed["examples"] == len(data)
  assert bucketed["loss"] == pytest.approx(unbucketed["loss"], rel=1e-5)
  assert bucketed["cer"] == pytest.approx(unbucketed["cer"])


@pytest.mark.parametrize("keep", [None, 1], ids=["whole", "first label"])
def test_evaluation_reads_each_batchs_outputs_with_its_own_lines(keep):
  """Outputs are read one batch late (the next batch already dispatched): a step that "decodes"
  its batch's own labels must give CER 0 over several buckets and filler rows, and every line
  once. Decoding only each line's first label, the rates divide the edits by the references'
  characters and words (each reference loses all but its first character)."""
  config = tiny_config()
  data = train.load_split(config, "validation", 21)
  mesh = train.make_data_mesh(jax.devices()[:1])
  bounds = np.quantile(data.lengths, [0.3, 0.6, 1.0]).astype(int)
  plan = train.make_eval_plans(bounds, {"v": data}, 8, 1, 8)["v"]
  batches = bucketing.epoch_batches(plan, seed=0, epoch=0)
  assert len({bucket for bucket, _ in batches}) > 1
  assert any((indices == bucketing.FILLER).any() for _, indices in batches)

  def echo(params, batch):
    weights = batch["weights"]
    lengths = jnp.sum(batch["label_paddings"] == 0, axis=-1)
    return {
      "loss_sum": jnp.sum(weights),
      "weight": jnp.sum(weights),
      "decoded": batch["labels"],
      "decoded_lengths": lengths if keep is None else jnp.minimum(lengths, keep),
    }

  steps = {bucket: jax.jit(echo) for bucket in range(plan.num_buckets)}
  scores = train.evaluate(None, data, plan, steps, mesh)
  assert scores["examples"] == len(data)
  if keep is None:
    assert scores["cer"] == scores["wer"] == 0.0
  else:
    texts = list(data.texts)
    assert scores["cer"] == pytest.approx(
      sum(len(text) - 1 for text in texts) / sum(len(text) for text in texts)
    )
    word_edits = [metrics_lib.edit_distance(text.split(), text[0].split()) for text in texts]
    assert scores["wer"] == pytest.approx(
      sum(word_edits) / sum(len(text.split()) for text in texts)
    )


def test_the_eval_step_decodes_valid_frames_only():
  """Logits at padded frames are the output bias alone (the LSTM zeroes its padded outputs):
  biased towards a class the last valid frame does not end on, they must not reach the
  transcription."""
  config = tiny_config()
  data = train.load_split(config, "validation", 1)
  state = train.create_train_state(config, 3, 1)
  length = int(data.lengths[0])
  batch = bucketing.assemble_batch(
    data.features, data.labels, np.array([0]), length + 37, int(data.label_lengths[0])
  )
  logits = state.apply_fn({"params": state.params}, batch["inputs"], batch["input_paddings"])
  last = int(jnp.argmax(logits[0, length - 1]))
  biased = 1 if last != 1 else 2
  bias = state.params["output_projection"]["bias"]
  params = jax.tree.map(lambda x: x, state.params)
  # Just enough to win where the LSTM's output is zero, too little to matter where it is not.
  params["output_projection"]["bias"] = bias.at[biased].set(jnp.max(bias) + 1e-3)
  outputs = jax.jit(train.eval_step, static_argnums=(0, 1))(
    state.apply_fn, state.ctc_loss_fn, params, batch
  )
  logits = state.apply_fn({"params": params}, batch["inputs"], batch["input_paddings"])
  valid, valid_length = ctc.greedy_decode(logits[:, :length], batch["input_paddings"][:, :length])
  every, every_length = ctc.greedy_decode(logits, jnp.zeros_like(batch["input_paddings"]))
  decoded = outputs["decoded"][0, : int(outputs["decoded_lengths"][0])].tolist()
  assert decoded == valid[0, : int(valid_length[0])].tolist()
  assert every[0, : int(every_length[0])].tolist() == [*decoded, biased]  # what reading them gives


def test_a_step_fed_another_buckets_shape_fails_instead_of_compiling():
  config = tiny_config()
  train_set = train.load_split(config, "train", 16)
  plan = bucketing.make_plan(
    train_set.lengths,
    strategy="optimal",
    num_buckets=2,
    batch_size=8,
    num_devices=8,
    label_lengths=train_set.label_lengths,
  )
  mesh, state = mesh_and_state(config, jax.devices())
  compiled = train.compile_steps(state, plan, {}, mesh, 3)
  rows = np.full(int(plan.batch_sizes[1]), bucketing.FILLER)
  rows[: min(rows.size, plan.members(1).size)] = plan.members(1)[: rows.size]
  wrong = train.make_batch(train_set, plan, 1, rows, NamedSharding(mesh, P("data")))
  assert plan.upper_bounds[1] != plan.upper_bounds[0]
  with pytest.raises(TypeError):
    compiled.train_steps[0](state, wrong)


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    ({"bucketing.batch_size": 12}, "not a multiple of the 8 devices"),
    ({"bucketing.strategy": "magic"}, "strategy='magic'"),
    ({"bucketing.num_buckets": 0}, r"config.bucketing.num_buckets must be >= 1, got 0"),
    ({"bucketing.batch_size": -8}, r"config.bucketing.batch_size must be >= 0, got -8"),
    ({"patience": 0}, r"config.patience must be >= 1, got 0"),
    ({"max_steps": -1}, r"config.max_steps must be >= 0, got -1"),
    ({"compile_threads": -1}, r"config.compile_threads must be >= 0 \(0: one per core\), got -1"),
    ({"data.train_limit": -1}, r"config.data.train_limit must be >= 0, got -1"),
    ({"data.eval_limit": -1}, r"config.data.eval_limit must be >= 0, got -1"),
    ({"num_epochs": 0}, r"config.num_epochs must be >= 1, got 0"),
    ({"checkpoint_every_steps": 0}, r"config.checkpoint_every_steps must be >= 1, got 0"),
    ({"bucketing.max_tokens": 4096}, r"set exactly one of config.bucketing.batch_size and .max_"),
    ({"bucketing.batch_size": 0}, r"set exactly one of config.bucketing.batch_size and .max_"),
    ({"bucketing.overflow": "ignore"}, "overflow"),
    ({"eval_batch_size": 4}, "eval_batch_size"),
    ({"eval_batch_size": 0}, r"config.eval_batch_size=0 is not a positive multiple of the 8"),
    ({"ctc.impl": "cudnn"}, "ctc impl must be one of"),
    ({"model.lstm_impl": "cudnn"}, "lstm_impl must be one of"),
    ({"model.hidden_size": 0}, "hidden_size must be >= 1"),
    ({"selection_metric": "val_wer"}, "selection_metric='val_wer' is not one of"),
    ({"optimizer.learning_rate": -1e-3}, r"learning_rate must be finite and >= 0, got -0.001"),
    ({"optimizer.learning_rate": float("nan")}, r"learning_rate must be finite and >= 0, got nan"),
    ({"optimizer.learning_rate": float("inf")}, r"learning_rate must be finite and >= 0, got inf"),
    ({"optimizer.grad_clip_norm": -1.0}, r"grad_clip_norm must be finite and > 0, got -1.0"),
    ({"optimizer.grad_clip_norm": 0.0}, r"grad_clip_norm must be finite and > 0, got 0.0"),
    ({"optimizer.grad_clip_norm": float("inf")}, r"grad_clip_norm must be finite and > 0, got inf"),
    ({"optimizer.warmup_steps": -1}, r"config.optimizer.warmup_steps must be >= 0, got -1"),
    ({"max_minutes": float("nan")}, r"config.max_minutes must be >= 0 \(0: no cap\), got nan"),
    ({"model.dtype": "float8"}, r"config.model: data type 'float8' not understood"),
    ({"bucketing.round_to": 0}, r"config.bucketing.round_to must be >= 1, got 0"),
    ({"bucketing.round_to": 2**31}, r"config.bucketing.round_to must be <= 2147483647, got"),
    ({"seed": -1}, r"config.seed must be an integer in \[0, 2\*\*32\), got -1"),
    ({"seed": None}, r"config.seed must be an integer in \[0, 2\*\*32\), got None"),
    ({"seed": 2**70}, r"config.seed must be an integer in"),
    ({"seed": 2**32}, r"config.seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
    ({"data.synthetic.seed": -1}, r"config.data.synthetic.seed must be an integer in .* got -1"),
    ({"data.features.resample_spacing": 0.0}, r"config.data.features: resample_spacing"),
    ({"bucketing.alpha": -1.0}, r"config.bucketing: cost model alpha must be a finite number"),
    ({"bucketing.kappa": float("nan")}, r"config.bucketing: cost model kappa .* got nan"),
    ({"data.train_split": "training"}, r"config.data.train_split='training' is not one of"),
    ({"data.eval_split": None}, r"config.data.eval_split=None is not one of"),
    ({"data.test_split": "tset"}, r"config.data.test_split='tset' is not one of \(None, '', 'tr"),
    ({"data.bad_examples": "drop"}, r"config.data.bad_examples='drop' is not one of \('error', "),
    ({"compile_mode": "lazy"}, r"config.compile_mode='lazy' is not one of \("),
    ({"optimizer.schedule": "linear"}, r"config.optimizer.schedule='linear' is not one of \('co"),
    ({"bucketing.strategy": "fixed"}, r"strategy='fixed' needs config.bucketing.upper_bounds"),
    ({"bucketing.upper_bounds": (50, 100)}, r"upper_bounds are for .*'fixed' only, not 'optimal'"),
  ],
)
def test_bad_configuration_fails_before_anything_runs(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**overrides), tmp_path)
  assert not (tmp_path / "plan.json").exists()


def test_the_largest_seeds_are_accepted():
  """Seeds are 32 bits as JAX and numpy take them: 2**32 - 1 is one (2**32 is refused above)."""
  config = tiny_config(seed=2**32 - 1, **{"data.synthetic.seed": 2**32 - 1})
  train.validate_config(config, jax.device_count())
  train.create_train_state(config, 3, 1)


def test_a_config_from_python_refuses_a_misspelt_field_and_is_a_config_dict(tmp_path):
  """`--config` locks its ConfigDict; a notebook's `get_config()` is locked alike."""
  config = synthetic.get_config("tiny")
  with pytest.raises(AttributeError, match='Did you mean "max_steps" instead of "max_step"'):
    config.max_step = 3
  with pytest.raises(AttributeError, match='Did you mean "num_buckets"'):
    config.bucketing.num_bucket = 1
  for entry_point in (
    train.train_and_evaluate,
    functools.partial(train.evaluate_checkpoint, split="test"),
    train.load_params,
  ):
    with pytest.raises(TypeError, match=r"must be an ml_collections\.ConfigDict .* not a dict"):
      entry_point(config.to_dict(), tmp_path)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
  ("workdir", "message"),
  [
    ("", r"the workdir \(--workdir\) is empty"),
    ("file", "is a file, not"),
    ("file/run", "is inside file, a file"),
  ],
)
def test_a_workdir_that_is_no_folder_is_refused_before_anything_loads(
  tmp_path, monkeypatch, workdir, message
):
  monkeypatch.chdir(tmp_path)  # an empty workdir would otherwise be this folder
  (tmp_path / "file").write_text("notes")
  for run in (
    lambda: train.train_and_evaluate(tiny_config(), workdir),
    lambda: train.evaluate_checkpoint(tiny_config(), workdir, "validation"),
    lambda: train.load_params(tiny_config(), workdir),
  ):
    with pytest.raises((ValueError, OSError), match=message):
      run()
  assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_a_compilation_cache_dir_that_cannot_be_made_is_named(tmp_path):
  (tmp_path / "file").write_text("")
  config = tiny_config(compilation_cache_dir=str(tmp_path / "file" / "cache"))
  with pytest.raises(ValueError, match=r"config.compilation_cache_dir=.*file/cache': cannot make"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_the_compilation_cache_is_on_by_default_where_asked_and_keeps_every_compile(
  tmp_path, monkeypatch
):
  """A run started again loads its steps from the cache: at $JAX_COMPILATION_CACHE_DIR unless the
  config names a folder ("~" is the home folder, "" turns it off), and a step that compiles in
  under JAX's default second is kept too."""
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "default"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  min_compile_s = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    train.setup_runtime(tiny_config())
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "default")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    train.setup_runtime(tiny_config(compilation_cache_dir="~/cache"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "home" / "cache")
    assert (tmp_path / "home" / "cache").is_dir() and not (tmp_path / "~").exists()
    train.setup_runtime(tiny_config(compilation_cache_dir=""))
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)


def test_a_second_trainer_in_the_same_workdir_is_refused(tmp_path):
  with open(tmp_path / "train.lock", "a") as held:  # as the first trainer holds it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(ValueError, match=r"another trainer is running in .*train.lock"):
      train.train_and_evaluate(tiny_config(), tmp_path)
  assert sorted(path.name for path in tmp_path.iterdir()) == ["train.lock"]


def test_a_workdir_that_cannot_be_locked_still_trains_and_says_so(tmp_path, monkeypatch, caplog):
  def no_locks(file, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(train.fcntl, "flock", no_locks)
  assert train.train_and_evaluate(tiny_config(max_steps=1), tmp_path)["global_step"] == 1
  assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_run_stopped_before_its_first_epoch_ended_counts_the_steps_it_trained(tmp_path):
  summary = train.train_and_evaluate(tiny_config(max_steps=3), tmp_path)
  assert summary["epochs"] == 0 and summary["global_step"] == 3
  assert summary["train_time_s"] > 0  # was 0: only ended epochs counted


def test_a_run_ended_by_max_steps_still_compiles_every_step(tmp_path):
  """max_steps is no stop: the steps its schedule had not reached yet (one compile thread, four
  buckets, one step taken) are compiled, not dropped as a signal or the time cap drops them."""
  config = tiny_config(max_steps=1, compile_threads=1, **{"bucketing.num_buckets": 4})
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["ended_by"] == "max_steps" and summary["stopped_by"] is None
  assert summary["compiles_dropped"] == 0
  assert summary["train_compiles"] == 4 and summary["eval_compiles"] > 0


def test_max_steps_in_a_later_epoch_checkpoints_by_global_step_and_says_where(tmp_path, caplog):
  """Checkpoints fall every checkpoint_every_steps global steps (and at an epoch's end); the stop
  names the step of the epoch's schedule it stopped at."""
  caplog.set_level(logging.INFO, logger=train.LOG.name)
  summary = train.train_and_evaluate(tiny_config(max_steps=10), tmp_path)  # every 4 steps
  steps_per_epoch = sum(json.loads((tmp_path / "plan.json").read_text())["steps_per_epoch"])
  assert steps_per_epoch == 7 and summary["global_step"] == 10
  # Saved at steps 4, 7 (epoch 0's end), 8 and 10 (the stop); the last two are kept.
  assert sorted(int(path.name) for path in (tmp_path / "checkpoints" / "train").iterdir()) == [
    8,
    10,
  ]
  assert "stopped at config.max_steps=10 (epoch 1, step 3 of the schedule)" in caplog.text


def test_a_checkpoint_due_at_an_epochs_last_step_is_the_one_its_end_saves(tmp_path):
  """Every 7 steps, an epoch's: the checkpoint of its last step holds the ended epoch. One saved
  before its validation would stand instead (a step is saved once), and a start again would
  evaluate that epoch again."""
  config = tiny_config(checkpoint_every_steps=7, num_epochs=1)
  assert train.train_and_evaluate(config, tmp_path)["global_step"] == 7
  _, progress = latest_checkpoint(config, tmp_path)
  assert (progress.epoch, progress.step_in_epoch, len(progress.history)) == (1, 0, 1)


def test_a_fresh_start_beside_an_earlier_runs_best_parameters_is_refused(
  uninterrupted, tmp_path, caplog
):
  # Its training checkpoints gone, a new run would have been scored, by the test split and by
  # --mode=evaluate, with the earlier run's best parameters (saving its best skips their epoch).
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "train")
  with pytest.raises(ValueError, match=r"checkpoints/best holds an earlier run's best parameters"):
    train.train_and_evaluate(tiny_config(), workdir)
  shutil.rmtree(workdir / "checkpoints")  # nothing of the earlier run's parameters: it may start
  train.train_and_evaluate(tiny_config(max_steps=1, num_epochs=3), workdir)
  assert "starting afresh, replacing the 2 epoch(s) of" in caplog.text
  assert "resuming with another config" not in caplog.text  # a new run, not a resume


@pytest.mark.parametrize(
  ("saved", "message"),
  [
    ([], "not a JSON object"),
    ({"report": {}}, "no cost_model"),
    ({"cost_model": {}, "report": {"steps": []}}, "its report lacks the steps, fitted_to"),
    (
      {"cost_model": {"alpha": -1.0}, "report": {"steps": [], "fitted_to": {}, "measure_s": 1}},
      "not the cost model written there",
    ),
  ],
)
def test_a_cost_file_the_trainer_did_not_write_is_named(tmp_path, saved, message):
  path = tmp_path / train.COST_FILE
  path.write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=rf"{train.COST_FILE}: {message}"):
    train._read_cost_file(path)


def test_missing_iam_ondb_says_how_to_get_it(tmp_path):
  config = iam.get_config("tiny")
  config.data.manual_dir = None
  config.data.data_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"IAM_ONDB_DIR or --config\.data\.manual_dir"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_line_ctc_cannot_align_is_refused_or_skipped_at_load(monkeypatch):
  featurize = train.dataset_lib.featurize

  def one_line_too_short(*args):
    data = featurize(*args)
    data.labels[2] = np.ones(data.lengths[2], np.int32)  # n equal labels need 2n - 1 frames
    data.label_lengths[2] = data.lengths[2]
    return data

  monkeypatch.setattr(train.dataset_lib, "featurize", one_line_too_short)
  config = tiny_config()
  with pytest.raises(train.dataset_lib.BadExampleError, match=r"split 'train', line .*CTC needs"):
    train.load_split(config, "train", 8)
  config.data.bad_examples = "skip"
  data, skipped = train._load_checked(config, "train", 8)
  assert len(data) == 7 and [item["split"] for item in skipped] == ["train"]
  assert skipped[0]["id"] not in data.ids


@pytest.mark.parametrize(("processes", "agreed_at"), [(1, [1, 2, 3, 8, 9, 16]), (2, [8, 16])])
def test_several_processes_agree_on_a_stop_every_few_steps_not_at_every_one(
  monkeypatch, processes, agreed_at
):
  """The agreement is a collective that waits for the step just dispatched: with several
  processes it comes at the same global steps on all, every `STOP_AGREED_EVERY`-th."""
  asked = []

  def requested():
    asked.append(step)
    return step == 16

  monkeypatch.setattr(jax, "process_count", lambda: processes)
  run = types.SimpleNamespace(config=tiny_config(), stop=types.SimpleNamespace(requested=requested))
  assert train.STOP_AGREED_EVERY == 8
  stopped = []
  for step in (1, 2, 3, 8, 9, 16):
    if train.cut_short(run, step):
      stopped.append(step)
  assert asked == agreed_at and stopped == [16]
  # max_steps needs no agreement: every process counts the same steps.
  run.config = tiny_config(max_steps=3)
  assert train.cut_short(run, 3)


def test_an_infinite_loss_stops_the_run_as_a_nan_one_does():
  step = types.SimpleNamespace(epoch=1, step=2, bucket=0)
  plan = types.SimpleNamespace(upper_bounds=np.array([40]))
  metrics = {"loss": np.inf, "loss_sum": np.inf, "weight": 8.0}
  with pytest.raises(train.LossNotFinite, match=r"loss is inf at epoch 1, step 2 \(bucket 0,"):
    train._account(train.Progress(), (step, metrics), plan, None)


def test_read_one_late_reads_each_step_once_the_next_is_dispatched():
  events = []
  late = train.ReadOneLate(lambda step, outputs: events.append(f"read {step} {outputs}"))
  for step in range(3):
    events.append(f"dispatch {step}")
    late.push(step, step * 10)
  late.flush()
  late.flush()  # nothing left to read
  assert events == [
    "dispatch 0",
    "dispatch 1",
    "read 0 0",
    "dispatch 2",
    "read 1 10",
    "read 2 20",
  ]


def compiling(function):
  """`function` that first compiles something new (a shape no run has used)."""
  shapes = iter(range(1000, 2000))

  def compile_then_call(*args):
    jax.jit(lambda x: x * 2.0)(np.ones(next(shapes), np.float32))
    return function(*args)

  return compile_then_call


def test_a_compile_between_steps_is_an_error_even_beside_checkpoint_saves(tmp_path, monkeypatch):
  # Saving compiles helpers of Orbax's own (allowed); a step every save follows must still not.
  monkeypatch.setattr(train, "_account", compiling(train._account))
  with pytest.raises(RuntimeError, match=r"a compilation happened at epoch 0, step 1 \(bucket"):
    train.train_and_evaluate(tiny_config(checkpoint_every_steps=1), tmp_path)


def test_a_compile_in_evaluation_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "evaluate", compiling(train.evaluate))
  with pytest.raises(RuntimeError, match=r"a compilation happened while evaluating epoch 0"):
    train.train_and_evaluate(tiny_config(), tmp_path)


def test_another_threads_compiles_while_a_run_trains_are_not_its_recompiles(tmp_path):
  """A notebook keeps working (and compiling) while a run trains on a thread of its own."""
  done, compiled = threading.Event(), []

  def notebook():
    for size in range(2000, 3000):  # shapes no run uses
      if done.is_set():
        return
      jax.jit(lambda x: x + 1.0)(np.ones(size, np.float32))
      compiled.append(time.monotonic())

  summary = {}
  trainer = threading.Thread(
    target=lambda: summary.update(train.train_and_evaluate(tiny_config(), tmp_path))
  )
  other = threading.Thread(target=notebook)
  other.start()
  start = time.monotonic()
  trainer.start()
  trainer.join()
  end = time.monotonic()
  done.set()
  other.join()
  assert summary["epochs"] == 2  # trained to its end, no RuntimeError on its thread
  assert any(start < moment < end for moment in compiled)


def test_nan_loss_stops_with_step_and_bucket(tmp_path, monkeypatch):
  # Bad lines are refused at load; this NaN stands for a diverging model.
  load = train._load_checked

  def poisoned(config, split, limit, source=""):
    data, skipped = load(config, split, limit, source)
    if split == "train":
      data.features[3] = np.full_like(data.features[3], np.nan)
    return data, skipped

  monkeypatch.setattr(train, "_load_checked", poisoned)
  with pytest.raises(train.LossNotFinite, match=r"at epoch 0, step \d+ \(bucket \d, length bound"):
    train.train_and_evaluate(tiny_config(checkpoint_every_steps=1), tmp_path)
  # A diverged run is the config's doing: the command line ends it in one line, exit code 2.
  assert issubclass(train.LossNotFinite, cli_errors.EXPECTED_ERRORS)
  # The save in flight when it failed was finished, not left half-written.
  assert not list((tmp_path / "checkpoints").rglob("*tmp*"))


def test_evaluate_the_best_or_the_latest_checkpoint(tmp_path, monkeypatch):
  scripted = iter({"loss": loss, "cer": 1.0, "wer": 1.0} for loss in (1.0, 2.0))
  with monkeypatch.context() as patch:
    patch.setattr(train, "evaluate", lambda *args: next(scripted))
    train.train_and_evaluate(tiny_config(), tmp_path)  # 2 epochs, the best one the first
  config = tiny_config()
  best = train.load_params(config, tmp_path)
  latest = train.load_params(config, tmp_path, checkpoint="latest")
  jax.tree.map(np.testing.assert_array_equal, latest, latest_params(config, tmp_path))
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(latest), strict=True)
  )
  on_best = train.evaluate_checkpoint(config, tmp_path, "validation")
  on_latest = train.evaluate_checkpoint(config, tmp_path, "validation", checkpoint="latest")
  assert on_best["loss"] != on_latest["loss"]
  # Each says which parameters it scored: the first epoch, chosen by its loss; the end of the run.
  steps = sum(json.loads((tmp_path / "plan.json").read_text())["steps_per_epoch"])
  assert {key: on_best[key] for key in ("split", "checkpoint", "epoch", "selected_by")} == {
    "split": "validation",
    "checkpoint": "best",
    "epoch": 0,
    "selected_by": "val_loss",
  }
  assert {key: on_latest[key] for key in ("checkpoint", "epoch", "global_step")} == {
    "checkpoint": "latest",
    "epoch": 2,
    "global_step": 2 * steps,
  }
  with pytest.raises(ValueError, match="checkpoint='last' is not one of"):
    train.load_params(config, tmp_path, checkpoint="last")
  # Scored on other features, the numbers would be wrong, not an error; how it computes may change.
  changed = tiny_config(**{"data.features.resample_spacing": 0.5})
  with pytest.raises(ValueError, match=r"features.resample_spacing=0.2 there, 0.5 here; use the"):
    train.evaluate_checkpoint(changed, tmp_path, "validation")
  train.load_params(tiny_config(**{"model.unroll": 2, "model.dropout_rate": 0.0}), tmp_path)
  # A field the run's config.json lacks (a run from before the field existed) is not compared.
  recorded = json.loads((tmp_path / "config.json").read_text())
  del recorded["data.features.resample_spacing"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  train.load_params(changed, tmp_path)
  plan = tmp_path / "plan.json"
  for text, message in (
    ("[]", "not a JSON object"),
    ("{}", "no upper_bounds"),
    ('{"upper_bounds": []}', "upper_bounds [] are no bucket bounds (fixed bounds need"),
    ('{"upper_bounds": ["64"]}', "upper_bounds ['64'] are no bucket bounds (fixed bounds must be"),
    ('{"upper_bounds": [64, 32]}', "upper_bounds [64, 32] are no bucket bounds (fixed bounds mu"),
    (plan.read_text()[:-20], "not valid JSON"),
  ):
    plan.write_text(text)
    with pytest.raises(ValueError, match=rf"plan\.json: {re.escape(message)}"):
      train.evaluate_checkpoint(config, tmp_path, "validation")
  # Reading creates nothing: a mistyped workdir stays absent.
  for checkpoint in train.CHECKPOINTS:
    with pytest.raises(FileNotFoundError, match=f"no {checkpoint} checkpoint under .*typo"):
      train.load_params(config, tmp_path / "typo", checkpoint=checkpoint)
  assert not (tmp_path / "typo").exists()


def test_the_test_split_is_scored_with_the_best_parameters_and_rows_hold_each_rate(
  tmp_path, monkeypatch
):
  """Validation scripted so that the first of two epochs is the best; the test split, scored
  for real, must be that epoch's parameters' score on the test lines, not the last epoch's, and
  not the validation lines'."""
  scripted = iter([{"loss": 1.0, "cer": 0.5, "wer": 0.7}, {"loss": 2.0, "cer": 0.6, "wer": 0.8}])
  evaluate = train.evaluate
  monkeypatch.setattr(train, "evaluate", lambda *args: next(scripted, None) or evaluate(*args))
  config = tiny_config(**{"data.test_split": "test"})
  summary = train.train_and_evaluate(config, tmp_path)
  rows = read_rows(tmp_path)
  assert [(row["val_loss"], row["val_cer"], row["val_wer"]) for row in rows] == [
    (1.0, 0.5, 0.7),
    (2.0, 0.6, 0.8),
  ]
  assert summary["best_epoch"] == 0
  best = train.evaluate_checkpoint(config, tmp_path, "test")
  latest = train.evaluate_checkpoint(config, tmp_path, "test", checkpoint="latest")
  validation = train.evaluate_checkpoint(config, tmp_path, "validation")
  assert summary["test_loss"] == pytest.approx(best["loss"], rel=1e-6)
  assert (summary["test_cer"], summary["test_wer"]) == (best["cer"], best["wer"])
  assert best["loss"] != pytest.approx(latest["loss"], rel=1e-4)
  assert best["loss"] != pytest.approx(validation["loss"], rel=1e-4)


def test_an_epochs_train_loss_is_the_mean_over_its_lines_not_over_its_batches(tmp_path):
  """At a zero learning rate and no dropout the parameters stay the initial ones, so the epoch's
  train loss is their CTC loss averaged over every training line, here computed in one batch
  of all the lines: bucketed batches hold unequal numbers of real lines (and filler rows)."""
  overrides = {"optimizer.learning_rate": 0.0, "model.dropout_rate": 0.0, "num_epochs": 1}
  config = tiny_config(**overrides)
  train.train_and_evaluate(config, tmp_path)
  (row,) = read_rows(tmp_path)
  data = train.load_split(config, "train", config.data.train_limit)
  batch = bucketing.assemble_batch(
    data.features,
    data.labels,
    np.arange(len(data)),
    int(data.lengths.max()),
    int(data.label_lengths.max()),
  )
  state = train.create_train_state(config, 3, 1)
  logits = state.apply_fn({"params": state.params}, batch["inputs"], batch["input_paddings"])
  losses = optax.ctc_loss(logits, batch["input_paddings"], batch["labels"], batch["label_paddings"])
  assert row["train_loss"] == pytest.approx(float(jnp.mean(losses)), rel=1e-4)


@pytest.mark.parametrize("round_to", [1, 6, 8])
def test_inference_lengths_are_few_an_octave_and_pad_by_less_than_a_quarter(round_to):
  rounded = bucketing.boundaries.round_up(np.arange(1, 5001), round_to)
  padded = np.array([train.inference_length(n, round_to) for n in range(1, 5001)])
  assert np.all(padded % round_to == 0) and np.all(padded >= rounded)
  assert np.all(padded < 1.25 * rounded)
  for octave in range(2, 12):  # round_to multiples in (2**octave, 2**(octave + 1)]
    multiples = np.arange(2**octave + 1, 2 ** (octave + 1) + 1) * round_to
    assert len({train.inference_length(int(n), round_to) for n in multiples}) <= 4


def test_evaluate_checkpoint_and_transcribe(uninterrupted, caplog):
  workdir, summary = uninterrupted
  config = tiny_config()
  scores = train.evaluate_checkpoint(config, workdir, "validation")
  assert "scoring the first 16 lines of 'validation' only (config.data.eval_limit" in caplog.text
  assert scores["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-5)
  example = train.dataset_lib.load_examples("synthetic", "validation", limit=1)[0]
  params = train.load_params(config, workdir)
  text = train.transcribe(params, config, example["points"], example["stroke_end"])
  # Line after line: the model compiles once per padded length, not once per call.
  compiles = compilation.CompileEvents.outside_steps()
  again = train.transcribe(params, tiny_config(), example["points"], example["stroke_end"])
  assert again == text and compilation.CompileEvents.outside_steps() == compiles
  # Lines of other lengths in the same quarter-octave reuse that program too.
  for cut in (1, 2, 3):
    train.transcribe(params, config, example["points"][:-cut], example["stroke_end"][:-cut])
  assert compilation.CompileEvents.outside_steps() == compiles
  with pytest.raises(ValueError, match=r"points must be finite numbers; point 2 is \[nan, "):
    points = example["points"].copy()
    points[2, 0] = np.nan
    train.transcribe(params, config, points, example["stroke_end"])

  # The same line inside a batch padded far past its length decodes to the same text.
  data = train.load_split(config, "validation", 1)
  batch = bucketing.assemble_batch(
    data.features,
    data.labels,
    np.array([0, -1]),
    int(data.lengths[0]) + 37,
    int(data.label_lengths[0]),
  )
  state = train.create_train_state(config, 3, 1)
  outputs = jax.jit(train.eval_step, static_argnums=(0, 1))(
    state.apply_fn, state.ctc_loss_fn, params, batch
  )
  ids = np.asarray(outputs["decoded"][0, : int(outputs["decoded_lengths"][0])])
  assert text == train.ALPHABET.decode(ids)


def test_iam_tiny_trains_on_the_real_data(built_data_dir, tmp_path):
  config = iam.get_config("tiny")
  config.data.data_dir = str(built_data_dir)
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["train_compiles"] == summary["num_buckets"]
  assert np.isfinite(summary["best_val_loss"])
  assert summary["test_cer"] >= 0.0 and np.isfinite(summary["test_loss"])
  rows = read_rows(tmp_path)
  assert len(rows) == config.num_epochs
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def final_params_and_rows(workdir):
  return latest_params(tiny_config(), workdir), read_rows(workdir)


def assert_same_training(reference_dir, workdir):
  """Bit-identical parameters and losses: only the order of compiling may differ."""
  (expected, expected_rows), (got, got_rows) = map(final_params_and_rows, (reference_dir, workdir))
  jax.tree.map(np.testing.assert_array_equal, expected, got)
  for expected_row, row in zip(expected_rows, got_rows, strict=True):
    assert (row["train_loss"], row["val_loss"]) == (
      expected_row["train_loss"],
      expected_row["val_loss"],
    )


@pytest.mark.slow
def test_sequential_overlapped_and_cached_compiles_train_identically_one_compile_per_step(
  uninterrupted, tmp_path
):
  reference_dir, reference = uninterrupted
  assert reference["compile_mode"] == "overlap"
  cache_dir = str(tmp_path / "cache")
  jax.clear_caches()  # compile afresh, not from the in-memory cache of the reference run
  sequential = train.train_and_evaluate(
    tiny_config(compile_mode="sequential", compilation_cache_dir=cache_dir), tmp_path / "first"
  )
  executables = sequential["train_compiles"] + sequential["eval_compiles"]
  assert sequential["train_compiles"] == sequential["num_buckets"]
  assert (sequential["compilation_cache_hits"], sequential["compilation_cache_misses"]) == (
    0,
    executables,
  )
  assert sequential["compile_wall_s"] >= sequential["compile_seconds_sum"] - 1e-6  # one at a time
  assert_same_training(reference_dir, tmp_path / "first")

  jax.clear_caches()  # as a new process would start
  cached = train.train_and_evaluate(
    tiny_config(compilation_cache_dir=cache_dir), tmp_path / "again"
  )
  assert (cached["compilation_cache_hits"], cached["compilation_cache_misses"]) == (executables, 0)
  assert_same_training(reference_dir, tmp_path / "again")
  # A step read from the cache has the buffer plan it was compiled with.
  assert cached["train_step_memory_mb"] == sequential["train_step_memory_mb"]


def test_training_starts_before_the_eval_steps_are_compiled(tmp_path, monkeypatch):
  # Eval compiles are held until the first step's metrics are read: a trainer that waited for
  # every compile before training would never release them.
  first_step_done = threading.Event()
  account, eval_jobs = train._account, train._eval_jobs

  def accounting_step(*args):
    first_step_done.set()
    return account(*args)

  def held_eval_jobs(*args):
    return {
      key: (
        mesh,
        Held(jitted, first_step_done, "training did not start before eval compiles"),
        *rest,
      )
      for key, (mesh, jitted, *rest) in eval_jobs(*args).items()
    }

  monkeypatch.setattr(train, "_account", accounting_step)
  monkeypatch.setattr(train, "_eval_jobs", held_eval_jobs)
  summary = train.train_and_evaluate(tiny_config(num_epochs=1), tmp_path)
  assert summary["epochs"] == 1 and summary["eval_compiles"] >= 1


def test_epoch_time_leaves_out_the_waits_for_compiles(tmp_path, monkeypatch):
  # Every compile takes 2 s more: the first train step waits for one (time to first step), a
  # later bucket's first step for another (compile_wait_s), and neither is the epoch's time.
  lower_and_compile = compilation._lower_and_compile

  def slow(*args):
    time.sleep(2.0)
    return lower_and_compile(*args)

  monkeypatch.setattr(compilation, "_lower_and_compile", slow)
  start = time.perf_counter()
  summary = train.train_and_evaluate(tiny_config(num_epochs=2), tmp_path)
  wall = time.perf_counter() - start
  row, second = read_rows(tmp_path)
  assert summary["time_to_first_step_s"] >= 2.0 and row["compile_wait_s"] >= 2.0
  # The first epoch compiled every bucket: the second waits for none, and its time is its own.
  assert second["compile_wait_s"] < 1.0 and second["epoch_time_s"] > 0
  # Each second is counted once: the parts add up to no more than the run's wall time.
  parts = ("epoch_time_s", "compile_wait_s", "eval_time_s")
  assert (
    summary["time_to_first_step_s"] + sum(r[part] for r in (row, second) for part in parts) < wall
  )
  assert summary["compile_wait_s"] == row["compile_wait_s"] + second["compile_wait_s"]


def test_the_epochs_time_leaves_out_its_mid_epoch_checkpoints(tmp_path, monkeypatch):
  """The trainer's clock jumps 1000 s while each checkpoint saves: the epoch, checkpointed at its
  step 4 of 7 (every 4 steps) and at its end, counts none of it."""
  jumped = [0.0]
  clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + jumped[0])
  save_latest = train.Run.save_latest

  def slow_save(run, *args):
    jumped[0] += 1000.0
    return save_latest(run, *args)

  monkeypatch.setattr(train, "time", clock)
  monkeypatch.setattr(train.Run, "save_latest", slow_save)
  summary = train.train_and_evaluate(tiny_config(num_epochs=1), tmp_path)
  assert jumped[0] == 2000.0
  (row,) = read_rows(tmp_path)
  assert 0 < row["epoch_time_s"] < 1000 and summary["train_time_s"] == row["epoch_time_s"]


def test_a_run_stopped_within_an_epoch_counts_its_waits_for_compiles(tmp_path, monkeypatch):
  """The summary's compile_wait_s adds the waits of an epoch a stop cut short, as train_time_s
  adds its time: here max_steps stops epoch 0 just after the first step of its second bucket,
  which waited for that bucket's compile (one thread, each compile at least a second)."""
  lower_and_compile = compilation._lower_and_compile

  def slow(*args):
    time.sleep(1.0)
    return lower_and_compile(*args)

  monkeypatch.setattr(compilation, "_lower_and_compile", slow)
  config = tiny_config(compile_threads=1)
  plan = train.make_train_plan(config, train.load_split(config, "train", 48), 8)
  schedule = [bucket for bucket, _ in bucketing.epoch_batches(plan, config.seed, 0)]
  second = next(step for step, bucket in enumerate(schedule) if bucket != schedule[0])
  assert second + 1 < len(schedule)  # stopped within the epoch
  config.max_steps = second + 1
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["epochs"] == 0 and summary["ended_by"] == "max_steps"
  assert summary["compile_wait_s"] >= 0.5


def test_buckets_compile_in_the_order_the_schedule_first_needs_them():
  config = tiny_config(**{"bucketing.num_buckets": 4})
  train_set = train.load_split(config, "train", 48)
  plan = train.make_train_plan(config, train_set, 8)
  schedule = [bucket for bucket, _ in bucketing.epoch_batches(plan, seed=3, epoch=1)]
  order = train.first_needed_buckets(plan, seed=3, epoch=1, step=2)
  assert sorted(order) == sorted(set(schedule[2:]))
  assert [schedule[2:].index(bucket) for bucket in order] == sorted(
    schedule[2:].index(bucket) for bucket in order
  )


def test_a_resumed_run_compiles_first_the_buckets_its_remaining_steps_need_first(monkeypatch):
  config = tiny_config(**{"bucketing.num_buckets": 4})
  plan = train.make_train_plan(config, train.load_split(config, "train", 48), 8)
  schedule = [int(bucket) for bucket, _ in bucketing.epoch_batches(plan, config.seed, 1)]
  # A step of epoch 1 from which the buckets come in another order than from its start.
  step = next(
    step
    for step in range(len(schedule))
    if list(dict.fromkeys(schedule[step:])) != list(dict.fromkeys(schedule))
  )
  orders = []

  def compile_nothing(*args, train_order, **kwargs):
    orders.append(train_order)
    return types.SimpleNamespace(train_steps={}, eval_steps={}, workers=1)

  monkeypatch.setattr(train, "compile_steps", compile_nothing)
  progress = train.Progress(epoch=1, step_in_epoch=step)
  train.start_compiling(config, None, plan, {}, None, progress)
  assert orders == [list(dict.fromkeys(schedule[step:]))]


# ---------------------------------------------------------------------------------------------
# What survives: corrupt checkpoints, signals, the time cap, restarts.


@pytest.fixture(scope="module")
def stopped_at_step_6(tmp_path_factory):
  """A tiny run stopped after 6 global steps, mid-epoch 0: checkpoints at steps 4 and 6."""
  workdir = tmp_path_factory.mktemp("stopped")
  train.train_and_evaluate(tiny_config(max_steps=6), workdir)
  assert sorted(p.name for p in (workdir / "checkpoints" / "train").iterdir()) == ["4", "6"]
  return workdir


@pytest.mark.parametrize(
  ("override", "message"),
  [
    ({"data.train_limit": 40}, r"trained on 48 training lines, but this run has 40"),
    (
      {"data.features.resample_spacing": 0.5},
      r"trained on other training lines than this run's \(as many: 48\)",
    ),
    ({"bucketing.num_buckets": 3}, r"trained with bucket bounds \[.*\], but this run plans"),
    (
      {"bucketing.batch_size": 16},
      r"with batches of \[8, 8\] lines per bucket, but this run plans \[16, 1\d\]",
    ),
    ({"seed": 1}, r"with config.seed=0, but this run has config.seed=1"),
  ],
)
def test_resuming_with_another_schedule_is_refused(stopped_at_step_6, tmp_path, override, message):
  # Each would continue epoch 0 at step 6 of another order of batches.
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  # The data also moved: a data dir says where the data is, not what it is, and goes unnamed.
  moved = {"data.data_dir": str(tmp_path / "moved")}
  with pytest.raises(CheckpointMismatchError, match=message) as error:
    train.train_and_evaluate(tiny_config(**override, **moved), workdir)
  # The field that changed, from the run's config.json: the checkpoint only knows the effect.
  (field, value), *_ = override.items()
  assert f"config.json differs in config.{field}=" in str(error.value)
  assert f"there, {value!r} here" in str(error.value) and "data_dir" not in str(error.value)
  # The run's plan.json still describes its checkpoints.
  assert (workdir / "plan.json").read_text() == (stopped_at_step_6 / "plan.json").read_text()


def test_a_test_split_with_no_best_checkpoint_to_score_says_so(stopped_at_step_6, tmp_path, caplog):
  workdir = tmp_path / "run"  # stopped within its first epoch: no best epoch yet
  shutil.copytree(stopped_at_step_6, workdir)
  summary = train.train_and_evaluate(
    tiny_config(max_steps=6, **{"data.test_split": "test"}), workdir
  )
  assert summary["ended_by"] == "max_steps" and "test_cer" not in summary
  assert "the test split 'test' is not scored: no best checkpoint in" in caplog.text


def test_a_resume_that_changes_what_the_run_computes_says_so(stopped_at_step_6, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 2
  # max_steps steers the run only (it was 6), unroll and the CTC implementation choose how it
  # computes; num_epochs moves the learning rate's horizon.
  config = tiny_config(num_epochs=3, max_steps=8, **{"model.unroll": 2, "ctc.impl": "optax"})
  train.train_and_evaluate(config, workdir)
  (warning,) = [r.message for r in caplog.records if "resuming with another config" in r.message]
  assert warning.endswith(": config.num_epochs=2 there, 3 here")
  assert json.loads((workdir / "config.json").read_text()) == train.flat_config(config)
  caplog.clear()
  train.train_and_evaluate(tiny_config(num_epochs=3), workdir)
  assert "resuming with another config" not in caplog.text


def test_a_resume_that_only_steers_the_run_differently_warns_of_nothing(tmp_path, caplog):
  """Fields that choose how the run is controlled or computed, not what it computes: a resume
  may change every one of them without a warning, and only the others are named."""
  train.record_config(tiny_config(), tmp_path, resumed=False)
  steered = {
    "max_minutes": 5.0,
    "max_steps": 10,
    "progress_bar": True,
    "compile_mode": "sequential",
    "compile_threads": 2,
    "compilation_cache_dir": "/elsewhere",
    "checkpoint_every_steps": 3,
    "eval_batch_size": 16,
    "model.lstm_impl": "pallas",
    "model.unroll": 2,
    "ctc.impl": "pallas",
    "data.data_dir": "/data",
    "distributed.num_processes": 2,
  }
  with caplog.at_level(logging.WARNING, logger=train.LOG.name):
    train.record_config(tiny_config(**steered), tmp_path, resumed=True)
    assert "resuming with another config" not in caplog.text
    train.record_config(tiny_config(num_epochs=3, **steered), tmp_path, resumed=True)
  assert caplog.records[-1].message.endswith(": config.num_epochs=2 there, 3 here")


def test_a_damaged_config_record_is_rewritten_on_resume(stopped_at_step_6, tmp_path, caplog):
  # config.json records each start; damaged, it no longer blocks the run it describes.
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  (workdir / "config.json").write_text("{")
  config = tiny_config(max_steps=7)
  train.train_and_evaluate(config, workdir)
  assert "config.json: not valid JSON" in caplog.text and "rewrites it" in caplog.text
  assert json.loads((workdir / "config.json").read_text()) == train.flat_config(config)


def test_a_run_without_a_finished_epoch_has_no_best_but_a_latest_checkpoint(stopped_at_step_6):
  with pytest.raises(FileNotFoundError, match=r"none until an epoch ends\); --checkpoint=latest"):
    train.load_params(tiny_config(), stopped_at_step_6)
  train.load_params(tiny_config(), stopped_at_step_6, checkpoint="latest")


@pytest.mark.parametrize("how", ["truncate", "zero", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_step_before(
  uninterrupted, stopped_at_step_6, tmp_path, caplog, how
):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  damage(workdir / "checkpoints" / "train" / "6", how)
  train.train_and_evaluate(tiny_config(), workdir)
  assert "checkpoint step 6" in caplog.text and "damaged" in caplog.text
  assert "resuming from step 4 instead" in caplog.text
  assert_resumed_like(uninterrupted[0], workdir)


def test_a_resume_that_trains_a_best_epoch_again_forgets_its_old_best(
  uninterrupted, tmp_path, monkeypatch, caplog
):
  """Falling back from the finished run's last state (epoch 1's end) to the step before (in
  epoch 1), the resume trains epoch 1 again; here it validates worse, so the best parameters
  must be epoch 0's again, not those the first start saved for epoch 1."""
  reference_dir, reference_summary = uninterrupted
  assert reference_summary["best_epoch"] == 1
  workdir = tmp_path / "run"
  shutil.copytree(reference_dir, workdir)
  (workdir / "summary.json").unlink()
  steps = sorted(int(path.name) for path in (workdir / "checkpoints" / "train").iterdir())
  damage(workdir / "checkpoints" / "train" / str(steps[-1]), "delete")
  monkeypatch.setattr(train, "evaluate", lambda *args: {"loss": 1e9, "cer": 1.0, "wer": 1.0})
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert f"resuming from step {steps[-2]} instead" in caplog.text
  assert "deleted the best parameters of epoch 1" in caplog.text
  assert (summary["best_epoch"], summary["epochs"]) == (0, 2)
  assert sorted(path.name for path in (workdir / "checkpoints" / "best").iterdir()) == ["0"]
  assert train._load_params(tiny_config(), workdir, None, "best")[1]["epoch"] == 0


def test_best_parameters_a_kill_left_unsaved_are_saved_from_the_state_at_their_epochs_end(
  uninterrupted, tmp_path, caplog
):
  """Killed after the last epoch's state was saved, before its best parameters were (saved in
  that order), the next start saves them from that state: they are exactly its parameters."""
  reference_dir, reference_summary = uninterrupted
  assert reference_summary["best_epoch"] == 1
  workdir = tmp_path / "run"
  shutil.copytree(reference_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "best" / "1")
  train.train_and_evaluate(tiny_config(), workdir)
  assert "saved the best parameters of epoch 1 again" in caplog.text
  best, origin = train._load_params(tiny_config(), workdir, None, "best")
  assert origin["epoch"] == 1
  latest = train.load_params(tiny_config(), workdir, checkpoint="latest")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(best), jax.device_get(latest))


def test_a_checkpoint_whose_values_changed_is_caught_by_its_checksum(
  uninterrupted, stopped_at_step_6, tmp_path, caplog
):
  # Step 4's arrays under step 6's name: every file reads fine, only the values are wrong.
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  steps = workdir / "checkpoints" / "train"
  shutil.rmtree(steps / "6" / "state")
  shutil.copytree(steps / "4" / "state", steps / "6" / "state")
  train.train_and_evaluate(tiny_config(), workdir)
  assert "SHA-256" in caplog.text
  assert_resumed_like(uninterrupted[0], workdir)


def test_no_intact_checkpoint_is_one_clear_error(stopped_at_step_6, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  for step, how in (("6", "zero"), ("4", "truncate")):
    damage(workdir / "checkpoints" / "train" / step, how)
  with pytest.raises(ValueError, match=r"no intact checkpoint in .*step 6: .*; step 4: .*afresh"):
    train.train_and_evaluate(tiny_config(), workdir)


def test_resuming_with_another_model_shape_names_the_config_field(stopped_at_step_6, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  with pytest.raises(ValueError, match=r"config\.model\.hidden_size=16 there, 32 here"):
    train.train_and_evaluate(tiny_config(**{"model.hidden_size": 32}), workdir)


def tensorboard_scalars(workdir):
  """(tag, step) of every scalar in the run's TensorBoard event files, and how many files."""
  from tensorboardX.proto import event_pb2

  files = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
  scalars = []
  for path in files:
    data, offset = path.read_bytes(), 0
    while offset < len(data):  # TFRecords: length (8 bytes), its CRC (4), data, data's CRC (4)
      length = int.from_bytes(data[offset : offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      scalars += [(value.tag, event.step) for value in event.summary.value]
      offset += 16 + length
  return scalars, len(files)


def test_the_progress_bar_is_drawn_on_a_terminal_only(monkeypatch):
  monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # not in a notebook
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
  assert isinstance(train.progress_bar(4, 0, "epoch 0", True), contextlib.nullcontext)
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  with train.progress_bar(4, 1, "epoch 0", True) as bar:  # a resumed epoch starts at its step
    assert (bar.total, bar.n) == (4, 1)
  assert isinstance(train.progress_bar(4, 0, "epoch 0", False), contextlib.nullcontext)


def test_metrics_jsonl_stays_strict_json(tmp_path):
  logger = train.MetricsWriter(tmp_path, [])
  logger.write({"epoch": 0, "train_loss": float("nan"), "val_loss": float("inf")})
  logger.close()
  strict = lambda name: pytest.fail(f"metrics.jsonl holds a bare {name}")
  (row,) = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").open()]
  assert row["train_loss"] is None and row["val_loss"] is None


def test_a_resumed_runs_records_are_rewritten_from_its_history_each_epoch_once(tmp_path):
  """metrics.jsonl and TensorBoard start again from the checkpoint's history: one event stream
  (an earlier start's file is removed, or TensorBoard would plot its epochs twice), each epoch's
  scalars under that epoch (the epoch is no plot of its own)."""
  stale = tmp_path / "tensorboard" / "events.out.tfevents.1.an-earlier-start"
  stale.parent.mkdir()
  stale.write_bytes(b"")
  (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n')  # past the checkpoint
  history = [{"epoch": 0, "train_loss": 2.0, "val_loss": 1.5}]
  writer = train.MetricsWriter(tmp_path, history)
  row = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5}
  writer.write(row)
  writer.close()
  scalars, num_files = tensorboard_scalars(tmp_path)
  assert num_files == 1 and not stale.exists()
  assert sorted(scalars) == [("train_loss", 0), ("train_loss", 1), ("val_loss", 0), ("val_loss", 1)]
  assert read_rows(tmp_path) == [*history, row]


def test_the_time_cap_stops_with_a_checkpoint_and_the_same_command_continues(
  uninterrupted, tmp_path, caplog
):
  caplog.set_level(logging.INFO, logger="train")
  capped = tiny_config(max_minutes=1e-9)  # passed before the first step: one step per start
  first = train.train_and_evaluate(capped, tmp_path)
  assert first["stopped_by"] == first["ended_by"] == "max_minutes" and "test_loss" not in first
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "train").iterdir()) == ["1"]
  again = train.train_and_evaluate(capped, tmp_path)
  assert again["stopped_by"] == "max_minutes"
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "train").iterdir()) == ["1", "2"]
  finished = train.train_and_evaluate(tiny_config(), tmp_path)
  assert finished["stopped_by"] is None and finished["ended_by"] == "num_epochs"
  assert "early stopping" not in caplog.text
  assert_resumed_like(uninterrupted[0], tmp_path)


def test_a_signal_once_the_schedule_is_done_skips_only_the_test_split(
  uninterrupted, tmp_path, monkeypatch, caplog
):
  # SIGTERM during the last epoch's validation: training is over (before, it was reported stopped
  # at step 0 of a next epoch), the test split is left for the same command, which only scores it.
  config = tiny_config(**{"data.test_split": "test"})
  end_epoch = train.end_epoch

  def signalled_in_the_last(run, state, progress):
    if progress.epoch == config.num_epochs - 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return end_epoch(run, state, progress)

  monkeypatch.setattr(train, "end_epoch", signalled_in_the_last)
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["stopped_by"] == "SIGTERM" and summary["ended_by"] == "num_epochs"
  assert "test_cer" not in summary
  assert summary["best_val_loss"] == pytest.approx(uninterrupted[1]["best_val_loss"], rel=1e-6)
  assert (
    "SIGTERM came after the last train step: training had finished; the test split 'test' is "
    "not scored, the same command scores it" in caplog.text
  )
  assert "checkpointed in" not in caplog.text
  monkeypatch.setattr(train, "end_epoch", end_epoch)
  scored = train.train_and_evaluate(config, tmp_path)
  assert scored["stopped_by"] is None and np.isfinite(scored["test_loss"])
  assert scored["global_step"] == summary["global_step"] and scored["epochs"] == config.num_epochs

  # Without a test split nothing is left to skip: the run is finished.
  caplog.clear()
  monkeypatch.setattr(train, "end_epoch", signalled_in_the_last)
  summary = train.train_and_evaluate(tiny_config(), tmp_path / "no-test-split")
  assert summary["stopped_by"] is None and summary["ended_by"] == "num_epochs"
  assert "SIGTERM came after the last train step: training had finished\n" in caplog.text


def test_the_time_cap_at_the_last_step_leaves_a_finished_run_that_scores_its_test_split(
  uninterrupted, tmp_path, monkeypatch
):
  last_step = uninterrupted[1]["global_step"]
  cut_short = train.cut_short

  def capped_at_the_last_step(run, global_step):
    if global_step == last_step:
      run.stop.deadline = 0.0  # passed
    return cut_short(run, global_step)

  monkeypatch.setattr(train, "cut_short", capped_at_the_last_step)
  summary = train.train_and_evaluate(tiny_config(**{"data.test_split": "test"}), tmp_path)
  assert summary["stopped_by"] is None and summary["ended_by"] == "num_epochs"
  assert summary["global_step"] == last_step and np.isfinite(summary["test_loss"])


@pytest.mark.parametrize("test_split", [None, "test"])
def test_a_signal_at_the_last_of_max_steps_ends_the_run_cleanly(tmp_path, monkeypatch, test_split):
  # The signal drops the compiles still queued (one thread, four buckets): the run, whose schedule
  # is done, must not then wait for them (it raised CancelledError).
  cut_short = train.cut_short

  def signalled_at_the_last_step(run, global_step):
    if global_step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return cut_short(run, global_step)

  monkeypatch.setattr(train, "cut_short", signalled_at_the_last_step)
  config = tiny_config(
    max_steps=2, compile_threads=1, **{"bucketing.num_buckets": 4, "data.test_split": test_split}
  )
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["ended_by"] == "max_steps" and summary["global_step"] == 2
  assert summary["stopped_by"] == ("SIGTERM" if test_split else None)
  assert "test_loss" not in summary


def test_a_signal_before_the_first_step_says_there_is_nothing_to_resume(
  tmp_path, monkeypatch, caplog
):
  class SignalledAtOnce(train.StopRequest):
    def __init__(self, max_minutes):
      super().__init__(max_minutes)
      self.reason = "SIGTERM"  # as if it came while the data loaded

  monkeypatch.setattr(train, "StopRequest", SignalledAtOnce)
  summary = train.train_and_evaluate(tiny_config(), tmp_path)
  assert summary["stopped_by"] == "SIGTERM" and summary["global_step"] == 0
  assert "stopped by SIGTERM before the first train step: nothing to checkpoint" in caplog.text
  assert "checkpointed in" not in caplog.text
  # The next start, with another config, starts the run: it resumes nothing, so warns of nothing.
  monkeypatch.undo()
  train.train_and_evaluate(tiny_config(num_epochs=3, max_steps=1), tmp_path)
  assert "resuming with another config" not in caplog.text


def test_a_stop_compiles_nothing_more(tmp_path, monkeypatch):
  # One compile thread, each compile at least a second: when the time cap stops the run after its
  # first step, the steps not yet compiling are dropped instead of waited for.
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  compile_step = compilation._lower_and_compile

  def slow(*job):
    time.sleep(1.0)
    return compile_step(*job)

  monkeypatch.setattr(compilation, "_lower_and_compile", slow)
  save_latest = train.Run.save_latest

  def slow_save(run, *args):  # time for the compile running at the stop to end, another to start
    time.sleep(2.0)
    return save_latest(run, *args)

  monkeypatch.setattr(train.Run, "save_latest", slow_save)
  config = tiny_config(max_minutes=1e-9, **{"bucketing.num_buckets": 4})
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["stopped_by"] == "max_minutes"
  # The first step's bucket, and the one compiling when it was taken (if any): the other train
  # steps and every eval step are left.
  compiled = summary["train_compiles"]
  assert compiled in (1, 2) and summary["eval_compiles"] == 0
  assert summary["compiles_dropped"] >= 4 + 2 - compiled
  assert summary["peak_step_memory_mb"] is None
  assert sum(size is None for size in summary["train_step_memory_mb"]) == 4 - compiled
  assert not list((tmp_path / "checkpoints").rglob("*tmp*"))
  config.max_minutes = 0
  assert train.train_and_evaluate(config, tmp_path)["compiles_dropped"] == 0


SIGTERM_WORKER = """
import runpy, signal, sys, time
sys.path.insert(0, {root!r})
import bucketing

iterate = bucketing.iterate


def held_iterate(*args, **kwargs):
  # Holds the schedule at epoch 1, step 3 until the trainer has handled SIGTERM (its handler puts
  # the default back), so the signal lands mid-epoch however fast the machine is.
  for scheduled in iterate(*args, **kwargs):
    if (scheduled.epoch, scheduled.step) == (1, 3):
      print("READY", flush=True)
      while signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        time.sleep(0.01)
    yield scheduled


bucketing.iterate = held_iterate
sys.argv = ["train.py", "--config=experiments/synthetic.py:tiny", "--workdir=" + {workdir!r}]
runpy.run_path("train.py", run_name="__main__")
"""


def test_sigterm_checkpoints_mid_epoch_and_the_run_resumes_to_the_same_result(
  uninterrupted, tmp_path
):
  root = pathlib.Path(train.__file__).parent
  code = SIGTERM_WORKER.format(root=str(root), workdir=str(tmp_path / "run"))
  with (tmp_path / "stderr").open("w") as stderr:
    worker = subprocess.Popen(
      [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    assert worker.stdout.readline().strip() == "READY"
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=300)
  errors = (tmp_path / "stderr").read_text()
  assert worker.returncode == 128 + signal.SIGTERM, errors
  assert "Traceback" not in errors
  last = errors.strip().splitlines()[-1]
  assert re.fullmatch(
    r"stopped by SIGTERM at global step \d+ \(epoch 1, step [1-6] of .*resume", last
  )
  train.train_and_evaluate(tiny_config(), tmp_path / "run")
  assert_resumed_like(uninterrupted[0], tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Bad lines and surprising data, through an .npz export.

PROBLEMS = {
  "nan": "not finite",
  "inf": "not finite",
  "empty ink": "no points",
  "empty text": "empty",
}


def spoil(example, problem):
  """`example` with `problem`, which the trainer must catch when it loads the data."""
  if problem == "empty text":
    return example | {"text": ""}
  if problem == "empty ink":
    return example | {"points": np.zeros((0, 3), np.float32), "stroke_end": np.zeros(0, bool)}
  points = example["points"].copy()
  points[1, 0] = np.nan if problem == "nan" else np.inf
  return example | {"points": points}


def export_with_bad_lines(path, bad):
  """A tiny synthetic .npz export whose `bad` {split: [problem, ...]} spoil lines 0, 1, ... (a
  None problem leaves its line sound)."""
  sizes = {"train": 48, "validation": 16}
  examples = {
    split: train.dataset_lib.load_examples("synthetic", split, limit=size)
    for split, size in sizes.items()
  }
  for split, problems in bad.items():
    for line, problem in enumerate(problems):
      if problem is not None:
        examples[split][line] = spoil(examples[split][line], problem)
  train.dataset_lib.write_export(path, examples, {})
  return examples


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_a_bad_line_is_named_before_anything_trains(tmp_path, split, problem):
  examples = export_with_bad_lines(tmp_path / "data.npz", {split: [problem]})
  line = examples[split][0]["id"]
  with pytest.raises(
    train.dataset_lib.BadExampleError,
    match=rf"{split}.*{line}: .*{PROBLEMS[problem]}.*data: the numpy export",
  ):
    train.train_and_evaluate(
      tiny_config(**{"data.dataset": str(tmp_path / "data.npz")}), tmp_path / "run"
    )
  assert not (tmp_path / "run").exists()


def test_bad_lines_are_skipped_and_counted_when_asked(tmp_path, caplog):
  bad = {"train": list(PROBLEMS), "validation": list(PROBLEMS)}
  examples = export_with_bad_lines(tmp_path / "data.npz", bad)
  config = tiny_config(**{"data.dataset": str(tmp_path / "data.npz"), "data.bad_examples": "skip"})
  summary = train.train_and_evaluate(config, tmp_path / "run")
  assert summary["num_skipped_examples"] == 8
  assert {(line["split"], line["id"]) for line in summary["skipped_examples"]} == {
    (split, examples[split][line]["id"]) for split in bad for line in range(4)
  }
  assert all(np.isfinite(row["val_loss"]) for row in read_rows(tmp_path / "run"))
  assert summary["best_epoch"] >= 0
  # Scoring a split later counts what it leaves out the same way.
  with caplog.at_level(logging.INFO, logger=train.LOG.name):
    scores = train.evaluate_checkpoint(config, tmp_path / "run", "validation")
  first = examples["validation"][0]["id"]
  assert (
    f"skipped 4 bad line(s) (config.data.bad_examples='skip'): validation 4; the first: {first}"
    in (caplog.text)
  )
  # The 16 lines eval_limit took, 4 of them skipped: the split may have more than were scored.
  assert "scoring the first 16 lines of 'validation' only (config.data.eval_limit" in caplog.text
  assert scores["examples"] == 16 - 4
  assert [line["id"] for line in scores["skipped_examples"]] == [
    examples["validation"][line]["id"] for line in range(4)
  ]
  assert scores["num_skipped_examples"] == 4


def test_lines_past_the_last_bound_are_counted_and_truncation_is_warned_of(tmp_path, caplog):
  lengths = train.load_split(tiny_config(), "train", 48).lengths
  bound = int(np.sort(lengths)[-4])  # the 3 longest lines are longer (unless tied)
  longer = int(np.sum(lengths > bound))
  for overflow, count in (("drop", "num_dropped_examples"), ("truncate", "num_truncated_examples")):
    config = tiny_config(
      **{
        "num_epochs": 1,
        "bucketing.strategy": "fixed",
        "bucketing.upper_bounds": (bound,),
        "bucketing.round_to": 1,
        "bucketing.overflow": overflow,
      }
    )
    summary = train.train_and_evaluate(config, tmp_path / overflow)
    assert summary[count] == longer
    (row,) = read_rows(tmp_path / overflow)
    trained = 48 - longer if overflow == "drop" else 48  # the lines an epoch trains on
    assert row["sequences_per_s"] * row["epoch_time_s"] == pytest.approx(trained)
  assert f"{longer} training line(s) longer than the last bound, {bound} frames" in caplog.text


def test_the_plan_predicts_by_the_configured_cost_model_or_not_at_all(tmp_path):
  given = {"bucketing.alpha": 1e-3, "bucketing.gamma": 0.0, "bucketing.beta": 3e-6}
  train.train_and_evaluate(tiny_config(num_epochs=1, **given, **{"bucketing.kappa": 0.5}), tmp_path)
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert plan["cost_model"] == {"alpha": 1e-3, "beta": 3e-6, "kappa": 0.5, "gamma": 0.0}
  assert plan["predicted_speedup"] > 1
  # Not all given and nothing measured (not `auto`): no placeholder passed off as a prediction.
  train.train_and_evaluate(tiny_config(num_epochs=1, **given), tmp_path / "partial")
  plan = json.loads((tmp_path / "partial" / "plan.json").read_text())
  assert plan["cost_model"] is None and plan["predicted_speedup"] is None


@pytest.mark.parametrize(
  ("sizing", "shapes"),
  [
    # A fixed batch: the longest and the median padded lengths (beta folds into gamma).
    ({}, [(8, "longest"), (8, "median")]),
    # A token budget: those at their budget's batch, and half of the median's batch.
    (
      token_budget(32 * 600),
      [(32, "longest"), (56, "median"), (24, "median")],
    ),
  ],
)
def test_measured_cost_model_times_real_compiles_of_the_planned_shapes(tmp_path, sizing, shapes):
  config = tiny_config(compilation_cache_dir=str(tmp_path / "cache"), **sizing)
  train.setup_runtime(config)
  data = train.load_split(config, "train", 48)
  # Its compiles ask nothing of the persistent cache: a hit there would time a file read.
  requests = compilation.CompileEvents.count(compilation.CACHE_REQUEST_EVENT, True)
  measured = train.measure_cost_model(config, data, train.make_data_mesh(), repeats=1)
  assert compilation.CompileEvents.count(compilation.CACHE_REQUEST_EVENT, True) == requests
  assert jax.config.jax_enable_compilation_cache  # and it is on again after
  lengths = {
    "longest": int(bucketing.boundaries.round_up(data.lengths.max(), 8)),
    "median": int(bucketing.boundaries.round_up(np.median(data.lengths), 8)),
  }
  steps = measured.report["steps"]
  assert [(step["batch"], step["length"]) for step in steps] == [
    (rows, lengths[length]) for rows, length in shapes
  ]
  assert all(step["seconds"] > 0 and step["compile_s"] > 0 for step in steps)
  # A step costs something; the non-negative fit may put all of it on any of the three terms
  # (with a token budget a noisy fit gave it all to beta), except beta with a fixed batch.
  model = measured.model
  assert model.kappa > 0 and model.alpha + model.gamma + model.beta > 0
  assert measured.report["fitted_to"]["num_devices"] == 8
  if "bucketing.max_tokens" not in sizing:
    assert model.beta == 0.0


@pytest.mark.slow
def test_auto_measures_its_cost_model_once_and_a_resumed_run_keeps_it(
  tmp_path, monkeypatch, caplog
):
  first = train.train_and_evaluate(_auto_config(max_steps=3), tmp_path)  # stops mid-epoch
  saved = json.loads((tmp_path / train.COST_FILE).read_text())
  plan = json.loads((tmp_path / "plan.json").read_text())
  assert first["cost_model_measure_s"] == saved["report"]["measure_s"] > 0
  assert plan["cost_model"] == saved["cost_model"] == plan["measured_cost"]["cost_model"]
  assert len(plan["auto_seconds_per_count"]) == 3

  def measure_again(*args, **kwargs):
    raise AssertionError("a resumed run measured its cost model again")

  monkeypatch.setattr(train, "measure_cost_model", measure_again)
  # Resumed with a setting its figures were not measured for: it keeps them, so that it plans
  # the buckets it started with (new figures could plan others, and the resume be refused).
  # Without its cost_model.json, it plans with the copy in plan.json and writes the file again.
  (tmp_path / train.COST_FILE).unlink()
  resumed = train.train_and_evaluate(_auto_config(**{"model.dropout_rate": 0.5}), tmp_path)
  assert resumed["stopped_by"] is None
  assert json.loads((tmp_path / train.COST_FILE).read_text()) == saved
  assert json.loads((tmp_path / "plan.json").read_text())["measured_cost"]["reused"]
  # Without the file and with a damaged plan.json, it says why it measures again.
  (tmp_path / train.COST_FILE).unlink()
  (tmp_path / "plan.json").write_text("{")
  remeasured = train.MeasuredCost(bucketing.CostModel(**saved["cost_model"]), saved["report"])
  monkeypatch.setattr(train, "measure_cost_model", lambda *args: remeasured)
  with caplog.at_level(logging.WARNING, logger="train"):
    train.train_and_evaluate(_auto_config(**{"model.dropout_rate": 0.5}), tmp_path)
  assert f"its copy in plan.json cannot be used ({tmp_path / 'plan.json'}: not valid JSON" in (
    caplog.text
  )
  # Given every figure, nothing is measured.
  given = {f"bucketing.{field}": 1e-3 for field in train.COST_FIELDS}
  summary = train.train_and_evaluate(_auto_config(**given), tmp_path / "given")
  assert summary["cost_model_measure_s"] == 0.0
  assert not (tmp_path / "given" / train.COST_FILE).exists()


@pytest.mark.parametrize(
  ("base", "other"),
  [
    ({}, {"ctc.impl": "optax"}),
    ({}, {"bucketing.batch_size": 16}),
    ({}, token_budget(4096)),
    (token_budget(4096), token_budget(8192)),
    ({}, {"model.hidden_size": 32}),
    ({}, {"model.dtype": "bfloat16"}),
  ],
  ids=["ctc", "batch size", "token budget", "another token budget", "model size", "dtype"],
)
def test_a_fresh_run_measures_again_for_other_settings(tmp_path, monkeypatch, caplog, base, other):
  """The figures hold for the model, the CTC loss, the batch rule and the devices they were
  measured for (a step's time depends on each)."""
  measured = []

  def stand_in(config, *args):  # the decision is under test, not the timing
    measured.append(train.flat_config(config))
    fitted_to = train._cost_fingerprint(config)
    return train.MeasuredCost(
      bucketing.CostModel(alpha=1e-3, beta=1e-9, gamma=1e-6, kappa=1.0),
      {"steps": [], "measure_s": 0.5, "fitted_to": fitted_to},
    )

  monkeypatch.setattr(train, "measure_cost_model", stand_in)
  config = _auto_config(**base)
  data = train.load_split(config, "train", 48)
  mesh = train.make_data_mesh()
  first = train.auto_cost_model(config, data, mesh, tmp_path)
  # A fresh workdir: no resumed run's copy in plan.json to miss, nothing to warn of.
  assert "is missing" not in caplog.text
  again = train.auto_cost_model(config, data, mesh, tmp_path)
  assert measured == [train.flat_config(config)]  # the same settings: the workdir's figures hold
  assert (again.model, again.report, again.reused) == (first.model, first.report, True)
  # The log line says which: figures read back are not this start's measurements.
  assert "auto's cost model, measured (0.5 s on 8 " in train.describe_cost_model(first)
  assert "auto's cost model, read back from the workdir (0.5 s" in train.describe_cost_model(again)
  other = _auto_config(**other)
  assert not train.auto_cost_model(other, data, mesh, tmp_path).reused
  assert measured == [train.flat_config(config), train.flat_config(other)]
  saved = json.loads((tmp_path / train.COST_FILE).read_text())
  assert saved["report"]["fitted_to"] == train._cost_fingerprint(other)


def test_auto_measures_the_figures_its_config_leaves_unset_and_keeps_those_given():
  assert train.measures_cost_model(_auto_config())
  assert train.measures_cost_model(_auto_config(**{"bucketing.alpha": 1e-3}))  # one given
  given = {f"bucketing.{field}": 0.0 for field in train.COST_FIELDS}
  assert not train.measures_cost_model(_auto_config(**given))
  assert not train.measures_cost_model(tiny_config())  # not auto: no plan depends on them
  # A figure given as 0 is a figure: the measured one fills only those left unset.
  measured = bucketing.CostModel(alpha=1e-3, beta=1e-9, gamma=1e-6, kappa=2.0)
  config = _auto_config(**{"bucketing.beta": 0.0, "bucketing.kappa": 0.5})
  assert train.cost_model(config, measured) == bucketing.CostModel(
    alpha=1e-3, beta=0.0, gamma=1e-6, kappa=0.5
  )


def test_measuring_times_the_longest_and_the_next_padded_length_at_their_widest_labels(
  monkeypatch,
):
  """Most lines here pad to the longest length, so the median line does too: the second step is
  at the next padded length down instead (two steps of one length cannot tell a step's cost per
  timestep). Each step's labels are as wide as the widest among the lines its length holds."""
  timed = []

  def stand_in(state, mesh, num_features, rows, length, label_width, repeats, rng):
    timed.append((rows, length, label_width))
    return state, 1e-3 + 1e-5 * length, 1.0 + length / 16  # seconds a step, its compile's

  monkeypatch.setattr(train, "time_train_step", stand_in)
  # Rounded to 8: 16 and 64 (the median's).
  lines = blank_lines([10, 60, 62, 64, 64], label_lengths=[2, 5, 4, 9, 3])
  measured = train.measure_cost_model(tiny_config(), lines, train.make_data_mesh())
  assert timed == [(8, 64, 9), (8, 16, 2)]
  assert [(step["batch"], step["length"]) for step in measured.report["steps"]] == [
    (8, 64),
    (8, 16),
  ]
  model = measured.model
  # kappa: the median compile (5 s and 2 s here).
  assert (model.alpha, model.gamma, model.beta, model.kappa) == pytest.approx((1e-3, 1e-5, 0, 3.5))
  # A token budget adds a step at half a batch down to one row per device: 16 rows fit the
  # budget at 16 frames, so 8 (64 frames get the floor of a row per device, past the budget).
  timed.clear()
  train.measure_cost_model(tiny_config(**token_budget(256)), lines, train.make_data_mesh())
  assert timed == [(8, 64, 9), (16, 16, 2), (8, 16, 2)]


def test_auto_plans_for_all_the_runs_epochs_and_pays_its_compiles_once():
  """A long run buys more buckets than one epoch would: each saves time every epoch, while its
  compile is paid once."""
  data = train.load_split(tiny_config(), "train", 48)
  given = dict(zip(train.COST_FIELDS, (1e-3, 1e-5, 1e-7, 0.02), strict=True))
  given = {f"bucketing.{field}": value for field, value in given.items()}
  buckets = [
    train.make_train_plan(_auto_config(num_epochs=epochs, **given), data, 8).num_buckets
    for epochs in (1, 100)
  ]
  assert buckets[0] < buckets[1]


def test_auto_measures_nothing_for_lines_of_one_padded_length(tmp_path):
  """One padded length plans one bucket whatever the costs (and two are needed to fit them)."""
  lines = blank_lines([58, 60, 64])  # all 64 once rounded to 8
  assert train.auto_cost_model(_auto_config(), lines, train.make_data_mesh(), tmp_path) is None
  assert not (tmp_path / train.COST_FILE).exists()
  with pytest.raises(
    ValueError, match=r"measuring a cost model needs two padded lengths, got \[64\]"
  ):
    train.measure_cost_model(_auto_config(), lines, train.make_data_mesh())


def _auto_config(**overrides):
  return tiny_config(**{"bucketing.strategy": "auto", "bucketing.num_buckets": 3, **overrides})


def test_an_old_export_in_the_default_data_dir_is_not_used_unasked(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv("HANDWRITING_DATA_DIR", raising=False)
  export_with_bad_lines(tmp_path / "tensorflow_datasets" / "iam_ondb.npz", {})
  config = iam.get_config("tiny")
  config.data.manual_dir = None
  with pytest.raises(ValueError, match=r"--config\.data\.data_dir=.*tensorflow_datasets"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  # Pointed at the IAM-OnDB download, the user asks for IAM-OnDB: the export found in the
  # default data dir is then taken, not refused.
  config.data.manual_dir = str(tmp_path / "download")
  assert train.data_source(config).path == tmp_path / "tensorflow_datasets" / "iam_ondb.npz"


def test_the_run_says_which_implementations_auto_chose():
  assert train.describe_implementations(tiny_config()) == (
    "on cpu: LSTM recurrence lax.scan, unroll 1 (lstm_impl='auto'), "
    "CTC loss optax (ctc.impl='auto')"
  )
  kernels = tiny_config(**KERNELS)
  assert train.describe_implementations(kernels).count("the fused Pallas kernel") == 2
  launch = tiny_config(**KERNELS, **{"model.kernel.approx_activations": True})
  assert (
    "LSTM recurrence the fused Pallas kernel (tile 16, 8 warps, weights re-read, 1 stage(s), "
    "approx. activations)" in train.describe_implementations(launch)
  )


def test_a_full_disk_ends_the_run_with_its_own_error_and_a_restart_continues(tmp_path, monkeypatch):
  saves = []
  save_latest = Checkpoints.save_latest

  def fills_the_disk_on_the_third_save(self, state, progress, plan):
    saves.append(progress.step_in_epoch)
    if len(saves) == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    save_latest(self, state, progress, plan)

  monkeypatch.setattr(Checkpoints, "save_latest", fills_the_disk_on_the_third_save)
  config = tiny_config(checkpoint_every_steps=1)
  with pytest.raises(OSError, match="No space left on device"):
    train.train_and_evaluate(config, tmp_path)
  # The saves before it were finished, none left half-written.
  assert not list((tmp_path / "checkpoints").rglob("*tmp*"))
  monkeypatch.undo()
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["epochs"] == config.num_epochs and summary["stopped_by"] is None


def test_a_test_split_that_is_the_validation_split_is_loaded_and_its_skips_counted_once(tmp_path):
  bad = {"validation": list(PROBLEMS)}
  export_with_bad_lines(tmp_path / "data.npz", bad)
  config = tiny_config(
    **{
      "data.dataset": str(tmp_path / "data.npz"),
      "data.bad_examples": "skip",
      "data.test_split": "validation",
    }
  )
  _, eval_sets, skipped = train.load_data(config)
  assert list(eval_sets) == ["validation"]
  assert [line["split"] for line in skipped] == ["validation"] * len(PROBLEMS)


@pytest.mark.parametrize("eval_limit, kept", [(0, 12), (6, 4), (16, 12)])
def test_training_on_the_validation_split_counts_its_skipped_lines_once(
  tmp_path, monkeypatch, eval_limit, kept
):
  # Lines 4 to 7 are bad: a limit of 6 loads two of them, the training split's load all four.
  bad = [None] * 4 + list(PROBLEMS)
  examples = export_with_bad_lines(tmp_path / "data.npz", {"validation": bad})
  limits = []
  load_checked = train._load_checked

  def counted(config, split, limit, source):
    limits.append(limit)
    return load_checked(config, split, limit, source)

  monkeypatch.setattr(train, "_load_checked", counted)
  config = tiny_config(
    **{
      "data.dataset": str(tmp_path / "data.npz"),
      "data.bad_examples": "skip",
      "data.train_split": "validation",
      "data.train_limit": 0,
      "data.eval_limit": eval_limit,
    }
  )
  train_set, eval_sets, skipped = train.load_data(config)
  assert len(train_set.ids) == 12 and len(eval_sets["validation"].ids) == kept
  assert [line["id"] for line in skipped] == [line["id"] for line in examples["validation"][4:8]]
  assert limits == ([0] if eval_limit == 0 else [0, eval_limit])  # one load per split and limit


def test_prefetch_closed_early_waits_for_the_batch_being_assembled_and_drops_those_queued():
  pulled, assembling, release = [], threading.Event(), threading.Event()

  def batches():
    for item in range(5):
      if item == 1:  # being assembled when the consumer stops, with item 2 queued behind it
        assembling.set()
        release.wait(10)
      pulled.append(item)
      yield item

  prefetched = train._prefetch(batches(), depth=2)
  assert next(prefetched) == 0
  assert assembling.wait(10)
  timer = threading.Timer(0.2, release.set)
  timer.start()
  prefetched.close()
  timer.join()
  assert pulled == [0, 1]


def test_the_progress_bar_rate_of_a_resumed_epoch_counts_only_this_starts_lines(
  stopped_at_step_6, tmp_path, monkeypatch
):
  class Bar:  # a second on its clock at every step
    n, format_dict, rates = 0, {"elapsed": 1.0}, []

    def update(self, steps):
      self.n += steps

    def set_postfix(self, loss, seq_per_s):
      self.rates.append(float(seq_per_s))

  bar = Bar()
  monkeypatch.setattr(train, "progress_bar", lambda *args: contextlib.nullcontext(bar))
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_step_6, workdir)
  train.train_and_evaluate(tiny_config(max_steps=7, progress_bar=True), workdir)
  batch = tiny_config().bucketing.batch_size
  assert bar.n == 7 and len(bar.rates) == 1  # the bar starts at step 6, then one step
  assert 0 < bar.rates[0] <= batch  # one step's lines, not the 6 before as well
