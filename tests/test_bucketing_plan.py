"""Plans: strategies wired together, overflow policies, label widths and the report's arithmetic."""

import numpy as np
import pytest

from bucketing import boundaries, cost
from bucketing import plan as plan_lib
from bucketing.plan import format_report

LENGTHS = np.random.default_rng(0).integers(31, 1541, 1000)


@pytest.mark.parametrize("strategy", ["none", "uniform", "quantile", "optimal", "auto"])
def test_report_arithmetic_is_consistent(strategy):
  plan = plan_lib.make_plan(LENGTHS, strategy=strategy, num_buckets=6, batch_size=24, num_devices=8)
  summary = plan.summary()
  bounds = np.array(summary["upper_bounds"])
  assert bounds[-1] == LENGTHS.max()
  assert sum(summary["bucket_sizes"]) == LENGTHS.size == summary["num_examples"]
  assert summary["real_timesteps"] == LENGTHS.sum()
  assert summary["padded_timesteps"] == boundaries.padded_timesteps(LENGTHS, bounds)
  steps = np.array(summary["steps_per_epoch"])
  batch = np.array(summary["batch_sizes"])
  assert summary["padded_timesteps_with_filler"] == int(np.sum(steps * batch * bounds))
  assert np.all(batch % 8 == 0)
  assert np.all(steps * batch - np.array(summary["bucket_sizes"]) == summary["filler_rows"])
  assert summary["efficiency"] == pytest.approx(LENGTHS.sum() / summary["padded_timesteps"])
  per_bucket = summary["buckets"]
  assert sum(b["real_timesteps"] for b in per_bucket) == summary["real_timesteps"]
  if strategy == "none":
    assert summary["ideal_speedup"] == pytest.approx(1.0)
    assert summary["predicted_speedup"] == pytest.approx(1.0)


def test_optimal_plan_beats_none_on_a_long_tailed_corpus():
  summary = plan_lib.make_plan(LENGTHS, strategy="optimal", num_buckets=8, batch_size=32).summary()
  assert summary["efficiency"] > 0.85
  assert summary["ideal_speedup"] > 1.5


def test_upper_bounds_go_with_the_fixed_strategy_and_only_with_it():
  with pytest.raises(ValueError, match=r"^strategy='fixed' needs upper_bounds$"):
    plan_lib.make_plan([10, 20], strategy="fixed", batch_size=2)
  with pytest.raises(ValueError, match=r"upper_bounds are for strategy='fixed' only, not 'none'"):
    plan_lib.make_plan([10, 20], strategy="none", upper_bounds=[16, 32], batch_size=2)


def test_overflow_error_names_the_example_and_its_length():
  with pytest.raises(ValueError, match=r"line-b \(length 50\).*overflow"):
    plan_lib.make_plan(
      [10, 50, 20],
      strategy="fixed",
      upper_bounds=[16, 32],
      batch_size=2,
      example_ids=["line-a", "line-b", "line-c"],
    )


@pytest.mark.parametrize(
  ("num_over", "end"), [(5, "#5 (length 10); use"), (6, "#5 (length 10) and 1 more; use")]
)
def test_overflow_error_names_the_first_five_and_counts_the_rest(num_over, end):
  with pytest.raises(ValueError) as error:
    plan_lib.make_plan([1] + [10] * num_over, strategy="fixed", upper_bounds=[5], batch_size=2)
  message = str(error.value)
  assert message.startswith(f"{num_over} sequence(s) longer than the largest bucket bound 5: #1 (")
  assert f"{end} overflow='drop'" in message and "#6" not in message


def overflowing_plan(overflow: str, **options) -> plan_lib.BucketPlan:
  """Lengths 10, 50, 20, 70 in bounds 16, 32 and batches of 2: 50 and 70 over the last bound."""
  return plan_lib.make_plan(
    [10, 50, 20, 70],
    strategy="fixed",
    upper_bounds=[16, 32],
    batch_size=2,
    overflow=overflow,
    **options,
  )


