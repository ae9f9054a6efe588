"""The benchmark driver: every contender has a row, the timestep counts match the plans."""

import dataclasses
import importlib
import pathlib
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bucketing
import cli_errors
import train
from experiments import benchmark, paper, reporting
from handwriting import dataset as dataset_lib


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


def a_measurement(**fields) -> benchmark.Measurement:
  """A measurement with placeholder fields, `fields` replacing them."""
  defaults = dict(
    contender="ours", strategy="optimal", num_buckets="1", batch="8 sequences", steps=1,
    real_timesteps=1, padded_timesteps=1, compile_seconds=None, num_sequences=1, run_epoch=None,
  )  # fmt: skip
  return benchmark.Measurement(**{**defaults, **fields})


def numbered_lines(lengths) -> dataset_lib.SequenceSet:
  """Sequences of `lengths` whose every feature is the sequence's number (1, 2, ...), so a batch
  tells which sequences it holds; each has a one-character label."""
  lengths = np.asarray(lengths, np.int32)
  return dataset_lib.SequenceSet(
    ids=[str(i) for i in range(len(lengths))],
    texts=["a"] * len(lengths),
    features=[np.full((length, 2), i + 1, np.float32) for i, length in enumerate(lengths)],
    labels=[np.ones(1, np.int32) for _ in lengths],
    lengths=lengths,
    label_lengths=np.ones(len(lengths), np.int32),
  )


def bench_over(data: dataset_lib.SequenceSet, batch_size: int) -> benchmark.Bench:
  """A `Bench` of the tiny preset over `data` on every device, without its model: enough to plan
  and to time steps that are given."""
  config = paper.make_config("tiny", "synthetic")
  config.bucketing.batch_size = batch_size
  bench = object.__new__(benchmark.Bench)
  bench.config, bench.data, bench.repeats = config, data, 1
  bench.batch_sharding = NamedSharding(train.make_data_mesh(), P("data"))
  return bench


def test_the_contenders_take_turns_within_each_repeat():
  calls = []

  def timed(name):
    def run_epoch(repeat):
      calls.append((name, repeat))
      return 0.001, 1.0

    return run_epoch

  measurements = [a_measurement(contender=name, run_epoch=timed(name)) for name in ("a", "b")]
  benchmark.take_turns(measurements, repeats=2)
  assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_a_plan_with_other_bounds_at_the_same_batch_sizes_was_not_measured():
  lengths = [10, 12, 30, 31, 60, 64]
  two = bucketing.make_plan(lengths, strategy="optimal", num_buckets=2, batch_size=2)
  # 40 is no bound `optimal` picks: 32 holds the same sequences with less padding.
  other = bucketing.make_plan(lengths, strategy="fixed", upper_bounds=[40, 64], batch_size=2)
  assert list(other.batch_sizes) == list(two.batch_sizes)
  assert benchmark.measured_twin(other, [a_measurement(plan=two)]) is None


def test_kappa_is_the_slope_of_compile_time_over_k_and_never_negative():
  # Walls of 3 s + 0.5 s per bucket, given out of order: the slope is 0.5, the intercept 3.
  rising = {k: a_measurement(compile_seconds=3 + 0.5 * k) for k in (4, 1, 2)}
  assert benchmark.compile_cost_per_bucket(rising) == pytest.approx(0.5)
  # Compiles that got faster with more buckets (noise): no bucket saves compile time.
  falling = {k: a_measurement(compile_seconds=5.0 - k) for k in (1, 2, 4)}
  assert benchmark.compile_cost_per_bucket(falling) == 0.0


def test_the_step_cost_is_fitted_to_one_timed_step_per_grid_point(monkeypatch):
  alpha, gamma, beta = 2e-3, 1e-5, 1e-6
  calls = []

  def time_train_step(state, mesh, num_features, rows, length, label_width, repeats, rng):
    calls.append((rows, length, label_width, repeats))
    return state, alpha + gamma * length + beta * rows * length, rows / 10

  monkeypatch.setattr(benchmark.train, "time_train_step", time_train_step)
  bench = types.SimpleNamespace(fresh_state=lambda: None, mesh=None, num_features=2, repeats=4)
  fitted, rows = benchmark.fit_step_cost(bench, (8, 16), (8, 40))
  # Labels a tenth of the length, at least one; each point timed over the bench's repeats.
  assert calls == [(8, 8, 1, 4), (8, 40, 4, 4), (16, 8, 1, 4), (16, 40, 4, 4)]
  assert fitted == pytest.approx((alpha, gamma, beta))
  # ms/step: 2 + 0.01 L + 0.001 B L, which the fit reproduces at every point.
  assert rows == [
    {"batch": b, "length": length, "tokens": tokens, "measured ms/step": ms,
     "fitted ms/step": ms, "compile (s)": compile_seconds}
    for b, length, tokens, ms, compile_seconds in [
      ("8", "8", "64", "2.14", "0.80"),
      ("8", "40", "320", "2.72", "0.80"),
      ("16", "8", "128", "2.21", "1.60"),
      ("16", "40", "640", "3.04", "1.60"),
    ]
  ]  # fmt: skip


