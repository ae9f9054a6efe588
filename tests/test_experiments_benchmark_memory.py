"""The memory benchmark: its figures are the compiled steps' own, the fit recovers a known model,
and the tables say what bucketing does to a step's memory."""

import types

import numpy as np
import pytest

import bucketing
from experiments import benchmark_memory, cli, reporting
from training.compilation import StepMemory

TINY = "experiments/synthetic.py:tiny"


@pytest.fixture(scope="module")
def compiler():
  return benchmark_memory.Compiler(cli.load_config(["benchmark", f"--config={TINY}"]))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("memory") / "memory.md"
  benchmark_memory.main([f"--config={TINY}", "--quick", "--out", str(out)])
  return out.read_text()


def test_a_step_needs_more_memory_for_more_lines_and_longer_lines(compiler):
  small, more_lines, longer = (
    compiler.shape_memory(batch, length, 5).total for batch, length in ((4, 64), (8, 64), (4, 128))
  )
  assert small < more_lines and small < longer
  # The donated state is written over itself: its bytes count once.
  memory = compiler.shape_memory(4, 64, 5)
  assert (
    memory.aliased > 0 and memory.total < memory.arguments + memory.outputs + memory.temporaries
  )


def test_the_fit_recovers_a_known_memory_model():
  fixed, per_token, per_cell = 3e6, 2000.0, 24.0
  shapes = []
  for batch, length, width in ((16, 100, 10), (32, 100, 10), (16, 400, 30), (32, 400, 30)):
    total = fixed + per_token * batch * length + per_cell * batch * length * (2 * width + 1)
    shapes.append((batch, length, width, StepMemory(int(total), 0, 0, 0)))
  coefficients, worst = benchmark_memory.fit_memory(shapes)
  np.testing.assert_allclose(coefficients, [fixed, per_token, per_cell], rtol=1e-6)
  assert worst < 1e-9


def test_with_a_fixed_batch_no_bucket_needs_more_than_one_bucket_does(compiler):
  rng = np.random.default_rng(0)
  lengths = rng.integers(20, 200, 64)
  plans = [
    bucketing.make_plan(
      lengths,
      strategy=strategy,
      num_buckets=k,
      batch_size=8,
      num_devices=1,
      round_to=8,
      label_lengths=np.full(64, 5),
    )
    for strategy, k in (("none", 1), ("optimal", 4))
  ]
  (none,), bucketed = (list(compiler.plan_memory(plan).values()) for plan in plans)
  assert max(step.total for step in bucketed) <= none.total
  # The longest bucket holds a full batch here: it is the one-bucket plan's very step.
  assert plans[1].batch_sizes[-1] == 8 and bucketed[-1] == none


@pytest.mark.slow
def test_the_report_has_every_table_and_its_fit_matches_its_shapes(report):
  shapes = reporting.read_markdown_table(report, "## Shapes")
  for row in shapes:
    measured, fitted = (
      float(row[column].replace(",", "")) for column in ("step (MB)", "fitted (MB)")
    )
    assert fitted == pytest.approx(measured, rel=0.05)
  plans = reporting.read_markdown_table(report, "## Plans")
  assert [row["plan"].split(",")[0] for row in plans] == ["none", "optimal"] * 2
  by_plan = {row["plan"]: row for row in plans}
  none, optimal = by_plan["none, 8 lines"], by_plan["optimal, 8 lines"]
  assert float(optimal["mean over steps (MB)"]) < float(none["mean over steps (MB)"])
  budgets = reporting.read_markdown_table(report, "## Token budgets")
  assert [int(row["device memory (GB)"]) for row in budgets] == list(benchmark_memory.DEVICE_GB)


def test_a_run_stopped_among_the_plans_keeps_the_fit_and_the_plans_it_measured(
  tmp_path, monkeypatch
):
  measured_row, rows = benchmark_memory.plan_row, []

  def stopped_at_the_third_plan(*args):
    if len(rows) == 2:
      raise KeyboardInterrupt  # what a GPU call's deadline sends
    rows.append(measured_row(*args))
    return rows[-1]

  monkeypatch.setattr(benchmark_memory, "plan_row", stopped_at_the_third_plan)
  out = tmp_path / "memory.md"
  with pytest.raises(KeyboardInterrupt):
    benchmark_memory.main([f"--config={TINY}", "--quick", "--out", str(out)])
  text = out.read_text()
  assert reporting.read_markdown_table(text, "## Shapes")
  assert reporting.read_markdown_table(text, "## Token budgets")
  assert reporting.read_markdown_table(text, "## Plans") == [
    {key: str(value) for key, value in row.items()} for row in rows
  ]
  assert "Unfinished: 2 of the 4 plans" in text