def test_a_plan_that_drops_every_sequence_is_refused():
  with pytest.raises(ValueError, match="every sequence was dropped"):
    plan_lib.make_plan(
      [50, 70], strategy="fixed", upper_bounds=[16, 32], batch_size=2, overflow="drop"
    )


def test_overflow_drop_and_truncate_are_counted():
  names = {"example_ids": ["a", "b", "c", "d"]}
  dropped = overflowing_plan("drop", **names)
  assert dropped.summary()["dropped"] == ["b", "d"]
  assert dropped.summary()["num_examples"] == 2
  assert list(dropped.bucket_of_example) == [0, -1, 1, -1]

  truncated = overflowing_plan("truncate", **names)
  summary = truncated.summary()
  assert summary["truncated"] == ["b", "d"]
  assert summary["real_timesteps"] == 10 + 32 + 20 + 32
  assert list(truncated.effective_lengths) == [10, 32, 20, 32]


def two_bucket_plan() -> plan_lib.BucketPlan:
  """Lengths 5, 6 | 30, 31 at bounds 10 | 40, batch 2, labels 2, 4 | 9, 3 long."""
  return plan_lib.make_plan(
    [5, 6, 30, 31],
    strategy="fixed",
    upper_bounds=[10, 40],
    batch_size=2,
    label_lengths=[2, 4, 9, 3],
  )


def test_label_widths_are_the_longest_label_per_bucket():
  np.testing.assert_array_equal(two_bucket_plan().label_upper_bounds, [4, 9])


def test_the_summary_reports_the_label_widths():
  summary = two_bucket_plan().summary()
  assert summary["label_upper_bounds"] == [4, 9]
  assert [bucket["label_upper_bound"] for bucket in summary["buckets"]] == [4, 9]


