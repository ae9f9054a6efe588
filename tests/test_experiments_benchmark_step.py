"""The step-anatomy driver: the sections and rows it promises, kernels checked on the way."""

import json
import re
import subprocess
import sys
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import cli_errors
import train
from experiments import benchmark_step, synthetic
from models.lstm_kernel import LAUNCH_FIELDS, KernelConfig
from tests.test_experiments_benchmark import run_as_a_user, table_rows


def is_number(cell: str) -> bool:
  try:
    float(cell)
  except ValueError:
    return False
  return True


@pytest.mark.slow
def test_tiny_run_writes_tuning_and_anatomy_tables(tmp_path):
  out = tmp_path / "step.md"
  argv = ["--preset", "tiny", "--tune", "--repeats", "1", "--out", str(out)]
  run_as_a_user("experiments.benchmark_step", argv)
  text = out.read_text()
  assert "Machine:" in text and "python -m experiments.benchmark_step --preset tiny" in text

  lstm_rows = table_rows(text[: text.index("## The CTC kernel")], "variant")
  scan_rows = ["scan, unroll 8", "scan, unroll 8, bfloat16 weights", "scan, unroll 8, prefetch"]
  assert [row[0] for row in lstm_rows[:3]] == scan_rows
  assert len(lstm_rows) == 3 + len(benchmark_step.TUNE_GRID)
  for name, ms, error in lstm_rows[2:]:
    assert is_number(ms), name
    # The prefetching scan and the interpreter compute what the scan does in float32; bfloat16
    # weights round.
    assert float(error) < (1e-5 if "bfloat16" not in name else 1e-2), name
  assert "the rest of this run uses the fastest: tile 16" in text

  ctc_rows = table_rows(text[text.index("## The CTC kernel") : text.index("## Anatomy")], "variant")
  assert ctc_rows[0][0] == "optax.ctc_loss"
  assert len(ctc_rows) == 1 + len(benchmark_step.CTC_TUNE_GRID)
  assert all(is_number(row[1]) and "NOT repeatable" not in row[2] for row in ctc_rows)

  anatomy = table_rows(text, "B")
  assert [row[2] for row in anatomy] == list(benchmark_step.PRESETS["tiny"][(8, 24)])
  assert all(is_number(cell) for row in anatomy for cell in row[3:8])


def test_the_backward_column_times_the_models_gradient_alone():
  """The backward pass from saved residuals is the model's gradient, so the column times the real
  thing (it was forward + backward less forward, which noise could make negative)."""
  config = synthetic.get_config("tiny")
  state = train.create_train_state(config, benchmark_step.NUM_FEATURES, 10)
  batch = benchmark_step.random_batch(2, 12)
  inputs, paddings = batch["inputs"], batch["input_paddings"]

  def forward(params):
    return state.apply_fn({"params": params}, inputs, paddings)

  cotangent = jnp.asarray(np.random.default_rng(0).normal(size=forward(state.params).shape))
  pullback, backward = benchmark_step.model_backward(forward, state.params)
  (grads,) = backward(pullback, cotangent)
  expected = jax.grad(lambda params: jnp.sum(forward(params) * cotangent))(state.params)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_variant_that_fails_is_reported_and_the_others_still_chosen(monkeypatch):
  broken = KernelConfig(batch_tile=16, num_warps=3)
  monkeypatch.setattr(
    benchmark_step,
    "TUNE_GRID",
    [(broken, jnp.float32), (KernelConfig(num_warps=8, weights_resident=False), jnp.float32)],
  )
  real_kernel = benchmark_step.lstm_recurrence_kernel

  def kernel(projected, recurrent_kernel, config):
    if config.num_warps == 3:
      raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded\n  at lowering")
    return real_kernel(projected, recurrent_kernel, config)

  monkeypatch.setattr(benchmark_step, "lstm_recurrence_kernel", kernel)
  best, rows = benchmark_step.tune_kernel(repeats=1, interpret=True)
  assert list(best) == ["float32"] and best["float32"].num_warps == 8 and best["float32"].interpret
  failed = [row for row in rows if row["ms"] == "failed"]
  assert len(failed) == 1 and "Shared memory" in failed[0]["max relative error"]


