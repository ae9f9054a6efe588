"""The benchmark driver: every contender has a row, the timestep counts match the plans."""

import dataclasses
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

import bucketing
import cli_errors
import train
from experiments import benchmark, paper, reporting


def run_as_a_user(module: str, argv: list[str]) -> None:
  """`python -m module *argv` from the repository root, in a process of its own on one device
  (the tests' 8 simulated devices would make it slower)."""
  subprocess.run(
    [sys.executable, "-m", module, *argv],
    check=True,
    env=paper.worker_env(1),
    cwd=pathlib.Path(__file__).parents[1],
  )


def table_rows(text: str, first_column: str) -> list[list[str]]:
  lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
  start = cells.index(next(row for row in cells if row[0] == first_column))
  rows = []
  for row in cells[start + 1 :]:
    if len(row) != len(cells[start]):
      break
    rows.append(row)
  return rows


@pytest.mark.slow
def test_benchmark_writes_every_contender_and_the_cost_model(tmp_path):
  out = tmp_path / "benchmark.md"
  argv = ["--tiny", "--dataset", "synthetic", "--repeats", "1", "--out", str(out)]
  run_as_a_user("experiments.benchmark", argv)
  text = out.read_text()
  assert "Machine:" in text and "load average" in text and "python -m experiments.benchmark" in text
  rows = table_rows(text, "contender")
  assert all(len(row) == len(benchmark.COLUMNS) and all(row) for row in rows)
  ours = [(row[1], row[2], row[3].endswith("tokens")) for row in rows if row[0] == "ours"]
  assert ours == [
    ("none", "1", False),
    ("uniform", "2", False),
    ("quantile", "2", False),
    ("optimal", "2", False),
    ("none", "1", True),
    ("optimal", "2", True),
  ]
  (auto,) = [row for row in rows if row[0] == "ours, measured cost model"]
  assert auto[1] == "auto"
  # A plan auto shares with a measured one is measured once, and both rows show it.
  twin = re.search(r"`auto` chose the plan of (\w+) K = (\d+) \(the same bounds", text)
  if twin:
    (same,) = [
      row
      for row in rows
      if row[0] == "ours" and tuple(row[1:3]) == twin.groups() and row[3] == auto[3]
    ]
    assert auto[2:] == same[2:]
  torch_rows = [row for row in rows if row[0].startswith("PyTorch")]
  assert len(torch_rows) == 2 or "PyTorch nn.LSTM rows: skipped" in text

  # The none row's timesteps are those of the trainer's plan for the same sequences.
  config = paper.make_config("tiny", "synthetic")
  data = train.load_split(config, "train", 32)
  plan = bucketing.make_plan(data.lengths, strategy="none", batch_size=8, num_devices=1, round_to=8)
  summary = plan.summary()
  assert rows[0][6] == f"{summary['real_timesteps']:,}"
  assert rows[0][7] == f"{summary['padded_timesteps_with_filler']:,}"

  assert "alpha =" in text and "kappa =" in text and "it chose K =" in text
  assert len(table_rows(text, "batch")) == 4  # the tiny (batch, length) grid


def test_torch_rows_are_skipped_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  config = paper.make_config("tiny", "synthetic")
  data = train.load_split(config, "train", 8)
  assert "not installed" in benchmark.torch_contenders(config, data, 1)


def test_a_results_header_names_the_xla_flags_it_ran_under(monkeypatch):
  # The command line alone: a header would start JAX, here under the flags set for this test.
  def command() -> str:
    return reporting.RunRecord("experiments.benchmark", ["--quick"], "jax").command

  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_dump_to=/tmp/a b")
  assert command() == (
    "XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_dump_to=/tmp/a b' python -m "
    "experiments.benchmark --quick"
  )
  monkeypatch.delenv("XLA_FLAGS")
  assert command() == "python -m experiments.benchmark --quick"