def test_a_plan_for_other_sequences_keeps_its_shapes_and_buckets_them_alike():
  plan = two_bucket_plan()
  other = plan.for_sequences(np.array([40, 10, 11, 1, 2]), ["a", "b", "c", "d", "e"])
  # Each in the first bucket that holds it, a bound included, as make_plan would put it.
  np.testing.assert_array_equal(other.bucket_of_example, [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(other.bucket_sizes, [3, 2])
  np.testing.assert_array_equal(other.steps_per_epoch, [2, 1])
  for shape in ("upper_bounds", "batch_sizes", "label_upper_bounds"):
    np.testing.assert_array_equal(getattr(other, shape), getattr(plan, shape))
  assert other.example_name(2) == "c" and plan.example_name(2) == "#2"
  with pytest.raises(ValueError, match="sequence b of length 41 is longer than the last bound 40"):
    plan.for_sequences(np.array([3, 41]), ["a", "b"])


def test_round_to_gives_multiples_and_a_baseline_rounded_alike():
  plan = plan_lib.make_plan(LENGTHS, strategy="optimal", num_buckets=8, batch_size=32, round_to=8)
  assert np.all(plan.upper_bounds % 8 == 0)
  assert plan.upper_bounds[-1] >= LENGTHS.max()
  baseline = plan_lib.make_plan(LENGTHS, strategy="none", batch_size=32, round_to=8).summary()
  assert baseline["ideal_speedup"] == pytest.approx(1.0)
  assert baseline["predicted_speedup"] == pytest.approx(1.0)


def test_token_budget_plan():
  plan = plan_lib.make_plan(
    LENGTHS, strategy="optimal", num_buckets=4, max_tokens=20_000, num_devices=2
  )
  assert np.all(plan.batch_sizes * plan.upper_bounds <= 20_000)
  assert plan.batch_sizes[0] > plan.batch_sizes[-1]
  summary = plan.summary()
  assert summary["over_budget_buckets"] == [] and "over max_tokens" not in format_report(summary)
  assert summary["tokens_per_step"] == (plan.batch_sizes * plan.upper_bounds).tolist()


def test_a_bucket_over_the_token_budget_is_reported():
  # 8 devices take at least 8 sequences a step: 8 x 200 = 1,600 tokens against a budget of 1,000.
  plan = plan_lib.make_plan(
    [100] * 20 + [200] * 20, strategy="optimal", num_buckets=2, max_tokens=1000, num_devices=8
  )
  summary = plan.summary()
  assert summary["tokens_per_step"] == [800, 1600] and summary["over_budget_buckets"] == [1]
  assert "bucket 1 takes 1,600 padded tokens a step, over max_tokens 1,000" in format_report(
    summary
  )


@pytest.mark.parametrize(("limit", "minimise"), [(10_000, "run time"), (5, "padded timesteps")])
def test_auto_says_what_its_bounds_minimise(monkeypatch, limit, minimise):
  monkeypatch.setattr(cost, "MAX_DISTINCT_LENGTHS_FOR_RUN_TIME", limit)
  plan = plan_lib.make_plan(LENGTHS, strategy="auto", num_buckets=4, batch_size=8)
  summary = plan.summary()
  assert summary["auto_bounds_minimise"] == minimise
  assert ("each K's bounds are those of least padding" in format_report(summary)) == (
    minimise == "padded timesteps"
  )


def test_a_cost_model_that_costs_nothing_per_step_predicts_nothing():
  free = cost.CostModel(alpha=0.0, beta=0.0, gamma=0.0, kappa=1.0)
  summary = plan_lib.make_plan(LENGTHS, strategy="optimal", num_buckets=2, batch_size=8).summary(
    free
  )
  assert summary["predicted_speedup"] is None and summary["ideal_speedup"] > 1


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"strategy": "magic"}, "unknown strategy"),
    ({"strategy": "optimal", "num_buckets": 0}, r"num_buckets must be an integer >= 1, got 0"),
    ({"strategy": "optimal", "num_buckets": 2.0}, r"num_buckets must be an integer >= 1, got 2.0"),
    ({"strategy": "auto", "num_epochs": float("nan")}, r"num_epochs must be .* > 0, got nan"),
    ({"strategy": "auto", "num_epochs": -1}, r"num_epochs must be .* > 0, got -1"),
    ({"strategy": "auto", "num_epochs": 0}, r"num_epochs must be .* > 0, got 0"),
    ({"strategy": "fixed"}, "upper_bounds"),
    ({"strategy": "optimal", "upper_bounds": [5]}, "upper_bounds"),
    ({"strategy": "optimal", "overflow": "ignore"}, "overflow"),
    ({"strategy": "optimal", "num_devices": 0}, "num_devices"),
    ({"strategy": "optimal", "example_ids": ["x"]}, "example ids"),
    ({"strategy": "optimal", "label_lengths": [1, 2]}, r"^2 label lengths for 3 lengths$"),
  ],
)
def test_bad_plans_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    plan_lib.make_plan([3, 4, 5], batch_size=2, **kwargs)


def test_a_plan_whose_padded_timesteps_int64_cannot_count_is_refused():
  longest = boundaries.MAX_LENGTH
  lengths = [longest - 2, longest - 1, longest]
  with pytest.raises(ValueError, match=r"3 bucket\(s\) .* more than int64 counts: use fewer dev"):
    plan_lib.make_plan(lengths, num_buckets=3, batch_size=8, num_devices=2**31 - 1)
  # Half the devices: just countable, and counted exactly.
  summary = plan_lib.make_plan(lengths, num_buckets=3, batch_size=8, num_devices=2**30).summary()
  assert summary["padded_timesteps_with_filler"] == 2**30 * (3 * longest - 3)


def test_a_plan_of_exactly_2_to_the_63_padded_timesteps_is_refused():
  # 2**31 rows in each of 3 buckets at 3, 2**31 - 2 and 2**31 - 1: 2**31 x 2**32 = 2**63
  # timesteps, one past int64's largest.
  lengths = [3, 2**31 - 2, 2**31 - 1]
  with pytest.raises(ValueError, match="more than int64 counts"):
    plan_lib.make_plan(lengths, num_buckets=3, batch_size=8, num_devices=2**31)


