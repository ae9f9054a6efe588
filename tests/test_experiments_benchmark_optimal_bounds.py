"""The bounds benchmark: `auto`'s bounds are never slower than `optimal`'s, and bad flags are one
line."""

import subprocess
import sys

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