@pytest.mark.parametrize(
  ("flag", "value", "message"),
  [
    ("--planned-epochs", "0", "--planned-epochs: must be >= 1, got 0"),
    ("--repeats", "0", "--repeats: must be >= 1, got 0"),
    ("--repeats", "-1", "--repeats: must be >= 1, got -1"),
    ("--buckets", "2,0", "--buckets: counts must be >= 1, got '2,0'"),
    ("--buckets", "1", "--buckets: give a K above 1"),
  ],
)
def test_counts_it_cannot_use_are_refused_naming_the_flag(monkeypatch, flag, value, message):
  # Before, each started the benchmark: 0 repeats silently meant the preset's default, 0 planned
  # epochs planned a run of none, -1 repeats or K = 0 failed only after timing had begun, and
  # K = 1 alone measured the baseline twice and fitted kappa to it.
  def never_run(*args, **kwargs):
    pytest.fail("the benchmark started before its flags were checked")

  monkeypatch.setattr(benchmark.paper, "make_config", never_run)
  with pytest.raises(cli_errors.UsageError, match=re.escape(message)):
    benchmark.main(["--tiny", flag, value])


@pytest.mark.parametrize(
  "module, argv",
  [
    ("benchmark", ["--tiny"]),
    ("benchmark_compile", ["--config=experiments/synthetic.py:tiny"]),
    ("benchmark_lstm", ["--preset", "tiny"]),
    ("benchmark_memory", ["--config=experiments/synthetic.py:tiny", "--quick"]),
    ("benchmark_optimal_bounds", []),
    ("benchmark_step", ["--preset", "tiny"]),
  ],
)
def test_an_out_that_names_a_folder_is_refused_before_measuring(module, argv, tmp_path):
  # Before, each found out only when writing its report, after minutes of measuring.
  main = importlib.import_module(f"experiments.{module}").main
  with pytest.raises(cli_errors.UsageError, match=re.escape(f"--out {tmp_path}: names a folder")):
    main([*argv, "--out", str(tmp_path)])


def test_a_row_gives_medians_of_the_timed_epochs_after_the_warm_up():
  calls = []

  def run_epoch(repeat):
    calls.append(repeat)
    # The warm-up epoch (compiles, caches) is slow; the timed ones are not alike.
    return ([0.5, 0.002, 0.001, 0.004][repeat], [100.0, 2.0, 1.0, 8.0][repeat])

  measurement = benchmark.Measurement(
    contender="ours",
    strategy="optimal",
    num_buckets="2",
    batch="4 sequences",
    steps=50,
    real_timesteps=3000,
    padded_timesteps=4500,
    compile_seconds=None,
    num_sequences=200,
    run_epoch=run_epoch,
  )
  benchmark.take_turns([measurement], repeats=3)
  assert calls == [0, 1, 2, 3]
  row = measurement.row()
  assert list(row) == list(benchmark.COLUMNS)
  assert row["sequences/s"] == "100.0"  # 200 sequences in the median epoch, 2 s
  assert row["device ms/step"] == "40.00"  # 2 s over 50 steps
  assert row["host ms/step"] == "2.00"
  assert row["padded/real"] == "1.500"
  assert (row["real timesteps"], row["padded timesteps"]) == ("3,000", "4,500")
  assert row["compile (s)"] == "-"


def test_a_plan_measured_already_is_found_by_its_bounds_and_batch_sizes():
  lengths = [10, 12, 30, 31, 60, 64]

  def measured(plan):
    fields = dict(contender="ours", strategy=plan.strategy, num_buckets=str(plan.num_buckets))
    return benchmark.Measurement(
      **fields, batch="", steps=1, real_timesteps=1, padded_timesteps=1, compile_seconds=None,
      num_sequences=1, run_epoch=None, plan=plan,
    )  # fmt: skip

  two = bucketing.make_plan(lengths, strategy="optimal", num_buckets=2, batch_size=2)
  ours = [
    measured(bucketing.make_plan(lengths, strategy="none", batch_size=2)),
    measured(two),
    measured(bucketing.make_plan(lengths, strategy="optimal", num_buckets=2, batch_size=4)),
  ]
  torch = dataclasses.replace(ours[1], contender="PyTorch", plan=None)
  same = bucketing.make_plan(lengths, strategy="fixed", upper_bounds=two.upper_bounds, batch_size=2)
  assert benchmark.measured_twin(same, [torch, *ours]) is ours[1]
  # Other bounds, or the same bounds at another batch size, were not measured.
  three = bucketing.make_plan(lengths, strategy="optimal", num_buckets=3, batch_size=2)
  assert benchmark.measured_twin(three, ours) is None
  assert benchmark.measured_twin(ours[2].plan, ours[:2]) is None