def test_real_timesteps_are_counted_exactly_past_float64s_integers():
  # 2**22 + 2 sequences of the longest odd length hold more than 2**53 real timesteps, where a
  # float64 sum rounds.
  count, longest = 2**22 + 2, boundaries.MAX_LENGTH
  plan = plan_lib.make_plan(np.full(count, longest), strategy="none", batch_size=2)
  summary = plan.summary(cost_model=None)
  assert summary["real_timesteps"] == count * longest == summary["padded_timesteps"]
  assert summary["buckets"][0]["real_timesteps"] == count * longest


def test_the_baseline_of_a_plan_that_drops_or_truncates_holds_the_same_sequences():
  # Dropped: 10 and 20 stay, one per bucket (16 + 32 padded); the baseline is 2 rows at 20.
  assert overflowing_plan("drop").summary()["ideal_speedup"] == pytest.approx(40 / 48)
  # Truncated: 10 alone at 16, then 50, 20 and 70 in two batches of 2 at 32 (4 x 32); the
  # baseline is 2 batches of 2 at 32, the longest truncated length, not 70.
  assert overflowing_plan("truncate").summary()["ideal_speedup"] == pytest.approx(128 / 144)


def test_efficiency_with_filler_counts_the_filler_rows():
  # 3 + 4 + 4 = 11 real timesteps in one bucket at 4: 12 padded, 16 with the filler row of the
  # second batch of 2.
  summary = plan_lib.make_plan([3, 4, 4], strategy="none", batch_size=2).summary()
  assert (summary["real_timesteps"], summary["padded_timesteps"]) == (11, 12)
  assert summary["padded_timesteps_with_filler"] == 16
  assert summary["efficiency"] == pytest.approx(11 / 12)
  assert summary["efficiency_with_filler"] == pytest.approx(11 / 16)


def test_predicted_speedup_is_the_baseline_epoch_over_the_bucketed_epoch():
  # A second per padded token: 4 x 10 + 4 x 100 = 440 s bucketed against 2 batches of 4 at 100,
  # 800 s, in one bucket; compiles are no part of an epoch.
  plan = plan_lib.make_plan([10] * 4 + [100] * 4, strategy="optimal", num_buckets=2, batch_size=4)
  model = cost.CostModel(alpha=0.0, beta=1.0, gamma=0.0, kappa=5.0)
  assert plan.summary(model)["predicted_speedup"] == pytest.approx(800 / 440)


def test_the_report_states_the_predicted_speedup_only_with_a_cost_model():
  # The plan of the test above: 800 / 440 = 1.82x predicted, and 800 / 440 padded timesteps too.
  plan = plan_lib.make_plan([10] * 4 + [100] * 4, strategy="optimal", num_buckets=2, batch_size=4)
  model = cost.CostModel(alpha=0.0, beta=1.0, gamma=0.0, kappa=5.0)
  lines = format_report(plan.summary(model)).splitlines()
  speedup = "speed-up against one bucket: ideal (padded timesteps) 1.82x"
  assert f"{speedup}, predicted by the cost model 1.82x" in lines
  assert speedup in format_report(plan.summary(cost_model=None)).splitlines()


def test_a_bucket_exactly_at_the_token_budget_is_not_over_it():
  # 1,600 tokens: 16 rows at 100 and 8 rows at 200 take the budget exactly.
  plan = plan_lib.make_plan(
    [100] * 20 + [200] * 20, strategy="optimal", num_buckets=2, max_tokens=1600, num_devices=8
  )
  summary = plan.summary()
  assert summary["tokens_per_step"] == [1600, 1600] and summary["over_budget_buckets"] == []
  assert "over max_tokens" not in format_report(summary)


def test_an_empty_bucket_still_has_a_label_width_of_one():
  plan = plan_lib.make_plan(
    [5, 30], strategy="fixed", upper_bounds=[10, 20, 40], batch_size=2, label_lengths=[2, 3]
  )
  np.testing.assert_array_equal(plan.label_upper_bounds, [2, 1, 3])


