"""Batch sizes per bucket and the step-time cost model that lets `auto` choose the bucket count.

A train step on a `[B, L]` batch is modelled as `alpha + gamma * L + beta * B * L` seconds: a
fixed per-step overhead, a cost per padded timestep that does not grow with the batch (a
recurrence runs its L steps one after another, each a few small kernels on a GPU: there the step
is mostly this term) and a cost per padded token. Each bucket costs `kappa` seconds of
compilation once. For a run of `num_epochs` epochs:

    total = num_epochs * sum_b steps_b * (alpha + gamma * L_b + beta * B_b * L_b) + kappa * K,

with `steps_b = ceil(n_b / B_b)`: a partial batch costs a full step, as it does on the device.
`auto` minimises it over K and, for each K, over the bounds at the corpus's lengths
(`fastest_bounds_per_count`): at a token budget, where `gamma` makes long buckets dearer per token,
and with partial batches, these are not quite `optimal`'s padding-minimal bounds.
`fit_step_model` fits alpha, gamma and beta to measured steps (the trainer measures them before
`auto` plans, see `train.measure_cost_model`).
"""

import dataclasses
import itertools

import numpy as np

from bucketing import boundaries


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Seconds per step (`alpha`), per padded timestep (`gamma`), per padded token (`beta`) and per
  compiled bucket (`kappa`).

  The defaults are placeholders of a plausible magnitude, not measurements: the trainer measures
  its own (`train.measure_cost_model`) unless the config gives them; `python -m
  experiments.benchmark` fits them on a grid of steps and sets the epochs they predict beside
  the measured ones.
  """

  alpha: float = 5e-3
  beta: float = 5e-7
  kappa: float = 10.0
  gamma: float = 0.0

  def __post_init__(self):
    for name in ("alpha", "beta", "kappa", "gamma"):
      value = getattr(self, name)
      if not np.isfinite(value) or value < 0:
        raise ValueError(f"cost model {name} must be a finite number >= 0, got {value}")

  def step_seconds(self, batch_size: np.ndarray, upper_bound: np.ndarray) -> np.ndarray:
    batch_size, upper_bound = np.asarray(batch_size), np.asarray(upper_bound)
    return self.alpha + self.gamma * upper_bound + self.beta * batch_size * upper_bound


def fit_step_model(
  batch_sizes: np.ndarray, lengths: np.ndarray, seconds: np.ndarray
) -> tuple[float, float, float]:
  """`(alpha, gamma, beta)` >= 0 minimising the squared error of `CostModel.step_seconds` over
  measured steps of `[batch_sizes[i], lengths[i]]` batches that took `seconds[i]`.

  Exact non-negative least squares over every subset of the terms: noisy timings can make the
  unconstrained fit negative, which no cost can be. Steps of one batch size B cannot tell the
  cost per token from the cost per timestep: beta is then 0 and gamma holds `gamma + beta * B`,
  which predicts the same for that batch size. Needs two lengths, and for beta a third step at
  another batch size, such that the terms are determined.
  """
  batch_sizes, lengths = np.asarray(batch_sizes, np.float64), np.asarray(lengths, np.float64)
  seconds = np.asarray(seconds, np.float64)
  columns = [np.ones_like(lengths), lengths]
  if len(np.unique(batch_sizes)) > 1:
    columns.append(batch_sizes * lengths)
  design = np.stack(columns, axis=1)
  if np.linalg.matrix_rank(design) < design.shape[1]:
    steps = list(zip(batch_sizes.astype(int).tolist(), lengths.astype(int).tolist(), strict=True))
    raise ValueError(
      "fitting the step model needs steps at two lengths, and for beta a third at another batch "
      f"size, that determine it; got [batch, length] {steps}"
    )
  best, best_error = np.zeros(3), float(np.sum(seconds**2))
  for size in range(1, design.shape[1] + 1):
    for terms in itertools.combinations(range(design.shape[1]), size):
      coefficients, *_ = np.linalg.lstsq(design[:, terms], seconds, rcond=None)
      if np.any(coefficients < 0):
        continue
      error = float(np.sum((design[:, terms] @ coefficients - seconds) ** 2))
      if error < best_error:
        best, best_error = np.zeros(3), error
        best[list(terms)] = coefficients
  alpha, gamma, beta = (float(value) for value in best)
  return alpha, gamma, beta


def batch_sizes(
  upper_bounds: np.ndarray,
  bucket_sizes: np.ndarray,
  *,
  batch_size: int | None = None,
  max_tokens: int | None = None,
  num_devices: int = 1,
) -> np.ndarray:
  """Global batch size of each bucket: a fixed count, or a token budget `max_tokens // L_b`.

  Always a multiple of `num_devices` (rounded down, never below it), and never more than the
  bucket needs: a bucket of 10 sequences on 8 devices gets 16 rows, not a budget's 400, so filler
  rows are at most `num_devices - 1` per partial batch beyond the fixed size.
  """
  if (batch_size is None) == (max_tokens is None):
    raise ValueError("give exactly one of batch_size and max_tokens")
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  upper_bounds = np.asarray(upper_bounds, np.int64)
  if batch_size is not None:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sizes = np.full(upper_bounds.shape, batch_size, np.int64)
  else:
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes = max_tokens // upper_bounds
  sizes = np.maximum(sizes // num_devices * num_devices, num_devices)
  needed = -(-np.asarray(bucket_sizes, np.int64) // num_devices) * num_devices
  return np.minimum(sizes, np.maximum(needed, num_devices))


def bucket_sizes(lengths: np.ndarray, upper_bounds: np.ndarray) -> np.ndarray:
  """Number of sequences in each bucket (sequences past the last bound are not counted)."""
  bucket = np.searchsorted(upper_bounds, lengths, side="left")
  return np.bincount(bucket[bucket < len(upper_bounds)], minlength=len(upper_bounds))


def run_seconds(
  cost_model: CostModel,
  upper_bounds: np.ndarray,
  sizes: np.ndarray,
  batch: np.ndarray,
  num_epochs: float = 1.0,
) -> float:
  """Predicted seconds of a run: steps at their modelled time plus one compile per bucket."""
  steps = -(-np.asarray(sizes) // np.asarray(batch))
  per_epoch = float(np.sum(steps * cost_model.step_seconds(batch, upper_bounds)))
  return num_epochs * per_epoch + cost_model.kappa * len(upper_bounds)


# Above this many distinct lengths `auto` takes the padding-minimal bounds for each K: the exact
# run-time programme is O(K m^2), about 3 s for m = 4,096 and K = 16 on this 2-core CPU.
MAX_DISTINCT_LENGTHS_FOR_RUN_TIME = 4096
# Bucket costs the run-time programme holds at once (a few times this many bytes x 8).
COSTS_PER_CHUNK = 1 << 20


def fastest_bounds_per_count(
  lengths: np.ndarray,
  max_buckets: int,
  *,
  cost_model: CostModel,
  batch_size: int | None = None,
  max_tokens: int | None = None,
  num_devices: int = 1,
) -> list[np.ndarray]:
  """For every K in 1..max_buckets, the bounds of at most K buckets whose epoch takes the least
  modelled time, exactly, among bounds at the corpus's lengths. The list stops at one bucket per
  distinct length, as `boundaries.optimal_bounds_per_count`'s does.

  The dynamic programme of `boundaries.optimal_bounds_per_count`, with a bucket's cost its
  modelled seconds an epoch rather than its padded timesteps: `ceil(n / B) * step_seconds(B, L)`
  for a bucket of n sequences padded to L, B its batch as `batch_sizes` gives it. Partial
  batches and batches capped by a small bucket make this cost non-Monge, so each of the K layers
  looks at every start for every end: O(K m^2) for m distinct lengths, in column chunks that
  hold about `COSTS_PER_CHUNK` costs at once. Ties go to the earliest start.
  """
  boundaries.check_num_buckets(max_buckets)
  values, counts = np.unique(boundaries.validate_lengths(lengths), return_counts=True)
  num_values = values.size
  cumulative = np.concatenate([[0], np.cumsum(counts)])
  chunk = max(1, COSTS_PER_CHUNK // (num_values + 1))

  def epoch_seconds(end_lo: int, end_hi: int) -> np.ndarray:
    """[end_hi, end_hi - end_lo]: seconds of a bucket of distinct lengths start..end-1 (inf if
    empty), for every start below end_hi and every end in end_lo..end_hi-1."""
    ends, starts = np.arange(end_lo, end_hi), np.arange(end_hi)[:, None]
    sizes = np.maximum(cumulative[ends] - cumulative[starts], 0)
    bounds = values[ends - 1]
    batch = batch_sizes(
      bounds, sizes, batch_size=batch_size, max_tokens=max_tokens, num_devices=num_devices
    )
    seconds = -(-sizes // batch) * cost_model.step_seconds(batch, bounds)
    return np.where(starts < ends, seconds, np.inf)

  # best[j]: least seconds covering the j shortest distinct lengths with the buckets so far.
  best = np.zeros(num_values + 1)
  split_points = [np.zeros(num_values + 1, np.int64)]
  for layer in range(min(max_buckets, num_values)):
    previous, split = best.copy(), np.zeros(num_values + 1, np.int64)
    for end_lo in range(1, num_values + 1, chunk):
      end_hi = min(end_lo + chunk, num_values + 1)
      seconds = epoch_seconds(end_lo, end_hi)
      if layer == 0:
        best[end_lo:end_hi] = seconds[0]
        continue
      total = previous[:end_hi, None] + seconds
      start = np.argmin(total, axis=0)
      best[end_lo:end_hi] = total[start, np.arange(end_hi - end_lo)]
      split[end_lo:end_hi] = start
    if layer:
      split_points.append(split)
  return boundaries.bounds_from_split_points(values, split_points)


def plan_seconds(
  cost_model: CostModel,
  lengths: np.ndarray,
  upper_bounds: np.ndarray,
  num_epochs: float = 1.0,
  **sizing,
) -> float:
  """`run_seconds` of the plan these bounds make of `lengths`, batched by `sizing`
  (`batch_sizes`'s batch_size or max_tokens, and num_devices)."""
  sizes = bucket_sizes(lengths, upper_bounds)
  batch = batch_sizes(upper_bounds, sizes, **sizing)
  return run_seconds(cost_model, upper_bounds, sizes, batch, num_epochs)


@dataclasses.dataclass(frozen=True)
class AutoChoice:
  """What `auto` considered: the predicted run seconds for each bucket count, and its pick.

  `bounds_minimise` says what each K's bounds minimise: `"run time"`, or `"padded timesteps"`
  for corpora of more than `MAX_DISTINCT_LENGTHS_FOR_RUN_TIME` distinct lengths.
  """

  num_buckets: int
  upper_bounds: np.ndarray
  seconds_per_count: np.ndarray  # [min(max_buckets, distinct lengths)]; k-1 is for k buckets.
  bounds_minimise: str = "run time"


def choose_num_buckets(
  lengths: np.ndarray,
  max_buckets: int,
  *,
  cost_model: CostModel = CostModel(),
  num_epochs: float = 1.0,
  batch_size: int | None = None,
  max_tokens: int | None = None,
  num_devices: int = 1,
) -> AutoChoice:
  """Picks K in 1..max_buckets, and bounds for it, minimising the modelled run time.

  For each K the bounds are `fastest_bounds_per_count`'s, so the whole choice is exact under the
  cost model (bounds at the corpus's lengths); past `MAX_DISTINCT_LENGTHS_FOR_RUN_TIME` distinct
  lengths they are `optimal`'s padding-minimal ones and only the choice among K is exact. Ties go
  to the fewer buckets.
  """
  sizing = {"batch_size": batch_size, "max_tokens": max_tokens, "num_devices": num_devices}
  if np.unique(lengths).size <= MAX_DISTINCT_LENGTHS_FOR_RUN_TIME:
    minimise = "run time"
    candidates = fastest_bounds_per_count(lengths, max_buckets, cost_model=cost_model, **sizing)
  else:
    minimise = "padded timesteps"
    candidates = boundaries.optimal_bounds_per_count(lengths, max_buckets)
  seconds = np.array(
    [plan_seconds(cost_model, lengths, bounds, num_epochs, **sizing) for bounds in candidates]
  )
  best = int(np.argmin(seconds))
  return AutoChoice(len(candidates[best]), candidates[best], seconds, minimise)