def test_buckets_that_include_k_1_beside_others_are_accepted(monkeypatch):
  # K = 1 is the baseline, measured anyway; only a list of nothing else is refused.
  class Started(Exception):
    pass

  def started(*args, **kwargs):
    raise Started

  monkeypatch.setattr(benchmark.paper, "make_config", started)
  with pytest.raises(Started):
    benchmark.main(["--tiny", "--buckets", "1,2"])


def test_our_plans_are_made_for_every_device():
  assert jax.device_count() == 8
  plan = bench_over(numbered_lines([8] * 20), batch_size=4).plan("none", 1)
  assert plan.num_devices == 8 and all(size % 8 == 0 for size in plan.batch_sizes)


def test_auto_plans_for_the_planned_epochs():
  # 8 lines of 8 and 8 of 64 at batch 8, a second per padded token: one bucket pads the short
  # lines to 64, 1,024 s an epoch; two take 8 * 8 + 8 * 64 = 576 s, 448 s less. Each bucket
  # compiles in 10,000 s: two buckets pay off over 1,000 epochs, not over the preset's 2.
  bench = bench_over(numbered_lines([8] * 8 + [64] * 8), batch_size=8)
  assert bench.config.num_epochs == 2
  cost = (0.0, 0.0, 1.0, 10_000.0)
  assert bench.plan("auto", 2, cost=cost, epochs=1000).num_buckets == 2
  assert bench.plan("auto", 2, cost=cost, epochs=2).num_buckets == 1


def test_our_row_counts_filler_rows_and_each_timed_epoch_is_reshuffled(monkeypatch):
  # 20 lines of 8 at batch 8: 3 steps, the last with 4 filler rows, 24 rows of 8 padded.
  bench = bench_over(numbered_lines([8] * 20), batch_size=8)
  plan = bench.plan("none", 1)
  seen = []

  def step(state, batch):
    weights, inputs = np.asarray(batch["weights"]), np.asarray(batch["inputs"])
    seen[-1].extend(inputs[weights > 0, 0, 0].astype(int).tolist())
    return state + 1, None

  measurement = bench.contender("ours", plan, other=({0: step}, np.zeros(())))
  assert (measurement.steps, measurement.num_sequences) == (3, 20)
  assert (measurement.real_timesteps, measurement.padded_timesteps) == (160, 192)
  # A clock that moves 6 s at every reading: 6 s assembling 3 batches, 6 s running them.
  clock = iter(range(0, 1000, 6))
  monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  for repeat in (1, 2):
    seen.append([])
    assert measurement.run_epoch(repeat) == (2.0, 6.0)
  assert sorted(seen[0]) == sorted(seen[1]) == list(range(1, 21))
  assert seen[0] != seen[1]


def fake_torch(monkeypatch):
  """Stand-ins for the torch modules `torch_contenders` imports (torch is not installed with the
  tests), on a machine without CUDA; its train steps are not built."""
  torch = types.ModuleType("torch")
  torch.cuda = types.SimpleNamespace(is_available=lambda: False)
  torch.nn = types.ModuleType("torch.nn")
  torch.nn.utils = types.ModuleType("torch.nn.utils")
  torch.nn.utils.rnn = types.ModuleType("torch.nn.utils.rnn")
  for module in (torch, torch.nn, torch.nn.utils, torch.nn.utils.rnn):
    monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setattr(benchmark, "torch_train_step", lambda *args: None)


@pytest.mark.parametrize(
  "lengths, batch_size, steps, padded",
  # 3 lines at batch 2 take 2 steps; lines of 8 and 64 in one batch pad to 2 x 64.
  [([16, 16, 16], 2, 2, 48), ([8, 64], 2, 1, 128)],
)
def test_torch_rows_count_their_steps_and_padding(monkeypatch, lengths, batch_size, steps, padded):
  fake_torch(monkeypatch)
  config = paper.make_config("tiny", "synthetic")
  config.bucketing.batch_size = batch_size
  padded_row, packed_row = benchmark.torch_contenders(config, numbered_lines(lengths), 2)
  assert (padded_row.strategy, packed_row.strategy) == (
    "random batches, padded per batch",
    "random batches, packed",
  )
  assert padded_row.steps == packed_row.steps == steps
  assert padded_row.real_timesteps == packed_row.real_timesteps == sum(lengths)
  assert (padded_row.padded_timesteps, packed_row.padded_timesteps) == (padded, sum(lengths))


def test_torch_rows_count_the_padding_of_the_timed_epochs_not_the_warm_up(monkeypatch):
  # Two lines of 8 and two of 64 at batch 2: an epoch pads to 2 x 64 + 2 x 8 when its random
  # batches pair the short lines, to 4 x 64 otherwise. Epoch r shuffles with seed [seed, r].
  fake_torch(monkeypatch)
  config = paper.make_config("tiny", "synthetic")
  config.bucketing.batch_size = 2
  lengths = np.array([8, 8, 64, 64])

  def padded(repeat):
    order = np.random.default_rng([config.seed, repeat]).permutation(4)
    return sum(2 * lengths[order[first : first + 2]].max() for first in (0, 2))

  # Enough repeats that the last timed epoch pads otherwise than the warm-up, epoch 0: counting
  # epochs 0 to repeats - 1 would give another mean.
  repeats = next(r for r in range(1, 20) if padded(r) != padded(0))
  padded_row, _ = benchmark.torch_contenders(config, numbered_lines(lengths), repeats)
  assert padded_row.padded_timesteps == round(np.mean([padded(r) for r in range(1, repeats + 1)]))