def test_a_budget_is_the_tokens_whose_fitted_step_fills_the_usable_memory():
  # 910 bytes a token and 10 a lattice cell, 2 x 4 + 1 = 9 cells a token: 1,000 bytes a token,
  # after a fixed 1 GB. A 16 GB card leaves 12 GB to XLA: 11 GB of tokens.
  rows = benchmark_memory.budget_rows(np.array([1e9, 910.0, 10.0]), label_width=4)
  assert list(rows[0]) == ["device memory (GB)", "usable by XLA (GB)", "padded tokens per step"]
  assert [tuple(row.values()) for row in rows] == [
    ("16", "12", "11,000,000"),
    ("40", "30", "29,000,000"),
    ("80", "60", "59,000,000"),
    ("141", "105.75", "104,750,000"),
  ]


def test_a_shape_row_gives_the_step_its_parts_and_the_fit_at_that_shape():
  # 2 x 10 = 20 padded tokens, 20 x (2 x 3 + 1) = 140 lattice cells.
  memory = StepMemory(
    arguments=3_000_000, outputs=1_000_000, aliased=1_000_000, temporaries=2_000_000
  )
  row = benchmark_memory.shape_row((2, 10, 3, memory), np.array([1e6, 1e5, 1e5]))
  assert row == {
    "batch": "2",
    "length": "10",
    "label width": "3",
    "padded tokens": "20",
    "arguments (MB)": "3.0",
    "temporaries (MB)": "2.0",
    "step (MB)": "5.0",
    "fitted (MB)": "17.0",  # 1 + 20 x 0.1 + 140 x 0.1
  }


def test_the_fits_worst_residual_is_the_largest_miss_as_a_share_of_its_step():
  # Rows [1, tokens, lattice cells] of [1, 1, 1], [1, 2, 2], [1, 1, 3], [1, 2, 6]: steps of
  # 100 + 10 x tokens + 1 x cell (111, 122, 113, 126) off by +2, -1, -2, +1 bytes, which no
  # coefficients can fit (that vector is orthogonal to every column), so the fit stays
  # [100, 10, 1] and misses by those: 2 bytes of a 111-byte step is the worst share.
  totals = {(1, 1, 0): 113, (2, 1, 0): 121, (1, 1, 1): 111, (2, 1, 1): 127}
  shapes = [(*shape, StepMemory(total, 0, 0, 0)) for shape, total in totals.items()]
  coefficients, worst = benchmark_memory.fit_memory(shapes)
  np.testing.assert_allclose(coefficients, [100, 10, 1], rtol=1e-9)
  assert worst == pytest.approx(2 / 111)


def test_a_plan_row_gives_the_peak_of_the_buckets_an_epoch_uses_and_the_mean_over_its_steps():
  # Bucket 1 (8 lines x 200) is the largest step; bucket 2 holds no line, so it has no step.
  plan = types.SimpleNamespace(
    num_buckets=3,
    upper_bounds=np.array([100, 200, 300]),
    batch_sizes=np.array([16, 8, 4]),
    bucket_sizes=np.array([40, 12, 0]),
    steps_per_epoch=np.array([3, 2, 0]),
  )
  memory = {0: StepMemory(10_000_000, 0, 0, 0), 1: StepMemory(30_000_000, 0, 0, 0)}
  assert benchmark_memory.plan_row("optimal, 16 lines", plan, memory) == {
    "plan": "optimal, 16 lines",
    "K": "3",
    "steps": "5",
    "lines per step": "10.4",  # 52 lines in 5 steps
    "largest step (batch x length)": "8 x 200",
    "peak (MB)": "30.0",
    "mean over steps (MB)": "18.0",  # (3 x 10 + 2 x 30) / 5
  }