def test_xla_flag_variants_run_in_their_own_process_beside_a_baseline(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  dump = tmp_path / "dump"
  rows = benchmark_step.flag_variants(
    ["no such flag=--xla_no_such_flag_at_all=1", f"dump=--xla_dump_to={dump}"], "tiny", {}, {}, 1
  )
  assert [row["XLA_FLAGS"].split(":")[0] for row in rows] == [
    benchmark_step.NO_EXTRA_FLAGS,
    "no such flag",
    "dump",
  ]
  implementations = benchmark_step.PRESETS["tiny"][(8, 24)]
  for row in (rows[0], rows[2]):
    timed = re.findall(r"(.+?) ([\d.]+) ms(?:, |$)", row["result"])
    assert [name for name, _ in timed] == list(implementations), row
  assert rows[1]["result"].startswith("failed:") and "xla_no_such_flag_at_all" in rows[1]["result"]
  assert any(dump.iterdir())  # the flags reached the child's backend


def never_time(*args, **kwargs):
  pytest.fail("a measurement started before the command line and the data were checked")


def test_a_missing_export_is_refused_before_anything_is_timed(tmp_path, monkeypatch, capsys):
  # Before, the anatomy was timed first and the run ended "epoch failed", exit code 0.
  monkeypatch.delenv("IAM_ONDB_DIR", raising=False)  # else the data would be built from it
  monkeypatch.setattr(benchmark_step, "torch_step_ms", never_time)
  out = tmp_path / "step.md"
  argv = ["--preset", "tiny", "--epoch", "--data-dir", str(tmp_path), "--out", str(out)]
  assert cli_errors.run(lambda: benchmark_step.main(argv)) == cli_errors.USAGE_EXIT_CODE
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: IAM-OnDB is not built") and str(tmp_path / "iam_ondb.npz") in line
  assert not out.exists()


def test_a_mistyped_epoch_strategy_names_the_flag(tmp_path, monkeypatch):
  monkeypatch.setattr(benchmark_step, "load_epoch_data", never_time)
  argv = ["--preset", "tiny", "--epoch", "--data-dir", str(tmp_path), "--epoch-strategies"]
  with pytest.raises(cli_errors.UsageError, match="--epoch-strategies: unknown strategy 'nonee'"):
    benchmark_step.main([*argv, "optimal,nonee"])


def test_the_epoch_table_runs_our_model_in_each_dtype_beside_float32_pytorch(tmp_path, monkeypatch):
  built = []

  class Bench:
    def __init__(self, config, data, repeats):
      self.dtype, self.kernel = config.model.dtype, config.model.kernel.to_dict()
      built.append(self)

    def plan(self, strategy, num_buckets):
      return (strategy, num_buckets)

    def contender(self, name, plan):
      measurement = mock.Mock(contender=name, epoch_seconds=2.0, epochs_seconds=[2.0, 2.0])
      measurement.row.return_value = {
        "contender": name,
        "strategy": plan[0],
        "K": str(plan[1]),
        "compile (s)": "1.0",
        "padded/real": "1.100",
      }
      return measurement

  torch_configs = []
  monkeypatch.setattr(benchmark_step.benchmark, "Bench", Bench)
  monkeypatch.setattr(
    benchmark_step.benchmark,
    "torch_contenders",
    lambda config, data, repeats: torch_configs.append(config.model.dtype) or "no torch",
  )
  monkeypatch.setattr(benchmark_step.benchmark, "take_turns", lambda measurements, repeats: None)
  monkeypatch.setattr(benchmark_step, "load_epoch_data", lambda preset, data_dir: [None] * 64)
  monkeypatch.setattr(benchmark_step, "anatomy", never_time)  # --no-anatomy
  out = tmp_path / "epoch.md"
  argv = ["--preset", "tiny", "--no-anatomy", "--epoch", "--data-dir", str(tmp_path)]
  argv += ["--epoch-strategies", "optimal", "--epoch-dtypes", "float32,bfloat16"]
  assert benchmark_step.main([*argv, "--out", str(out)]) == out

  assert [bench.dtype for bench in built] == ["float32", "bfloat16"]
  assert torch_configs == ["float32"]
  # Untuned, the kernel's launch stays the config's None: the dtype's measured fastest.
  assert all(value is None for bench in built for value in bench.kernel.values())
  text = out.read_text()
  assert text.startswith("# The train step benchmark, without its anatomy table\n")
  assert "## Anatomy" not in text and "the model in float32 and bfloat16" in text
  assert "PyTorch's in float32 (no PyTorch row: no torch)." in text  # not left out unsaid
  assert "Model: `experiments/iam.py:tiny` (1 x BLSTM 16, CTC" in text
  rows = table_rows(text, "contender")
  assert [row[:2] for row in rows] == [
    ["ours float32, optimal", "8"],
    ["ours bfloat16, optimal", "8"],
  ]
  with pytest.raises(cli_errors.UsageError, match="--epoch-dtypes: unknown dtype 'float16'"):
    benchmark_step.main([*argv[:-1], "float32,float16"])
  with pytest.raises(cli_errors.UsageError, match=r"--epoch-dtypes .* needs --epoch"):
    benchmark_step.main(["--preset", "tiny", "--epoch-dtypes", "bfloat16"])
  with pytest.raises(cli_errors.UsageError, match=r"--epoch-strategies .* needs --epoch"):
    benchmark_step.main(["--preset", "tiny", "--epoch-strategies", "none"])
  with pytest.raises(cli_errors.UsageError, match="--no-anatomy leaves nothing to measure"):
    benchmark_step.main(["--preset", "tiny", "--no-anatomy"])


def test_a_failed_measurement_keeps_the_other_rows_and_exits_non_zero(
  tmp_path, monkeypatch, capsys
):
  # Before, a failed anatomy row or epoch only printed "failed" and the command exited 0.
  def anatomy(config, batch, repeats):
    if config.model.lstm_impl == "pallas":
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return {"step": 5.0, "forward": 1.0, "backward": 2.0, "ctc": 0.5, "optimizer": 0.25}

  def epoch_rows(*args):
    raise RuntimeError("the device went away")

  monkeypatch.setattr(benchmark_step, "anatomy", anatomy)
  monkeypatch.setattr(benchmark_step, "load_epoch_data", lambda preset, data_dir: [None] * 64)
  monkeypatch.setattr(benchmark_step, "epoch_rows", epoch_rows)
  out = tmp_path / "step.md"
  argv = ["--preset", "tiny", "--epoch", "--data-dir", str(tmp_path), "--out", str(out)]
  assert cli_errors.run(lambda: benchmark_step.main(argv)) == benchmark_step.MEASUREMENT_FAILED != 0
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"error: 2 measurement(s) failed, the rest are in {out}: ")
  assert "pallas LSTM, pallas CTC at B = 8, T = 24: RESOURCE_EXHAUSTED" in line
  assert "the epoch: the device went away" in line

  text = out.read_text()
  anatomy_rows = {row[2]: row[3:8] for row in table_rows(text, "B")}
  assert anatomy_rows == {
    "scan unroll 1, optax CTC": ["5.00", "1.00", "2.00", "0.50", "0.25"],
    "pallas LSTM, pallas CTC": ["failed"] * 5,
  }
  assert "## One IAM-OnDB training epoch (64 lines, raw points, batch 8)" in text  # the tiny's
  assert table_rows(text, "contender") == [["failed", "the device went away"]]


