"""The bounds benchmark: `auto`'s bounds are never slower than `optimal`'s, and bad flags are one
line."""

import subprocess
import sys
import types

import numpy as np
import pytest

from bucketing import cost
from experiments import benchmark_optimal_bounds


def test_the_default_cost_model_is_fitted_to_the_committed_gpu_steps():
  fitted, source = benchmark_optimal_bounds.step_cost_on_the_gpu()
  assert fitted["gamma"] > 0 and min(fitted.values()) >= 0
  assert "H200" in source and "benchmark_step_gpu.md" in source


def test_auto_never_models_a_slower_epoch_than_optimal_and_gains_under_a_token_budget():
  lengths = np.random.default_rng(0).integers(20, 900, 1500)
  model = cost.CostModel(alpha=6e-3, gamma=3.6e-4, beta=0.0)
  rows = benchmark_optimal_bounds.auto_against_optimal(lengths, model, (2, 4))
  assert [(row["batch"], row["K"]) for row in rows] == [
    (name, k) for name in benchmark_optimal_bounds.SIZINGS for k in ("2", "4")
  ]
  for row in rows:
    assert float(row["auto (s)"]) <= float(row["optimal (s)"])
    assert len(row["auto's bounds"].split()) <= int(row["K"])
  budget = [row for row in rows if "tokens" in row["batch"]]
  assert any(float(row["auto (s)"]) < float(row["optimal (s)"]) for row in budget)


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (
      ["--gamma", "x"],
      "error: python -m experiments.benchmark_optimal_bounds: argument --gamma: "
      "invalid float value: 'x' (see --help)",
    ),
    (["--gamma", "-2"], "error: cost model gamma must be a finite number >= 0, got -2.0"),
    (["--lengths", "no-such-file.txt"], "error: no-such-file.txt: no such file"),
  ],
)
def test_bad_flags_are_one_line_and_exit_code_2(argv, message):
  command = [sys.executable, "-m", "experiments.benchmark_optimal_bounds", *argv]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [message]


def test_a_corpus_of_fewer_lengths_than_buckets_compares_its_one_bucket_per_length():
  lengths = np.array([40, 40, 90, 300])  # 3 distinct lengths: K = 8 is K = 3
  model = cost.CostModel(alpha=6e-3, gamma=3.6e-4, beta=0.0)
  rows = benchmark_optimal_bounds.auto_against_optimal(lengths, model, (3, 8))
  by_k = {k: [{**row, "K": None} for row in rows if row["K"] == k] for k in ("3", "8")}
  assert by_k["8"] and by_k["8"] == by_k["3"]


@pytest.mark.parametrize(("num_buckets", "padded"), [(1, 40), (2, 16), (3, 14), (4, 14)])
def test_the_plain_dp_finds_the_least_padding_for_k_buckets(num_buckets, padded):
  # One bucket pads all four to 10; two split {1, 1, 2} (to 2) from {10}; three pad nothing.
  lengths = np.array([10, 1, 2, 1])
  assert benchmark_optimal_bounds.plain_dp_cost(lengths, num_buckets) == padded


def test_a_solve_time_is_the_median_of_the_repeats_after_a_warm_up(monkeypatch):
  now = [0.0]
  durations = iter([100.0, 1.0, 9.0, 2.0])  # the first solve (the warm-up) is not timed

  def solve(lengths, num_buckets):
    now[0] += next(durations)

  monkeypatch.setattr(benchmark_optimal_bounds.boundaries, "optimal_bounds", solve)
  monkeypatch.setattr(
    benchmark_optimal_bounds, "time", types.SimpleNamespace(perf_counter=lambda: now[0])
  )
  assert benchmark_optimal_bounds.median_seconds(np.array([1, 2]), 2, repeats=3) == 2.0


def test_saved_is_the_share_of_optimals_epoch_that_autos_bounds_save(monkeypatch):
  least_padding = [np.array([900]), np.array([500, 900])]
  fastest = [np.array([900]), np.array([400, 900])]

  def epoch_seconds(model, lengths, bounds, **sizing):
    assert model.kappa == 0  # one epoch's steps, no compiles
    return bounds[0] / 50

  monkeypatch.setattr(cost, "fastest_bounds_per_count", lambda *args, **kwargs: fastest)
  monkeypatch.setattr(
    benchmark_optimal_bounds.boundaries, "optimal_bounds_per_count", lambda *args: least_padding
  )
  monkeypatch.setattr(cost, "plan_seconds", epoch_seconds)
  rows = benchmark_optimal_bounds.auto_against_optimal(np.arange(1, 901), cost.CostModel(), (1, 2))
  cells = [(row["K"], row["optimal (s)"], row["auto (s)"], row["saved"]) for row in rows]
  assert cells == [("1", "18.00", "18.00", "0.0%"), ("2", "10.00", "8.00", "20.0%")] * 3
  assert rows[1]["auto's bounds"] == "400 900"


def test_the_gpu_cost_model_is_fitted_in_seconds_to_the_scan_rows_alone(tmp_path, monkeypatch):
  # Steps of 2 ms + 0.01 ms per timestep + 0.001 ms per token: 32 x 100 takes 2 + 1 + 3.2 ms.
  # The kernel's row, far off that model, is another implementation's step.
  anatomy = tmp_path / "benchmark_step_gpu.md"
  anatomy.write_text(
    "\n".join(
      [
        benchmark_optimal_bounds.STEP_ANATOMY_TABLE,
        "",
        "| B | T | implementation | step |",
        "| --- | --- | --- | --- |",
        "| 32 | 100 | scan unroll 8, optax CTC | 6.20 |",
        "| 32 | 100 | pallas LSTM, pallas CTC | 100.00 |",
        "| 32 | 400 | scan unroll 8, optax CTC | 18.80 |",
        "| 128 | 100 | scan unroll 8, optax CTC | 15.80 |",
        "",
      ]
    )
  )
  monkeypatch.setattr(benchmark_optimal_bounds, "STEP_ANATOMY", anatomy)
  fitted, source = benchmark_optimal_bounds.step_cost_on_the_gpu()
  assert fitted == pytest.approx({"alpha": 2e-3, "gamma": 1e-5, "beta": 1e-6}, rel=1e-6)
  assert "B x T 32 x 100, 32 x 400, 128 x 100" in source
