"""Batch sizes per bucket, and `auto`'s bounds and choice of K against exhaustive searches."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing import boundaries, cost


@settings(max_examples=200, deadline=None)
@given(
  bounds=st.lists(st.integers(1, 3000), min_size=1, max_size=8, unique=True).map(sorted),
  sizes=st.lists(st.integers(0, 500), min_size=8, max_size=8),
  devices=st.sampled_from([1, 2, 3, 8]),
  budget=st.integers(1, 100_000),
)
def test_token_budget_sizes_are_device_multiples_within_budget(bounds, sizes, devices, budget):
  bounds = np.array(bounds)
  sizes = np.array(sizes[: len(bounds)])
  batch = cost.batch_sizes(bounds, sizes, max_tokens=budget, num_devices=devices)
  assert np.all(batch % devices == 0)
  assert np.all(batch >= devices)
  over_budget = batch * bounds > budget
  assert np.all(batch[over_budget] == devices), "only the device floor may exceed the budget"
  assert np.all(batch <= np.maximum(-(-sizes // devices) * devices, devices))


def test_fixed_batch_size_is_rounded_down_to_devices_and_capped_by_the_bucket():
  batch = cost.batch_sizes(
    np.array([10, 20, 30]), np.array([100, 5, 100]), batch_size=30, num_devices=8
  )
  np.testing.assert_array_equal(batch, [24, 8, 24])
  batch = cost.batch_sizes(np.array([10]), np.array([100]), batch_size=3, num_devices=8)
  np.testing.assert_array_equal(batch, [8])


def test_token_budget_divides_by_the_bound():
  batch = cost.batch_sizes(np.array([100, 400, 1000]), np.array([99, 99, 99]), max_tokens=8000)
  np.testing.assert_array_equal(batch, [80, 20, 8])


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"batch_size": 8, "max_tokens": 100},
    {"batch_size": 0},
    {"max_tokens": 0},
    {"batch_size": 8, "num_devices": 0},
  ],
)
def test_bad_batch_size_rules_are_rejected(kwargs):
  with pytest.raises(ValueError):
    cost.batch_sizes(np.array([10]), np.array([5]), **kwargs)


def modelled_seconds(lengths, bounds, cost_model, epochs, **sizing):
  """A plan's modelled run time, computed from scratch."""
  bucket = np.searchsorted(bounds, lengths)
  sizes = np.bincount(bucket, minlength=len(bounds))
  batch = cost.batch_sizes(bounds, sizes, **sizing)
  steps = -(-sizes // batch)
  per_epoch = sum(
    int(s) * (cost_model.alpha + cost_model.gamma * int(L) + cost_model.beta * int(b) * int(L))
    for s, b, L in zip(steps, batch, bounds, strict=True)
  )
  return epochs * per_epoch + cost_model.kappa * len(bounds)


SIZINGS = [
  {"batch_size": 16},
  {"batch_size": 5, "num_devices": 3},
  {"max_tokens": 20_000, "num_devices": 4},
  {"max_tokens": 300},
]


@settings(max_examples=150, deadline=None)
@given(
  lengths=st.lists(st.integers(1, 120), min_size=1, max_size=200).map(np.array),
  max_buckets=st.integers(1, 5),
  alpha=st.floats(0, 0.1),
  beta=st.floats(0, 1e-5),
  gamma=st.floats(0, 1e-4),
  sizing=st.sampled_from(SIZINGS),
)
@pytest.mark.parametrize("costs_per_chunk", [1 << 20, 11])
def test_fastest_bounds_match_brute_force(
  lengths, max_buckets, alpha, beta, gamma, sizing, costs_per_chunk
):
  # Every set of at most K bounds among the distinct lengths (the longest always one of them);
  # 11 costs at once split the programme's ends into chunks of one or two.
  lengths = lengths % 9 * 13 + 1  # at most 9 distinct lengths, so every subset can be tried
  model = cost.CostModel(alpha=alpha, beta=beta, gamma=gamma, kappa=0)
  values = np.unique(lengths)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cost, "COSTS_PER_CHUNK", costs_per_chunk)
    found = cost.fastest_bounds_per_count(lengths, max_buckets, cost_model=model, **sizing)
  assert len(found) == min(max_buckets, values.size)  # more buckets than lengths cannot help
  for num in range(1, len(found) + 1):
    fastest = min(
      modelled_seconds(lengths, np.array([*inner, values[-1]]), model, 1, **sizing)
      for size in range(min(num, values.size))
      for inner in itertools.combinations(values[:-1], size)
    )
    assert len(found[num - 1]) <= num
    assert found[num - 1][-1] == values[-1]
    seconds = modelled_seconds(lengths, found[num - 1], model, 1, **sizing)
    assert seconds == pytest.approx(fastest, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
  lengths=st.lists(st.integers(1, 1500), min_size=1, max_size=400).map(np.array),
  max_buckets=st.integers(1, 12),
  alpha=st.floats(0, 0.1),
  beta=st.floats(0, 1e-5),
  kappa=st.floats(0, 30),
  gamma=st.floats(0, 1e-4),
  epochs=st.sampled_from([1, 10, 100]),
  sizing=st.sampled_from(SIZINGS),
)
def test_auto_picks_the_fastest_k_and_never_loses_to_optimal(
  lengths, max_buckets, alpha, beta, kappa, gamma, epochs, sizing
):
  model = cost.CostModel(alpha=alpha, beta=beta, kappa=kappa, gamma=gamma)
  choice = cost.choose_num_buckets(
    lengths, max_buckets, cost_model=model, num_epochs=epochs, **sizing
  )
  candidates = cost.fastest_bounds_per_count(lengths, max_buckets, cost_model=model, **sizing)
  expected = [modelled_seconds(lengths, b, model, epochs, **sizing) for b in candidates]
  np.testing.assert_allclose(choice.seconds_per_count, expected, rtol=1e-9, atol=1e-12)
  assert np.isclose(expected[choice.num_buckets - 1], min(expected), rtol=1e-9, atol=1e-12)
  assert len(choice.upper_bounds) == choice.num_buckets
  assert choice.bounds_minimise == "run time"
  # The padding optimum's bounds, at the same K, are never faster (compiles aside).
  for num, bounds in enumerate(candidates, start=1):
    least_padding = boundaries.optimal_bounds(lengths, num)
    no_compiles = dataclasses.replace(model, kappa=0)
    assert (
      modelled_seconds(lengths, bounds, no_compiles, 1, **sizing)
      <= modelled_seconds(lengths, least_padding, no_compiles, 1, **sizing) * (1 + 1e-9) + 1e-12
    )