def test_a_run_stopped_while_timing_steps_keeps_the_rows_it_measured(tmp_path, monkeypatch):
  # A GPU call's deadline stopped the anatomy after five of its rows, and the file kept none.
  def anatomy(config, batch, repeats):
    if config.model.lstm_impl == "pallas":
      raise KeyboardInterrupt  # the SIGINT of gpu_call.sh's deadline
    return {"step": 5.0, "forward": 1.0, "backward": 2.0, "ctc": 0.5, "optimizer": 0.25}

  monkeypatch.setattr(benchmark_step, "anatomy", anatomy)
  out = tmp_path / "step.md"
  with pytest.raises(KeyboardInterrupt):
    benchmark_step.main(["--preset", "tiny", "--out", str(out)])
  text = out.read_text()
  stopped = "The rows measured before the run stopped (it had more to time)."
  assert stopped in text
  rows = table_rows(text, "B")
  assert [row[2:8] for row in rows] == [
    ["scan unroll 1, optax CTC", "5.00", "1.00", "2.00", "0.50", "0.25"]
  ]

  # A run that finishes says nothing of stopping.
  monkeypatch.setitem(benchmark_step.PRESETS, "tiny", {(8, 24): ("scan unroll 1, optax CTC",)})
  benchmark_step.main(["--preset", "tiny", "--out", str(out)])
  assert stopped not in out.read_text()


def test_a_kernel_no_variant_of_which_works_is_left_out_and_exits_non_zero(
  tmp_path, monkeypatch, capsys
):
  def anatomy(config, batch, repeats):
    assert config.model.lstm_impl != "pallas"  # left out once its tuning found no variant
    return {"step": 5.0, "forward": 1.0, "backward": 2.0, "ctc": 0.5, "optimizer": 0.25}

  failed_row = [{"variant": "tile 16", "ms": "failed", "error": "-"}]
  monkeypatch.setattr(benchmark_step, "tune_kernel", lambda *args, **kwargs: ({}, failed_row))
  monkeypatch.setattr(benchmark_step, "tune_ctc", lambda *args, **kwargs: (None, failed_row))
  monkeypatch.setattr(benchmark_step, "anatomy", anatomy)
  out = tmp_path / "step.md"
  argv = ["--preset", "tiny", "--tune", "--out", str(out)]
  assert cli_errors.run(lambda: benchmark_step.main(argv)) == benchmark_step.MEASUREMENT_FAILED
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: 2 measurement(s) failed")
  assert "tuning model.lstm_impl: no LSTM kernel variant compiled and matched the scan" in line
  assert "tuning ctc.impl: no CTC kernel variant compiled" in line


def test_a_bfloat16_models_step_runs_the_fastest_variant_for_bfloat16_weights(
  tmp_path, monkeypatch
):
  fastest = {
    "float32": KernelConfig(num_warps=8, weights_resident=False),
    "bfloat16": KernelConfig(num_warps=16, weights_resident=True, prefetch=True),
  }
  lstm_rows = [{"variant": "tile 16", "ms": "1.00", "max relative error": "0"}]
  ctc_rows = [{"variant": "tile 1, 2 warps", "ms": "1.00", "deviation from optax": "0"}]
  monkeypatch.setattr(benchmark_step, "tune_kernel", lambda *args, **kwargs: (fastest, lstm_rows))
  monkeypatch.setattr(
    benchmark_step,
    "tune_ctc",
    lambda *args, **kwargs: ({"ctc.batch_tile": 1, "ctc.num_warps": 2}, ctc_rows),
  )
  launched = {}

  def anatomy(config, batch, repeats):
    launched[config.model.dtype] = config.model.kernel.to_dict()
    return {"step": 5.0, "forward": 1.0, "backward": 2.0, "ctc": 0.5, "optimizer": 0.25}

  monkeypatch.setattr(benchmark_step, "anatomy", anatomy)
  implementations = ("pallas LSTM, pallas CTC", "pallas LSTM, pallas CTC, bfloat16")
  monkeypatch.setitem(benchmark_step.PRESETS, "tiny", {(8, 24): implementations})
  out = tmp_path / "step.md"
  benchmark_step.main(["--preset", "tiny", "--tune", "--out", str(out)])

  for dtype, variant in fastest.items():
    assert launched[dtype] == {field: getattr(variant, field) for field in LAUNCH_FIELDS}
  assert "weights resident, 1 stage(s), prefetch for bfloat16 models" in out.read_text()