def test_fixed_bounds_are_rounded_up_to_round_to():
  plan = plan_lib.make_plan(
    [5, 12, 20], strategy="fixed", upper_bounds=[10, 20], batch_size=2, round_to=8
  )
  np.testing.assert_array_equal(plan.upper_bounds, [16, 24])
  # Bounds that round to the same multiple are one bucket.
  plan = plan_lib.make_plan(
    [5, 12], strategy="fixed", upper_bounds=[10, 12], batch_size=2, round_to=8
  )
  np.testing.assert_array_equal(plan.upper_bounds, [16])


def test_auto_bounds_are_multiples_of_round_to():
  # Rounded up to 8 the lengths are 8, 8, 24 and 32: auto can only cut among those.
  plan = plan_lib.make_plan(
    [3, 5, 17, 30], strategy="auto", num_buckets=3, batch_size=2, round_to=8
  )
  assert np.all(plan.upper_bounds % 8 == 0) and plan.upper_bounds[-1] == 32
  assert set(plan.upper_bounds.tolist()) <= {8, 24, 32}


def test_a_dropped_sequences_label_widens_no_bucket():
  # Length 50 is dropped (bounds 10 and 40): its label of 9 is in no batch, so no bucket needs it.
  plan = plan_lib.make_plan(
    [5, 30, 50],
    strategy="fixed",
    upper_bounds=[10, 40],
    batch_size=2,
    overflow="drop",
    label_lengths=[2, 3, 9],
  )
  np.testing.assert_array_equal(plan.label_upper_bounds, [2, 3])


def test_each_buckets_row_counts_its_own_real_padded_and_filler_figures():
  # Bucket 0 (bound 4) holds 3, 4, 4 in batches of 2: 11 real, 3 x 4 = 12 padded timesteps and
  # one filler row. Bucket 1 (bound 10) holds 9 alone, in a batch of 1: 9 real, 10 padded.
  summary = plan_lib.make_plan(
    [3, 4, 4, 9], strategy="fixed", upper_bounds=[4, 10], batch_size=2
  ).summary()
  assert summary["buckets"] == [
    {
      "upper_bound": 4,
      "label_upper_bound": None,
      "examples": 3,
      "batch_size": 2,
      "steps_per_epoch": 2,
      "real_timesteps": 11,
      "padded_timesteps": 12,
      "filler_rows": 1,
    },
    {
      "upper_bound": 10,
      "label_upper_bound": None,
      "examples": 1,
      "batch_size": 1,
      "steps_per_epoch": 1,
      "real_timesteps": 9,
      "padded_timesteps": 10,
      "filler_rows": 0,
    },
  ]


def test_the_reports_table_right_aligns_each_column_under_its_heading():
  # The plan of the test above: 3, 4, 4 at bound 4 and 9 at bound 10, in batches of 2.
  summary = plan_lib.make_plan(
    [3, 4, 4, 9], strategy="fixed", upper_bounds=[4, 10], batch_size=2
  ).summary()
  assert format_report(summary).splitlines()[:4] == [
    "bucket  bound  examples  batch  steps  real steps  padded  filler rows",
    "------  -----  --------  -----  -----  ----------  ------  -----------",
    "     0      4         3      2      2          11      12            1",
    "     1     10         1      1      1           9      10            0",
  ]


def test_the_report_states_steps_efficiencies_and_overflow_counts():
  # 3, 4, 4 in batches of 2 at 4: 2 steps, 11 / 12 = 91.7% efficient, 11 / 16 = 68.8% with the
  # filler row.
  lines = format_report(plan_lib.make_plan([3, 4, 4], strategy="none", batch_size=2).summary())
  assert "strategy none: 1 bucket(s), 3 sequences, 2 steps per epoch on 1 device(s)" in lines
  assert "efficiency 91.7% (68.8% with filler)" in lines
  # 50 and 70 are over the last bound: dropped, or truncated, two of them either way.
  dropped = format_report(overflowing_plan("drop").summary()).splitlines()
  assert dropped[-1] == "dropped 2 sequence(s) over the largest bound"
  truncated = format_report(overflowing_plan("truncate").summary()).splitlines()
  assert truncated[-1] == "truncated 2 sequence(s) to the largest bound"
