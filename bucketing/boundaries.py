"""Bucket boundaries: ascending inclusive upper bounds on sequence length.

Every strategy maps the lengths of a corpus to `upper_bounds`, a strictly increasing int64 array
whose last value covers the longest sequence (except `fixed`, which is the user's word). A sequence
of length `n` goes to the first bucket whose bound is `>= n` and is padded to that bound.

`optimal` is exact: it minimises the padded timesteps `sum_b n_b * L_b` by dynamic programming over
the distinct lengths. With `m` distinct lengths and `K` buckets the recurrence is

    cost_k(j) = min_{i < j} cost_{k-1}(i) + (count(j) - count(i)) * value(j),

where `count` is the cumulative number of sequences. The bucket cost satisfies the quadrangle
(Monge) inequality, so the best split point is monotone in `j` and each layer is solved by
divide and conquer in O(m log m); all of a recursion level's subproblems are evaluated at once with
numpy, so the whole optimum costs O(K m log m) arithmetic in O(K log m) vectorised passes.
"""

from collections.abc import Sequence

import numpy as np

STRATEGIES = ("none", "uniform", "quantile", "fixed", "optimal", "auto")

# The longest sequence, and the largest fixed bound, a plan takes: int32's largest, the dtype of
# the trainer's lengths, so no real length is refused. It keeps the planner's int64 sums exact:
# a bound is at most this rounded up to `round_to` (no more than this either), so below 2**32;
# padded timesteps and token budgets are bounds times rows (the sequences, plus under a batch of
# filler rows a bucket), so they reach 2**63 only past 2**31 rows: a billion sequences, or buckets
# times devices past that.
MAX_LENGTH = 2**31 - 1


def validate_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
  """Returns `lengths` as a 1-D int64 array; raises ValueError unless all are integers in
  1..`MAX_LENGTH` (checked before the cast, which would wrap a larger one silently)."""
  array = np.asarray(lengths)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.integer):
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
      raise ValueError(f"lengths must be integers, got dtype {array.dtype}")
    if np.any(array != np.round(array)):
      bad = int(np.flatnonzero(array != np.round(array))[0])
      raise ValueError(f"lengths must be integers, got {array[bad]} at index {bad}")
  for wrong, must in [(array < 1, "positive"), (array > MAX_LENGTH, f"at most {MAX_LENGTH:,}")]:
    if np.any(wrong):
      bad = int(np.flatnonzero(wrong)[0])
      raise ValueError(f"lengths must be {must}, got {array[bad]} at index {bad}")
  return array.astype(np.int64)