def test_a_dtype_no_variant_was_tuned_for_keeps_its_measured_defaults(tmp_path, monkeypatch):
  # Float32's tuned launch reached bfloat16 models too when no bfloat16 variant was tuned (each
  # failed, or the sweep's time ran out before them), overriding the defaults measured for them.
  fastest = {"float32": KernelConfig(num_warps=4, weights_resident=False)}
  lstm_rows = [{"variant": "tile 16", "ms": "1.00", "max relative error": "0"}]
  monkeypatch.setattr(benchmark_step, "tune_kernel", lambda *args, **kwargs: (fastest, lstm_rows))
  monkeypatch.setattr(benchmark_step, "tune_ctc", lambda *args, **kwargs: ({}, lstm_rows))
  launched = {}

  def anatomy(config, batch, repeats):
    launched[config.model.dtype] = config.model.kernel.num_warps
    return {"step": 5.0, "forward": 1.0, "backward": 2.0, "ctc": 0.5, "optimizer": 0.25}

  monkeypatch.setattr(benchmark_step, "anatomy", anatomy)
  implementations = ("pallas LSTM, pallas CTC", "pallas LSTM, pallas CTC, bfloat16")
  monkeypatch.setitem(benchmark_step.PRESETS, "tiny", {(8, 24): implementations})
  benchmark_step.main(["--preset", "tiny", "--tune", "--out", str(tmp_path / "step.md")])
  assert launched == {"float32": 4, "bfloat16": None}  # None: models.factory.KERNEL_LAUNCH's


def test_a_median_leaves_the_warm_up_out(monkeypatch):
  clock = {"now": 0.0}
  durations = iter([0.1, 0.001, 0.009, 0.002])  # the first run compiles

  def run():
    clock["now"] += next(durations)

  monkeypatch.setattr(benchmark_step, "time", mock.Mock(perf_counter=lambda: clock["now"]))
  assert benchmark_step.median_ms(run, repeats=3) == pytest.approx(2.0)  # not 9 nor 4


def test_the_relative_error_is_the_worst_leaf_relative_to_the_references_magnitude():
  result = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.9])}
  reference = {"a": jnp.array([1.0, 4.0]), "b": jnp.array([1.0])}
  # a: 2 off where the reference reaches 4; b: 0.1 off 1.
  assert benchmark_step.relative_error(result, reference) == pytest.approx(0.5)


def scripted_ms(*milliseconds):
  """A `median_ms` that runs nothing and returns these times in turn."""
  times = iter(milliseconds)
  return lambda run, repeats: next(times)


def tanh_scan(projected, recurrent_kernel, unroll, prefetch=False):
  """A stand-in for `lstm_recurrence` that is cheap to compile: tanh of each direction's input."""
  return tuple(jnp.tanh(p) for p in projected)


def test_tuning_chooses_the_fastest_lstm_variant_that_matches_the_scan(monkeypatch):
  grid = [KernelConfig(num_warps=n, weights_resident=False) for n in (8, 4, 2)]
  monkeypatch.setattr(benchmark_step, "TUNE_GRID", [(variant, jnp.float32) for variant in grid])

  def kernel(projected, recurrent_kernel, config):
    outputs = tanh_scan(projected, recurrent_kernel, 8)
    return tuple(h + 1 for h in outputs) if config.num_warps == 2 else outputs  # 2: wrong

  monkeypatch.setattr(benchmark_step, "lstm_recurrence", tanh_scan)
  monkeypatch.setattr(benchmark_step, "lstm_recurrence_kernel", kernel)
  # The three scans, then 8, 4 and 2 warps: the wrong one is the fastest.
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 5.0, 5.0, 3.0, 1.0, 0.5))
  best, rows = benchmark_step.tune_kernel(repeats=1, interpret=True)
  assert list(best) == ["float32"] and best["float32"].num_warps == 4
  assert [row["ms"] for row in rows[3:]] == ["3.00", "1.00", "0.50"]


def test_variants_the_time_limit_left_out_are_named_with_their_weights_dtype(monkeypatch):
  grid = [(KernelConfig(num_warps=8), jnp.float32), (KernelConfig(num_warps=4), jnp.bfloat16)]
  monkeypatch.setattr(benchmark_step, "TUNE_GRID", grid)
  monkeypatch.setattr(benchmark_step, "TUNE_SECONDS", -1.0)  # past before the first variant

  monkeypatch.setattr(benchmark_step, "lstm_recurrence", tanh_scan)
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 5.0, 5.0))
  best, rows = benchmark_step.tune_kernel(repeats=1, interpret=True)
  assert best == {}
  assert [(row["variant"], row["ms"]) for row in rows[3:]] == [
    (KernelConfig(num_warps=8).describe(), "not run"),
    (KernelConfig(num_warps=4).describe() + ", bfloat16 weights", "not run"),
  ]


def test_tuning_chooses_the_fastest_ctc_variant(monkeypatch):
  def loss(logits, paddings, labels, label_paddings, **launch):  # cheap to compile
    return jnp.sum(logits**2, axis=(1, 2))

  monkeypatch.setattr(benchmark_step, "optax", mock.Mock(ctc_loss=loss))
  monkeypatch.setattr(benchmark_step, "ctc_loss_kernel", loss)
  # optax, then tile 1 with 2 warps, tile 1 with 4 and tile 2 with 4.
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 3.0, 1.0, 2.0))
  settings, rows = benchmark_step.tune_ctc(repeats=1, interpret=True)
  assert settings == {"ctc.batch_tile": 1, "ctc.num_warps": 4}
  assert [row["ms"] for row in rows] == ["5.00", "3.00", "1.00", "2.00"]


