"""Boundary strategies; `optimal` is checked against brute force over every partition."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketing import boundaries

small_lengths = st.lists(st.integers(1, 60), min_size=1, max_size=25).map(np.array)


def brute_force_cost(lengths: np.ndarray, num_buckets: int) -> int:
  """Least padded timesteps over every way to cut the distinct lengths into <= K buckets."""
  values = np.unique(lengths)
  best = None
  for used in range(1, min(num_buckets, values.size) + 1):
    for cuts in itertools.combinations(range(values.size - 1), used - 1):
      bounds = np.append(values[list(cuts)], values[-1])
      cost = boundaries.padded_timesteps(lengths, bounds)
      best = cost if best is None else min(best, cost)
  return best


def assert_valid_bounds(lengths: np.ndarray, bounds: np.ndarray) -> None:
  assert bounds.dtype == np.int64
  assert np.all(np.diff(bounds) > 0), bounds
  assert bounds[-1] == lengths.max()


@settings(max_examples=300, deadline=None)
@given(lengths=small_lengths, num_buckets=st.integers(1, 6))
def test_optimal_equals_brute_force(lengths, num_buckets):
  bounds = boundaries.optimal_bounds(lengths, num_buckets)
  assert_valid_bounds(lengths, bounds)
  assert len(bounds) <= num_buckets
  assert boundaries.padded_timesteps(lengths, bounds) == brute_force_cost(lengths, num_buckets)


@settings(max_examples=200, deadline=None)
@given(
  lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=300).map(np.array),
  num_buckets=st.integers(1, 12),
)
def test_optimal_never_worse_than_heuristics_and_monotone_in_k(lengths, num_buckets):
  optimal = boundaries.padded_timesteps(lengths, boundaries.optimal_bounds(lengths, num_buckets))
  for heuristic in (boundaries.uniform_bounds, boundaries.quantile_bounds):
    bounds = heuristic(lengths, num_buckets)
    assert_valid_bounds(lengths, bounds)
    assert len(bounds) <= num_buckets
    assert optimal <= boundaries.padded_timesteps(lengths, bounds)
  more = boundaries.optimal_bounds(lengths, num_buckets + 1)
  assert boundaries.padded_timesteps(lengths, more) <= optimal


@settings(max_examples=50, deadline=None)
@given(
  lengths=st.lists(st.integers(1, 500), min_size=1, max_size=200).map(np.array),
  max_buckets=st.integers(1, 10),
)
def test_per_count_solutions_match_single_solves(lengths, max_buckets):
  solutions = boundaries.optimal_bounds_per_count(lengths, max_buckets)
  assert len(solutions) == min(max_buckets, np.unique(lengths).size)
  for num, bounds in enumerate(solutions, start=1):
    single = boundaries.optimal_bounds(lengths, num)
    assert boundaries.padded_timesteps(lengths, bounds) == boundaries.padded_timesteps(
      lengths, single
    )


def test_enough_buckets_remove_all_padding():
  lengths = np.array([5, 3, 3, 9, 5, 1])
  bounds = boundaries.optimal_bounds(lengths, 10)
  np.testing.assert_array_equal(bounds, [1, 3, 5, 9])
  assert boundaries.padded_timesteps(lengths, bounds) == lengths.sum()


def test_optimal_on_large_corpus_is_exact_against_a_plain_dp():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 400, 20_000)
  values, counts = np.unique(lengths, return_counts=True)
  cumulative = np.concatenate([[0], np.cumsum(counts)])
  # O(K m^2) reference dynamic programme.
  cost = cumulative * np.concatenate([[0], values])
  for _ in range(7):
    new = cost.copy()
    for end in range(1, values.size + 1):
      starts = np.arange(end)
      new[end] = np.min(cost[starts] + (cumulative[end] - cumulative[starts]) * values[end - 1])
    cost = new
  bounds = boundaries.optimal_bounds(lengths, 8)
  assert boundaries.padded_timesteps(lengths, bounds) == cost[-1]


def test_none_is_one_bucket_at_the_maximum():
  np.testing.assert_array_equal(boundaries.none_bounds(np.array([4, 9, 2])), [9])


def test_uniform_ranges_have_equal_width():
  lengths = np.arange(1, 101)
  np.testing.assert_array_equal(boundaries.uniform_bounds(lengths, 4), [25, 50, 75, 100])


def test_uniform_drops_empty_ranges_and_tightens_bounds():
  lengths = np.array([1, 2, 3, 97, 100])
  np.testing.assert_array_equal(boundaries.uniform_bounds(lengths, 4), [3, 100])


@settings(max_examples=100, deadline=None)
@given(lengths=small_lengths)
def test_more_buckets_than_lengths_give_what_one_per_length_gives_at_once(lengths):
  # A billion buckets must neither hang nor take memory per bucket (a list, a linspace).
  enough = int(max(lengths.max(), lengths.size))  # a range per length, or per sequence
  strategies = (boundaries.uniform_bounds, boundaries.quantile_bounds, boundaries.optimal_bounds)
  for strategy in strategies:
    np.testing.assert_array_equal(strategy(lengths, 10**9), strategy(lengths, enough))
  assert len(boundaries.optimal_bounds_per_count(lengths, 10**9)) == np.unique(lengths).size


def test_quantile_gives_equal_counts_on_distinct_lengths():
  lengths = np.random.default_rng(1).permutation(np.arange(10, 110))
  bounds = boundaries.quantile_bounds(lengths, 4)
  counts = np.bincount(np.searchsorted(bounds, lengths))
  np.testing.assert_array_equal(counts, [25, 25, 25, 25])


@settings(max_examples=100, deadline=None)
@given(lengths=small_lengths, num_buckets=st.integers(1, 5), multiple=st.integers(1, 8))
def test_rounded_lengths_give_the_exact_optimum_among_multiples(lengths, num_buckets, multiple):
  rounded = boundaries.round_up(lengths, multiple)
  bounds = boundaries.optimal_bounds(rounded, num_buckets)
  assert np.all(bounds % multiple == 0)
  assert boundaries.padded_timesteps(lengths, bounds) == brute_force_cost(rounded, num_buckets)


def test_fixed_bounds_are_validated():
  np.testing.assert_array_equal(boundaries.fixed_bounds([8, 16, 32]), [8, 16, 32])
  for bad in ([], [16, 8], [8, 8], [0, 4], [1.5, 3], [8, boundaries.MAX_LENGTH + 1]):
    with pytest.raises(ValueError, match="fixed bounds"):
      boundaries.fixed_bounds(bad)


def test_a_fixed_bound_at_the_longest_allowed_length_is_taken():
  # A corpus may hold a sequence of MAX_LENGTH, so a bound of MAX_LENGTH must cover it.
  longest = boundaries.MAX_LENGTH
  np.testing.assert_array_equal(boundaries.fixed_bounds([8, longest]), [8, longest])


@pytest.mark.parametrize(
  ("lengths", "message"),
  [
    ([], "non-empty"),
    ([3, 0], "positive"),
    ([3, -2], "positive"),
    ([1.5], "integers"),
    ([[1, 2]], "1-D"),
    # Past MAX_LENGTH, the checks come before the int64 cast would wrap them negative.
    ([3, 2**31], "at most 2,147,483,647, got 2147483648 at index 1"),
    (np.array([1, 2**63 + 5], np.uint64), "at most 2,147,483,647, got 9223372036854775813"),
    ([1.0, 1e19], "at most 2,147,483,647, got 1e\\+19 at index 1"),
  ],
)
def test_bad_lengths_are_rejected(lengths, message):
  with pytest.raises(ValueError, match=message):
    boundaries.validate_lengths(lengths)


def test_the_longest_allowed_length_is_taken():
  longest = np.array([1, boundaries.MAX_LENGTH], np.int32)
  np.testing.assert_array_equal(boundaries.validate_lengths(longest), longest)
  assert boundaries.validate_lengths(longest).dtype == np.int64


@pytest.mark.parametrize("num_buckets", [0, -1, 2.5])
def test_bad_bucket_counts_are_rejected(num_buckets):
  with pytest.raises(ValueError, match="number of buckets"):
    boundaries.optimal_bounds(np.array([1, 2, 3]), num_buckets)


def test_quantile_bucket_b_ends_at_the_ceil_of_b_plus_1_over_k_th_sequence():
  # 10 sequences in 3 buckets: they end at sequences ceil(10/3) = 4, ceil(20/3) = 7 and 10.
  np.testing.assert_array_equal(boundaries.quantile_bounds(np.arange(1, 11), 3), [4, 7, 10])


def test_optimal_ties_go_to_the_longer_last_bucket():
  # Both [1, 3] and [2, 3] pad one each of 1, 2, 3 to 7 timesteps; the leftmost start wins.
  np.testing.assert_array_equal(boundaries.optimal_bounds(np.array([1, 2, 3]), 2), [1, 3])


def test_quantile_with_more_buckets_than_distinct_lengths_still_cuts_at_sequence_quantiles():
  # 6 sequences in 5 buckets end at sequences ceil(6k/5) = 2, 3, 4, 5, 6 of 1, 1, 1, 1, 2, 3: at
  # lengths 1, 1, 1, 2, 3, so 3 buckets. Taking K down to the 3 distinct lengths first would cut
  # at sequences 2, 4, 6 instead, lengths 1, 1, 3, and merge 2 into the bucket of 3.
  lengths = np.array([3, 1, 1, 2, 1, 1])
  np.testing.assert_array_equal(boundaries.quantile_bounds(lengths, 5), [1, 2, 3])