def round_up(values: np.ndarray, multiple: int) -> np.ndarray:
  """Rounds each value up to a multiple of `multiple` (1 leaves them unchanged)."""
  if multiple < 1:
    raise ValueError(f"round_to must be >= 1, got {multiple}")
  return -(-np.asarray(values, np.int64) // multiple) * multiple


def padded_timesteps(lengths: np.ndarray, upper_bounds: np.ndarray) -> int:
  """Sum over sequences of the bound of their bucket (sequences past the last bound excluded)."""
  lengths = np.asarray(lengths, np.int64)
  upper_bounds = np.asarray(upper_bounds, np.int64)
  bucket = np.searchsorted(upper_bounds, lengths, side="left")
  inside = bucket < upper_bounds.size
  return int(upper_bounds[bucket[inside]].sum())


def none_bounds(lengths: np.ndarray) -> np.ndarray:
  """The paper's baseline: one bucket, every batch padded to the longest sequence."""
  return np.array([lengths.max()], np.int64)


def uniform_bounds(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
  """Equal-width length ranges; each bucket is padded to the longest sequence inside its range.

  Ranges that hold no sequence are dropped, so fewer than `num_buckets` may come back.
  """
  check_num_buckets(num_buckets)
  low, high = int(lengths.min()), int(lengths.max())
  num_buckets = min(num_buckets, high - low + 1)  # one range per length already: more are alike
  edges = np.ceil(np.linspace(low - 1, high, num_buckets + 1)[1:]).astype(np.int64)
  edges[-1] = high
  return _tighten(lengths, np.unique(edges))


def quantile_bounds(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
  """Equal-count ranges: bucket b (from 0) ends at the length of the ceil((b + 1) N / K)-th
  shortest of the N sequences, so the last ends at the longest.

  Ties at a quantile keep equal lengths together, so counts are equal up to ties.
  """
  check_num_buckets(num_buckets)
  ordered = np.sort(lengths)
  num_buckets = min(num_buckets, ordered.size)  # one sequence per range already: more are alike
  ends = np.ceil(np.arange(1, num_buckets + 1) * ordered.size / num_buckets).astype(np.int64) - 1
  return np.unique(ordered[ends])


def fixed_bounds(upper_bounds: Sequence[int]) -> np.ndarray:
  """A user's list of bounds (tf.data style); must be positive and strictly increasing."""
  bounds = np.asarray(upper_bounds)
  if bounds.ndim != 1 or bounds.size == 0:
    raise ValueError("fixed bounds need a non-empty list of integers")
  if not np.issubdtype(bounds.dtype, np.integer):
    raise ValueError(f"fixed bounds must be integers, got {upper_bounds!r}")
  if np.any(bounds < 1) or np.any(np.diff(bounds) <= 0):
    raise ValueError(f"fixed bounds must be positive and strictly increasing, got {upper_bounds!r}")
  if np.any(bounds > MAX_LENGTH):
    raise ValueError(f"fixed bounds must be at most {MAX_LENGTH:,}, got {upper_bounds!r}")
  return bounds.astype(np.int64)


def optimal_bounds(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
  """The bounds of at most `num_buckets` buckets that minimise total padded timesteps, exactly."""
  return optimal_bounds_per_count(lengths, num_buckets)[-1]


def optimal_bounds_per_count(lengths: np.ndarray, max_buckets: int) -> list[np.ndarray]:
  """Exact optimal bounds for every bucket count 1..max_buckets, from one dynamic programme.

  Entry k-1 holds the optimum for k buckets. Once every distinct length has its own bucket more
  buckets cannot help, so the list stops there: it has min(max_buckets, distinct lengths) entries.
  """
  check_num_buckets(max_buckets)
  values, counts = np.unique(validate_lengths(lengths), return_counts=True)
  num_values = values.size
  cumulative = np.concatenate([[0], np.cumsum(counts)])
  layers = min(max_buckets, num_values)

  # cost[j]: least padded timesteps covering the j shortest distinct lengths, buckets so far.
  cost = cumulative * np.concatenate([[0], values])
  split_points = [np.zeros(num_values + 1, np.int64)]
  for _ in range(1, layers):
    cost, split = _next_layer(cost, cumulative, values)
    split_points.append(split)

  return bounds_from_split_points(values, split_points)


def bounds_from_split_points(
  values: np.ndarray, split_points: list[np.ndarray]
) -> list[np.ndarray]:
  """Each K's bounds, 1..len(split_points), traced back through a bucket programme's split points.

  `split_points[k][j]` is where the last of k+1 buckets covering the j smallest distinct
  `values` starts (0: it is the only one).
  """
  solutions = []
  for num in range(1, len(split_points) + 1):
    bounds, end = [], values.size
    for layer in range(num - 1, -1, -1):
      bounds.append(values[end - 1])
      end = split_points[layer][end]
      if end == 0:
        break
    solutions.append(np.array(bounds[::-1], np.int64))
  return solutions


def _next_layer(
  previous: np.ndarray, cumulative: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """One more bucket: min over the last bucket's start, by level-synchronous divide and conquer.

  Solves every end `j` in 1..m; the optimal start of `j` lies in [0, j-1] and is non-decreasing in
  `j` (Monge), so the midpoint of each open range of ends fixes the start range of both halves.
  Integer costs make ties exact; the leftmost start wins.
  """
  num_values = values.size
  cost = previous.copy()
  split = np.zeros(num_values + 1, np.int64)
  end_lo, end_hi = np.array([1]), np.array([num_values])
  start_lo, start_hi = np.array([0]), np.array([num_values - 1])
  while end_lo.size:
    mid = (end_lo + end_hi) // 2
    stop = np.minimum(start_hi, mid - 1)
    widths = stop - start_lo + 1
    segment_first = np.concatenate([[0], np.cumsum(widths)[:-1]])
    flat = np.arange(widths.sum())
    starts = flat - np.repeat(segment_first - start_lo, widths)
    ends = np.repeat(mid, widths)
    candidate = previous[starts] + (cumulative[ends] - cumulative[starts]) * values[ends - 1]
    best = np.minimum.reduceat(candidate, segment_first)
    is_best = candidate == np.repeat(best, widths)
    first_best = np.minimum.reduceat(np.where(is_best, flat, flat.size), segment_first)
    best_start = starts[first_best]
    cost[mid], split[mid] = best, best_start

    left = end_lo <= mid - 1
    right = mid + 1 <= end_hi
    end_lo = np.concatenate([end_lo[left], mid[right] + 1])
    end_hi = np.concatenate([mid[left] - 1, end_hi[right]])
    start_lo, start_hi = (
      np.concatenate([start_lo[left], best_start[right]]),
      np.concatenate([best_start[left], start_hi[right]]),
    )
  return cost, split


def _tighten(lengths: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Replaces each range's edge by the longest length inside it and drops empty ranges."""
  bucket = np.searchsorted(edges, lengths, side="left")
  longest = np.zeros(edges.size, np.int64)
  np.maximum.at(longest, bucket, lengths)
  return longest[longest > 0]


def check_num_buckets(num_buckets: int) -> None:
  if int(num_buckets) != num_buckets or num_buckets < 1:
    raise ValueError(f"the number of buckets must be an integer >= 1, got {num_buckets!r}")