def test_a_random_batch_is_bucket_shaped_with_real_characters_for_labels():
  # T = 40: every line 20..40 frames, then padding; 1..2 (T / 20) labels, none the CTC blank.
  batch = benchmark_step.random_batch(1024, 40)
  assert batch["inputs"].shape == (1024, 40, benchmark_step.NUM_FEATURES)
  paddings, label_paddings = np.asarray(batch["input_paddings"]), batch["label_paddings"]
  lengths = (paddings == 0).sum(axis=1)
  assert lengths.min() == 20 and lengths.max() == 40  # both ends reached
  np.testing.assert_array_equal(paddings, np.arange(40) >= lengths[:, None])
  label_lengths = (np.asarray(label_paddings) == 0).sum(axis=1)
  assert batch["labels"].shape == (1024, 2) and set(label_lengths.tolist()) == {1, 2}
  np.testing.assert_array_equal(label_paddings, np.arange(2) >= label_lengths[:, None])
  labels = np.asarray(batch["labels"])[np.asarray(label_paddings) == 0]
  assert labels.min() >= 1 and labels.max() < train.ALPHABET.size
  np.testing.assert_array_equal(batch["weights"], np.ones(1024))


@pytest.mark.parametrize(("repeats", "epoch_repeats"), [(1, 2), (4, 2), (10, 2), (20, 4)])
def test_the_epoch_is_timed_a_fifth_of_the_repeats_but_at_least_twice(
  tmp_path, monkeypatch, repeats, epoch_repeats
):
  # A median needs timed epochs: --repeats 4 timed none (4 // 5 = 0).
  timed = []

  def epoch_rows(preset, data, settings, strategies, repeats, dtype_settings):
    timed.append(repeats)
    return [{"contender": "ours, optimal", "epoch (s)": "1.00"}], ""

  monkeypatch.setattr(benchmark_step, "load_epoch_data", lambda preset, data_dir: [None] * 64)
  monkeypatch.setattr(benchmark_step, "epoch_rows", epoch_rows)
  argv = ["--preset", "tiny", "--no-anatomy", "--epoch", "--data-dir", str(tmp_path)]
  argv += ["--repeats", str(repeats), "--out", str(tmp_path / "step.md")]
  assert benchmark_step.main(argv) == tmp_path / "step.md"
  assert timed == [epoch_repeats]


def test_tuning_launches_each_variant_with_its_weights_dtype(monkeypatch):
  # A bfloat16 variant timed with float32 weights (or chosen for float32 models) would mislead
  # the GPU session's pick of each dtype's launch.
  f32 = KernelConfig(num_warps=8, weights_resident=False)
  slow_bf16, fast_bf16 = KernelConfig(num_warps=8), KernelConfig(num_warps=16)
  grid = [(f32, jnp.float32), (slow_bf16, jnp.bfloat16), (fast_bf16, jnp.bfloat16)]
  monkeypatch.setattr(benchmark_step, "TUNE_GRID", grid)
  scans, kernels = [], []

  def scan(projected, recurrent_kernel, unroll, prefetch=False):
    scans.append((recurrent_kernel.dtype, prefetch))
    return tanh_scan(projected, recurrent_kernel, unroll)

  def kernel(projected, recurrent_kernel, config):
    kernels.append((config.num_warps, recurrent_kernel.dtype))
    return tanh_scan(projected, recurrent_kernel, 8)

  monkeypatch.setattr(benchmark_step, "lstm_recurrence", scan)
  monkeypatch.setattr(benchmark_step, "lstm_recurrence_kernel", kernel)
  # The three scans, then float32 (the slowest), then the two bfloat16 variants.
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 5.0, 5.0, 3.0, 2.0, 1.0))
  best, rows = benchmark_step.tune_kernel(repeats=1, interpret=True)
  assert scans == [(jnp.float32, False), (jnp.bfloat16, False), (jnp.float32, True)]
  assert kernels == [(8, jnp.float32), (8, jnp.bfloat16), (16, jnp.bfloat16)]
  assert {dtype: variant.num_warps for dtype, variant in best.items()} == {
    "float32": 8,
    "bfloat16": 16,
  }
  assert best["float32"].weights_resident is False
  assert [row["variant"] for row in rows[3:]] == [benchmark_step.variant_name(*v) for v in grid]


def test_a_variants_error_is_relative_to_the_scans_magnitude(monkeypatch):
  monkeypatch.setattr(benchmark_step, "TUNE_GRID", [(KernelConfig(num_warps=8), jnp.float32)])
  monkeypatch.setattr(benchmark_step, "lstm_recurrence", tanh_scan)
  monkeypatch.setattr(
    benchmark_step,
    "lstm_recurrence_kernel",
    lambda projected, recurrent_kernel, config: tuple(jnp.zeros_like(p) for p in projected),
  )
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 5.0, 5.0, 1.0))
  best, rows = benchmark_step.tune_kernel(repeats=1, interpret=True)
  # All zeros is 100% off the scan (relative to the kernel's own zeros it would be 1e30).
  assert best == {} and rows[3]["max relative error"] == "1.0e+00"
  assert rows[2]["max relative error"] == "0.0e+00"  # the prefetching scan computes the same