def stand_in_benchmark(monkeypatch, lengths) -> tuple[list, list]:
  """`benchmark.main` over stand-in steps and lines of `lengths` at batch 8: an epoch takes 5 - K
  s (0.5 s less under the token budget), compiling K buckets 1 + 2 K s, and the cost model
  charges 0.01 s per padded token. Returns the lists that collect each plan's (strategy, K,
  token budget) and the repeats the bench was given."""
  planned, repeats_given = [], []

  class StandInBench(benchmark.Bench):
    def __init__(self, config, data, repeats):
      self.config, self.data, self.repeats = config, data, repeats
      repeats_given.append(repeats)

    def plan(self, strategy, num_buckets, max_tokens=0, cost=None, epochs=0):
      planned.append((strategy, num_buckets, max_tokens))
      return super().plan(strategy, num_buckets, max_tokens, cost, epochs)

    def contender(self, name, plan, other=None):
      epoch = 5.0 - plan.num_buckets - (0.5 if plan.max_tokens else 0.0)
      return a_measurement(
        contender=name, strategy=plan.strategy, num_buckets=str(plan.num_buckets),
        compile_seconds=1.0 + 2 * plan.num_buckets, run_epoch=lambda repeat: (0.001, epoch),
        plan=plan,
      )  # fmt: skip

  rows = [{"batch": "8", "length": "8"}]
  monkeypatch.setattr(benchmark, "Bench", StandInBench)
  monkeypatch.setattr(benchmark, "fit_step_cost", lambda *args: ((0.0, 0.0, 0.01), rows))
  monkeypatch.setattr(benchmark.train, "load_split", lambda *args: numbered_lines(lengths))
  monkeypatch.setitem(sys.modules, "torch", None)
  return planned, repeats_given


def test_the_report_weighs_auto_against_each_measured_k_over_the_planned_epochs(
  monkeypatch, tmp_path
):
  """The whole driver over stand-in steps: 8 lines of 8 and 8 of 24 at batch 8. An epoch takes
  4 s at K = 1 and 3 s at K = 2 (0.5 s less under the token budget); compiling K buckets takes
  1 + 2 K s, so kappa = 2. The cost model charges 0.01 s per padded token: 3.84 s an epoch at
  K = 1 (16 x 24 tokens), 2.56 s at K = 2 (8 x 8 + 8 x 24)."""
  planned, repeats_given = stand_in_benchmark(monkeypatch, [8] * 8 + [24] * 8)
  out = tmp_path / "benchmark.md"
  benchmark.main(["--tiny", "--buckets", "1,2", "--planned-epochs", "10", "--out", str(out)])
  text = out.read_text()

  assert repeats_given == [3]  # the tiny preset's
  assert "Times are medians of 3 epochs" in text
  # K = 1 is measured once, as `none`; the token budget is batch 8 x mean length 16.
  assert planned == [
    ("none", 1, 0), ("uniform", 2, 0), ("quantile", 2, 0), ("optimal", 2, 0),
    ("none", 1, 128), ("optimal", 2, 128), ("auto", 2, 0),
  ]  # fmt: skip
  assert "Token budget: 128 padded tokens per step" in text
  table = [row[:3] for row in table_rows(text, "contender")]
  assert table[-1] == ["ours, measured cost model", "auto", "2"]
  # 10 epochs plus compile: K = 1 takes 40 + 3 s, K = 2 30 + 5 s; the model predicts
  # 38.4 + 2 x 1 and 25.6 + 2 x 2. Auto picks K = 2, the plan measured as uniform K = 2.
  assert table_rows(text, "K") == [
    ["1", "4.000", "3.0", "43.0", "40.4"],
    ["2", "3.000", "5.0", "35.0", "29.6"],
  ]
  assert "kappa = 2 s" in text
  assert "it chose K = 2; measured, that plan costs 35.0 s for 10 epochs" in text
  assert "is K = 2 at 35.0 s" in text


def test_auto_may_choose_up_to_the_largest_k_given(monkeypatch, tmp_path):
  planned, _ = stand_in_benchmark(monkeypatch, [8] * 8 + [16] * 8 + [24] * 8)
  out = tmp_path / "benchmark.md"
  benchmark.main(["--tiny", "--buckets", "3,2", "--planned-epochs", "10", "--out", str(out)])
  text = out.read_text()

  assert planned[-1] == ("auto", 3, 0)
  assert "Fed to `auto` (K <= 3, 10 planned epochs)" in text
  # The cost model's prediction covers every measured K, the largest too.
  assert [row[0] for row in table_rows(text, "K")] == ["1", "2", "3"]
  assert all(row[-1] != "-" for row in table_rows(text, "K"))
