"""The LSTM benchmark: the table it promises, and contenders that compute the same network."""

import math
import pathlib
import subprocess
import sys

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark_lstm, paper
from tests.test_experiments_benchmark import table_rows
from tests.test_models_lstm import flax_cell_to_ours, paddings_for


def test_the_tiny_preset_writes_a_row_per_shape_and_a_column_per_contender(tmp_path):
  out = tmp_path / "lstm.md"
  argv = ["--preset", "tiny", "--repeats", "1", "--unroll", "2", "--out", str(out)]
  assert benchmark_lstm.main(argv) == out
  text = out.read_text()
  assert "Machine:" in text and "python -m experiments.benchmark_lstm --preset tiny" in text

  header = next(line for line in text.splitlines() if line.startswith("| time |"))
  contenders = ["flax OptimizedLSTMCell+RNN", "ours unroll=1", "ours unroll=2"]
  assert [cell.strip() for cell in header.strip("|").split("|")] == [
    *benchmark_lstm.SHAPE_COLUMNS,
    *(f"{name} (ms)" for name in contenders),
    benchmark_lstm.SPEED_UP,
  ]
  rows = table_rows(text, "time")
  assert [row[:4] for row in rows] == [["16", "8", "1", "yes"], ["16", "8", "1", "no"]]
  for row in rows:
    times = [float(cell) for cell in row[4:7]]
    assert all(math.isfinite(ms) and ms > 0 for ms in times), row
    # The speed-up is the flax time over our fastest, up to the cells' rounding.
    assert float(row[7].removesuffix("x")) == pytest.approx(times[0] / min(times[1:]), rel=0.1)


@pytest.mark.parametrize(("layers", "bidirectional"), [(2, True), (1, False)])
def test_every_contender_computes_the_flax_baselines_logits(layers, bidirectional):
  """The speed-up compares like with like: given the flax stack's weights, each of our columns
  returns the same logits at every valid frame (padded frames hold garbage)."""
  hidden, time_steps = 8, 6
  lengths = [6, 3, 1]
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(3, time_steps, benchmark_lstm.FEATURES)), jnp.float32)
  paddings = jnp.asarray(paddings_for(lengths, time_steps))
  columns = benchmark_lstm.contenders(unroll=2)
  flax_model = columns.pop("flax OptimizedLSTMCell+RNN")(hidden, layers, bidirectional)
  flax_params = flax_model.init(jax.random.key(1), inputs, paddings)["params"]
  expected = flax_model.apply({"params": flax_params}, inputs, paddings)

  # nn.RNN's cells are named in the order the stack makes them: per layer, forward then backward.
  directions = 2 if bidirectional else 1
  our_params = {
    f"lstm_{layer}": flax_cell_to_ours(
      [flax_params[f"OptimizedLSTMCell_{directions * layer + d}"] for d in range(directions)]
    )["params"]
    for layer in range(layers)
  }
  our_params["output_projection"] = flax_params["Dense_0"]
  assert list(columns) == ["ours unroll=1", "ours unroll=2"]
  valid = np.asarray(paddings) == 0
  for name, build in columns.items():
    logits = build(hidden, layers, bidirectional).apply({"params": our_params}, inputs, paddings)
    np.testing.assert_allclose(logits[valid], expected[valid], rtol=1e-5, atol=1e-5, err_msg=name)


def test_an_unroll_below_one_is_one_line_and_exit_code_2():
  # Before, --unroll 0 was taken (the backend's default, in a column named "unroll=0").
  command = [sys.executable, "-m", "experiments.benchmark_lstm", "--preset", "tiny"]
  result = subprocess.run(
    [*command, "--unroll", "0"],
    capture_output=True,
    text=True,
    env=paper.worker_env(1),
    cwd=pathlib.Path(__file__).parents[1],
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    "error: python -m experiments.benchmark_lstm: argument --unroll: must be >= 1, got 0 "
    "(see --help)"
  ]


class StepClock:
  """A stand-in for the `time` module whose clock moves only when a fake step runs."""

  def __init__(self):
    self.now = 0.0

  def perf_counter(self):
    return self.now

  def step(self, seconds):
    """A step that takes each of `seconds` in turn."""
    durations = iter(seconds)
    return lambda: setattr(self, "now", self.now + next(durations))


def test_a_cell_is_the_median_of_the_repeats_in_milliseconds(monkeypatch):
  clock = StepClock()
  monkeypatch.setattr(benchmark_lstm, "time", clock)
  steps = {"a": clock.step([0.001, 0.010, 0.002]), "b": clock.step([0.005, 0.004, 0.030])}
  medians = benchmark_lstm.median_step_ms(steps, repeats=3)
  assert medians == pytest.approx({"a": 2.0, "b": 5.0})  # means would be 4.33 and 13


def test_the_speed_up_is_the_flax_step_over_the_fastest_of_ours(monkeypatch):
  medians = {"flax": 12.0, "ours unroll=1": 8.0, "ours unroll=4": 3.0, "cudnn": 1.0}
  monkeypatch.setattr(benchmark_lstm, "compiled_step", lambda model, time_steps: None)
  monkeypatch.setattr(
    benchmark_lstm, "median_step_ms", lambda steps, repeats: {name: medians[name] for name in steps}
  )
  columns = {name: lambda hidden, layers, bidirectional: None for name in medians}
  (row,) = benchmark_lstm.timing_rows([(16, 8, 2, False)], columns, repeats=1)
  assert row == {
    "time": "16",
    "hidden": "8",
    "layers": "2",
    "bidirectional": "no",
    "flax (ms)": "12.00",
    "ours unroll=1 (ms)": "8.00",
    "ours unroll=4 (ms)": "3.00",
    "cudnn (ms)": "1.00",
    benchmark_lstm.SPEED_UP: "4.00x",  # 12 / 3: cuDNN is not ours
  }


def test_a_step_is_compiled_and_run_once_before_it_is_timed_on_lengths_of_a_buckets_spread(
  monkeypatch,
):
  seen_paddings, runs = [], []

  class Linear(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, inputs, paddings):
      seen_paddings.append(np.asarray(paddings))
      return flax.linen.Dense(2)(inputs)

  class CountingJax:
    """`jax`, with each call of a jitted function counted."""

    def __getattr__(self, name):
      return getattr(jax, name)

    def jit(self, fun, **kwargs):
      compiled = jax.jit(fun, **kwargs)
      return lambda *args: runs.append(len(args)) or compiled(*args)

  monkeypatch.setattr(benchmark_lstm, "jax", CountingJax())
  step = benchmark_lstm.compiled_step(Linear(), time_steps=8)
  assert len(runs) == 1  # the compiling warm-up, before any timing
  step()
  assert len(runs) == 2
  lengths = (seen_paddings[0] == 0).sum(axis=1)
  assert seen_paddings[0].shape == (benchmark_lstm.BATCH, 8)
  assert lengths.min() >= 4 and lengths.max() <= 8 and len(set(lengths.tolist())) > 1
  # Each row is its frames, then padding.
  np.testing.assert_array_equal(seen_paddings[0], np.arange(8) >= lengths[:, None])