def ctc_stand_in(wrong: dict):
  """A CTC loss cheap to compile, launch (batch_tile, num_warps) -> "loss", "gradient" or
  "repeat" (a result that changes between runs) naming what a variant gets wrong."""
  runs = iter(range(1, 1000))

  def loss(logits, paddings, labels, label_paddings, batch_tile=None, num_warps=None, **kwargs):
    per_line = jnp.sum(logits**2, axis=(1, 2))
    fault = wrong.get((batch_tile, num_warps))
    if fault == "loss":
      return per_line * (1 + 1e-3)  # the gradient is 1e-3 off too, under the 1e-2 allowed
    if fault == "gradient":  # the same loss, a gradient up to 5e-2 off
      offset = jnp.sin(logits) - jax.lax.stop_gradient(jnp.sin(logits))
      return per_line + 0.05 * jnp.sum(offset, axis=(1, 2))
    if fault == "repeat":
      run = io_callback(lambda: np.float32(next(runs)), jax.ShapeDtypeStruct((), jnp.float32))
      return per_line + 0.01 * run
    return per_line

  return loss


def test_ctc_tuning_keeps_only_variants_that_match_optax_and_repeat_themselves(monkeypatch):
  grid = [(1, 2), (1, 4), (2, 4), (4, 4)]
  monkeypatch.setattr(benchmark_step, "CTC_TUNE_GRID", grid)
  faults = {(1, 2): "loss", (1, 4): "gradient", (2, 4): "repeat"}
  monkeypatch.setattr(benchmark_step, "optax", mock.Mock(ctc_loss=ctc_stand_in({})))
  monkeypatch.setattr(benchmark_step, "ctc_loss_kernel", ctc_stand_in(faults))
  # optax, then the three faulty variants (the fastest), then the right one.
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 1.0, 1.0, 1.0, 4.0))
  settings, rows = benchmark_step.tune_ctc(repeats=1, interpret=True)
  assert settings == {"ctc.batch_tile": 4, "ctc.num_warps": 4}
  verdicts = [row["deviation from optax"] for row in rows[1:]]
  assert [verdict.endswith("NOT repeatable between two runs") for verdict in verdicts] == [
    False,
    False,
    True,
    False,
  ]
  assert verdicts[0].startswith("loss 1.0e-03 relative")
  assert verdicts[1].endswith(", gradient 5.0e-02 absolute")
  assert verdicts[3] == "loss 0.0e+00 relative, gradient 0.0e+00 absolute"

  # None of them right: no settings, and the driver leaves the CTC kernel out.
  monkeypatch.setattr(benchmark_step, "CTC_TUNE_GRID", grid[:3])
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0, 1.0, 1.0, 1.0))
  settings, rows = benchmark_step.tune_ctc(repeats=1, interpret=True)
  assert settings is None and len(rows) == 4


def test_the_ctc_reference_is_optax_at_full_float32_precision(monkeypatch):
  precisions = []

  def loss(logits, *args, **kwargs):
    precisions.append(jax.config.jax_default_matmul_precision)
    return jnp.sum(logits**2, axis=(1, 2))

  monkeypatch.setattr(benchmark_step, "CTC_TUNE_GRID", [])
  monkeypatch.setattr(benchmark_step, "optax", mock.Mock(ctc_loss=loss))
  monkeypatch.setattr(benchmark_step, "median_ms", scripted_ms(5.0))
  assert benchmark_step.tune_ctc(repeats=1, interpret=True)[0] is None
  assert precisions == ["highest"]


def test_the_gpu_presets_time_the_full_size_model():
  # Only the tiny preset may shrink the model: the others are what the GPU tables report.
  assert benchmark_step.make_config("quick").model.hidden_size == 128
  assert benchmark_step.make_config("tiny").model.hidden_size == 16


def test_each_anatomy_column_times_its_own_part(monkeypatch):
  """A stand-in `median_ms` runs each part once and names it by what it returned."""

  def part(result) -> str:
    if hasattr(result, "apply_gradients"):
      return "optimizer"
    if isinstance(result, dict):
      return "step"  # its metrics
    if isinstance(result, tuple):
      return {1: "backward", 2: "ctc"}[len(result)]  # (grads,) and (loss, grad)
    return "forward"  # the logits

  codes = {"step": 1.0, "forward": 2.0, "backward": 3.0, "ctc": 4.0, "optimizer": 5.0}
  monkeypatch.setattr(benchmark_step, "median_ms", lambda run, repeats: codes[part(run())])
  config = benchmark_step.make_config("tiny")
  timings = benchmark_step.anatomy(config, benchmark_step.random_batch(2, 12), repeats=1)
  assert timings == codes


def test_the_pytorch_column_is_cudnns_step_at_the_rows_shape(tmp_path, monkeypatch):
  shapes = []

  def torch_step_ms(config, batch, time_steps, repeats):
    shapes.append((batch, time_steps))
    return 7.0 if batch == 8 else None

  def anatomy(config, batch, repeats):
    return {"step": 5.0, "forward": 1.0, "backward": 2.0, "ctc": 0.5, "optimizer": 0.25}

  monkeypatch.setattr(benchmark_step, "torch_step_ms", torch_step_ms)
  monkeypatch.setattr(benchmark_step, "anatomy", anatomy)
  name = "scan unroll 1, optax CTC"
  monkeypatch.setitem(benchmark_step.PRESETS, "tiny", {(8, 24): (name,), (4, 16): (name,)})
  out = tmp_path / "step.md"
  benchmark_step.main(["--preset", "tiny", "--out", str(out)])
  assert shapes == [(8, 24), (4, 16)]
  rows = table_rows(out.read_text(), "B")
  assert [[row[0], row[1], row[-1]] for row in rows] == [["8", "24", "7.00"], ["4", "16", "-"]]


class FakeTensor(np.ndarray):
  def cuda(self):
    return self