def test_auto_takes_the_padding_optimum_past_its_distinct_length_limit(monkeypatch):
  lengths = np.random.default_rng(0).integers(30, 1500, 2000)
  monkeypatch.setattr(cost, "MAX_DISTINCT_LENGTHS_FOR_RUN_TIME", 100)
  choice = cost.choose_num_buckets(lengths, 6, cost_model=cost.CostModel(kappa=0), batch_size=32)
  assert choice.bounds_minimise == "padded timesteps"
  np.testing.assert_array_equal(
    choice.upper_bounds, boundaries.optimal_bounds(lengths, choice.num_buckets)
  )


def test_auto_trades_compiles_against_padding():
  lengths = np.random.default_rng(0).integers(30, 1500, 5000)
  cheap_compiles = cost.choose_num_buckets(
    lengths, 16, cost_model=cost.CostModel(alpha=0, beta=1e-6, kappa=0), batch_size=32
  )
  dear_compiles = cost.choose_num_buckets(
    lengths, 16, cost_model=cost.CostModel(alpha=0, beta=1e-6, kappa=1e6), batch_size=32
  )
  assert cheap_compiles.num_buckets == 16
  assert dear_compiles.num_buckets == 1


def test_a_per_timestep_cost_favours_buckets_even_under_a_token_budget():
  # Under a token budget every step holds about as many tokens whatever its bucket, so a cost per
  # token alone sees no gain in bucketing; a recurrence's cost per timestep does.
  lengths = np.random.default_rng(0).integers(30, 1500, 5000)
  budget = {"max_tokens": 48_000}
  per_token = cost.CostModel(alpha=0, beta=1e-6, kappa=5, gamma=0)
  per_timestep = cost.CostModel(alpha=0, beta=1e-6, kappa=5, gamma=2e-4)
  without = cost.choose_num_buckets(lengths, 16, cost_model=per_token, num_epochs=20, **budget)
  with_gamma = cost.choose_num_buckets(
    lengths, 16, cost_model=per_timestep, num_epochs=20, **budget
  )
  assert with_gamma.num_buckets > without.num_buckets