def test_pytorchs_step_gets_the_batchs_real_lengths_and_labels(monkeypatch):
  gpu = {"available": True}
  torch = types.SimpleNamespace(
    cuda=types.SimpleNamespace(is_available=lambda: gpu["available"], synchronize=lambda: None),
    tensor=lambda array: np.array(array).view(FakeTensor),
    from_numpy=lambda array: array.view(FakeTensor),
  )
  monkeypatch.setitem(sys.modules, "torch", torch)
  calls = []
  launches = []

  def torch_train_step(config, num_features, device, packed):
    launches.append((num_features, device, packed))
    return lambda *arguments: calls.append(arguments)

  monkeypatch.setattr(benchmark_step.benchmark, "torch_train_step", torch_train_step)
  config = benchmark_step.make_config("tiny")
  assert isinstance(benchmark_step.torch_step_ms(config, 8, 40, repeats=2), float)
  assert launches == [(benchmark_step.NUM_FEATURES, "cuda", False)]
  assert len(calls) == 3  # a warm-up, then the repeats
  inputs, lengths, labels, label_lengths = calls[0]
  batch = benchmark_step.random_batch(8, 40)
  np.testing.assert_array_equal(inputs, batch["inputs"])
  np.testing.assert_array_equal(lengths, (np.asarray(batch["input_paddings"]) == 0).sum(1))
  real_labels = np.asarray(batch["label_paddings"]) == 0
  np.testing.assert_array_equal(label_lengths, real_labels.sum(1))
  np.testing.assert_array_equal(labels, np.asarray(batch["labels"])[real_labels])

  gpu["available"] = False
  assert benchmark_step.torch_step_ms(config, 8, 40, repeats=2) is None
  assert len(launches) == 1


def test_each_flags_child_gets_the_tuned_launches_and_keeps_the_inherited_flags(monkeypatch):
  children = []

  def run(child, capture_output, text, env, check):
    children.append((child, env["XLA_FLAGS"]))
    if "--bad" in env["XLA_FLAGS"]:
      return subprocess.CompletedProcess(child, 1, "", "a warning\nFatal: --bad is unknown\n")
    return subprocess.CompletedProcess(child, 0, json.dumps({"scan": 1.5}), "")

  monkeypatch.setenv("XLA_FLAGS", "--inherited=1")
  monkeypatch.setattr(benchmark_step.subprocess, "run", run)
  settings, dtype_settings = {"ctc.batch_tile": 2}, {"bfloat16": {"model.kernel.num_warps": 16}}
  rows = benchmark_step.flag_variants(["bad=--bad=1"], "tiny", settings, dtype_settings, 3)
  assert [flags for _, flags in children] == ["--inherited=1", "--inherited=1 --bad=1"]
  for child, _ in children:
    assert json.loads(child[child.index("--settings") + 1]) == settings
    assert json.loads(child[child.index("--dtype-settings") + 1]) == dtype_settings
  assert rows == [
    {"XLA_FLAGS": benchmark_step.NO_EXTRA_FLAGS, "result": "scan 1.50 ms"},
    {"XLA_FLAGS": "bad: `--bad=1`", "result": "failed: Fatal: --bad is unknown"},
  ]


def test_the_step_only_child_launches_the_kernels_it_was_given_at_the_first_shape(monkeypatch):
  configs, shapes = [], []

  def create_train_state(config, num_features, steps):
    configs.append(config)
    return {"step": jnp.zeros(())}

  def train_step(state, batch):
    shapes.append(batch["inputs"].shape)
    return state, {"loss": jnp.zeros(())}

  monkeypatch.setattr(benchmark_step.train, "create_train_state", create_train_state)
  monkeypatch.setattr(benchmark_step.train, "train_step", train_step)
  monkeypatch.setattr(benchmark_step, "median_ms", lambda run, repeats: (run(), 1.5)[1])
  name = "pallas LSTM, pallas CTC"
  monkeypatch.setitem(benchmark_step.PRESETS, "tiny", {(8, 24): (name,), (4, 16): (name,)})
  timings = benchmark_step.step_only(
    "tiny", {"ctc.batch_tile": 2}, {"float32": {"model.kernel.num_warps": 16}}, repeats=1
  )
  assert timings == {name: 1.5}
  (config,) = configs
  assert config.ctc.batch_tile == 2 and config.model.kernel.num_warps == 16
  assert shapes == [(8, 24, benchmark_step.NUM_FEATURES)]


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--epoch"], "--epoch needs --data-dir"),
    (["--xla-flags", "no flags"], "is not NAME=FLAGS"),
    (["--xla-flags", "=--xla_dump_to=/tmp"], "is not NAME=FLAGS"),
  ],
)
def test_flags_that_cannot_run_are_refused_before_anything_is_timed(monkeypatch, argv, message):
  for measurement in ("torch_step_ms", "anatomy", "flag_variants", "load_epoch_data"):
    monkeypatch.setattr(benchmark_step, measurement, never_time)
  with pytest.raises(cli_errors.UsageError, match=message):
    benchmark_step.main(["--preset", "tiny", *argv])


def test_a_failing_flags_child_is_a_failed_measurement(tmp_path, monkeypatch, capsys):
  # --no-anatomy with --xla-flags alone still has something to measure.
  monkeypatch.setattr(benchmark_step, "anatomy", never_time)
  rows = [
    {"XLA_FLAGS": benchmark_step.NO_EXTRA_FLAGS, "result": "scan 1.50 ms"},
    {"XLA_FLAGS": "bad: `--bad`", "result": "failed: Fatal: --bad is unknown"},
  ]
  monkeypatch.setattr(benchmark_step, "flag_variants", lambda *args: rows)
  out = tmp_path / "step.md"
  argv = ["--preset", "tiny", "--no-anatomy", "--xla-flags", "bad=--bad", "--out", str(out)]
  assert cli_errors.run(lambda: benchmark_step.main(argv)) == benchmark_step.MEASUREMENT_FAILED
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: 1 measurement(s) failed") and "bad: `--bad`" in line
  text = out.read_text()
  assert "## XLA flags (B = 8, T = 24, the whole step" in text
  assert table_rows(text, "XLA_FLAGS") == [list(row.values()) for row in rows]


def epoch_measurement(contender: str, strategy: str, num_buckets: str = "-"):
  measurement = mock.Mock(contender=contender, strategy=strategy, epoch_seconds=2.5)
  measurement.epochs_seconds = [2.0, 2.5, 3.0]
  measurement.row.return_value = {
    "contender": contender,
    "strategy": strategy,
    "K": num_buckets,
    "compile (s)": "1.0",
    "padded/real": "1.100",
  }
  return measurement


def test_the_epoch_table_times_ours_with_the_tuned_launch_and_cudnn_padded_per_batch(monkeypatch):
  launches = []

  class Bench:
    def __init__(self, config, data, repeats):
      launches.append((config.model.dtype, config.model.kernel.num_warps, config.ctc.batch_tile))

    def plan(self, strategy, num_buckets):
      return (strategy, num_buckets)

    def contender(self, name, plan):
      return epoch_measurement(name, plan[0], str(plan[1]))

  torch_rows = [
    epoch_measurement(f"PyTorch nn.LSTM{device}", f"random batches, {layout}")
    for device in ("", " (cuDNN)")
    for layout in ("padded per batch", "packed")
  ]
  timed = []
  monkeypatch.setattr(benchmark_step.benchmark, "Bench", Bench)
  monkeypatch.setattr(benchmark_step.benchmark, "torch_contenders", lambda *args: torch_rows)
  monkeypatch.setattr(
    benchmark_step.benchmark,
    "take_turns",
    lambda measurements, repeats: timed.append((measurements, repeats)),
  )
  rows, no_torch = benchmark_step.epoch_rows(
    "tiny",
    [None] * 8,
    {"ctc.batch_tile": 2},
    ["optimal", "none"],
    3,
    {"float32": {"model.kernel.num_warps": 16}},
  )
  assert launches == [("float32", 16, 2)]
  assert no_torch == ""
  assert [row["contender"] for row in rows] == [
    "ours, optimal",
    "ours, none",
    "PyTorch nn.LSTM (cuDNN), random batches, padded per batch",
  ]
  assert [row["K"] for row in rows[:2]] == ["8", "1"]
  assert rows[0]["epoch (s)"] == "2.50" and rows[0]["epochs (s)"] == "2.00, 2.50, 3.00"
  ((measurements, repeats),) = timed  # all the table's contenders, taking turns
  assert repeats == 3
  assert [m.contender for m in measurements] == [row["contender"].split(",")[0] for row in rows]

  # PyTorch without a GPU has no cuDNN row, and the table says why.
  monkeypatch.setattr(benchmark_step.benchmark, "torch_contenders", lambda *args: torch_rows[:2])
  rows, no_torch = benchmark_step.epoch_rows("tiny", [None] * 8, {}, ["optimal"], 2)
  assert [row["contender"] for row in rows] == ["ours, optimal"]
  assert no_torch == "torch sees no GPU, so no cuDNN"


def test_the_epoch_runs_the_tuned_launches_and_the_fallback_of_a_kernel_left_out(
  tmp_path, monkeypatch
):
  bfloat16 = KernelConfig(num_warps=16, weights_resident=True, prefetch=True)
  rows = [{"variant": "tile 16", "ms": "1.00", "max relative error": "0"}]
  monkeypatch.setattr(
    benchmark_step, "tune_kernel", lambda *args, **kwargs: ({"bfloat16": bfloat16}, rows)
  )
  monkeypatch.setattr(benchmark_step, "tune_ctc", lambda *args, **kwargs: (None, rows))
  epochs = []

  def epoch_rows(preset, data, settings, strategies, repeats, dtype_settings):
    epochs.append((settings, dtype_settings))
    return [{"contender": "ours, optimal", "epoch (s)": "1.00"}], ""

  monkeypatch.setattr(benchmark_step, "load_epoch_data", lambda preset, data_dir: [None] * 64)
  monkeypatch.setattr(benchmark_step, "epoch_rows", epoch_rows)
  argv = ["--preset", "tiny", "--no-anatomy", "--tune", "--epoch", "--data-dir", str(tmp_path)]
  argv += ["--epoch-dtypes", "float32,bfloat16", "--out", str(tmp_path / "step.md")]
  assert benchmark_step.main(argv) == benchmark_step.MEASUREMENT_FAILED  # the CTC kernel's tuning
  launch = {f"model.kernel.{field}": getattr(bfloat16, field) for field in LAUNCH_FIELDS}
  assert epochs == [({"ctc.impl": "optax"}, {"float32": {}, "bfloat16": launch})]


def test_an_epoch_dtype_named_twice_is_timed_once():
  assert benchmark_step.epoch_dtypes("bfloat16,float32,bfloat16") == ["bfloat16", "float32"]