@given(
  alpha=st.floats(0, 0.1),
  gamma=st.floats(0, 1e-3),
  beta=st.floats(0, 1e-5),
  noise=st.floats(0, 0.02),
)
def test_fit_step_model_recovers_the_step_times(alpha, gamma, beta, noise):
  batches = np.array([32, 32, 16, 16, 64])
  lengths = np.array([200, 600, 600, 200, 400])
  model = cost.CostModel(alpha=alpha, beta=beta, gamma=gamma)
  jitter = 1 + noise * np.array([1, -1, 1, -1, 0])
  seconds = model.step_seconds(batches, lengths) * jitter
  fitted_alpha, fitted_gamma, fitted_beta = cost.fit_step_model(batches, lengths, seconds)
  fitted = cost.CostModel(alpha=fitted_alpha, beta=fitted_beta, gamma=fitted_gamma)  # all >= 0
  # Within the noise of every measured step; exact without noise.
  np.testing.assert_allclose(
    fitted.step_seconds(batches, lengths), seconds, rtol=3 * noise + 1e-6, atol=1e-9
  )
  if noise == 0:
    np.testing.assert_allclose(
      (fitted_alpha, fitted_gamma, fitted_beta), (alpha, gamma, beta), rtol=1e-6, atol=1e-9
    )


def test_fit_step_model_at_one_batch_size_folds_beta_into_gamma():
  model = cost.CostModel(alpha=0.01, gamma=3e-5, beta=2e-7)
  lengths = np.array([200, 600])
  seconds = model.step_seconds(32, lengths)
  alpha, gamma, beta = cost.fit_step_model([32, 32], lengths, seconds)
  assert (alpha, beta) == (pytest.approx(0.01), 0.0)
  assert gamma == pytest.approx(3e-5 + 2e-7 * 32)


@pytest.mark.parametrize(
  ("batches", "lengths"), [([32, 32], [100, 100]), ([32, 16], [100, 200]), ([8, 16], [50, 50])]
)
def test_fit_step_model_needs_steps_that_determine_it(batches, lengths):
  with pytest.raises(ValueError, match="needs steps at two lengths"):
    cost.fit_step_model(batches, lengths, [1.0] * len(lengths))


@pytest.mark.parametrize("field", ["alpha", "beta", "kappa", "gamma"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_cost_model_rejects_bad_figures(field, value):
  with pytest.raises(ValueError, match=field):
    cost.CostModel(**{field: value})


def test_auto_takes_the_fewest_buckets_when_more_are_no_faster(monkeypatch):
  # One sequence a step and a cost per step only: 3 s an epoch whatever the bounds. Past the
  # distinct-length limit each K's bounds are the padding optimum's, 1, 2 and 3 buckets alike.
  monkeypatch.setattr(cost, "MAX_DISTINCT_LENGTHS_FOR_RUN_TIME", 0)
  model = cost.CostModel(alpha=1.0, beta=0.0, gamma=0.0, kappa=0.0)
  choice = cost.choose_num_buckets([10, 20, 30], 3, cost_model=model, batch_size=1)
  np.testing.assert_allclose(choice.seconds_per_count, [3.0, 3.0, 3.0])
  assert choice.num_buckets == 1
  np.testing.assert_array_equal(choice.upper_bounds, [30])


def test_auto_weighs_run_time_bounds_up_to_its_distinct_length_limit(monkeypatch):
  monkeypatch.setattr(cost, "MAX_DISTINCT_LENGTHS_FOR_RUN_TIME", 3)
  at_limit = cost.choose_num_buckets([10, 20, 30, 30], 2, batch_size=2)
  assert at_limit.bounds_minimise == "run time"
  past_limit = cost.choose_num_buckets([10, 20, 30, 40], 2, batch_size=2)
  assert past_limit.bounds_minimise == "padded timesteps"
