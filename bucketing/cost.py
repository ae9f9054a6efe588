"""Batch sizes per bucket and the step-time cost model that lets `auto` choose the bucket count.

A train step on a `[B, L]` batch is modelled as `alpha + gamma * L + beta * B * L` seconds: a
fixed per-step overhead, a cost per padded timestep that does not grow with the batch (a
recurrence runs its L steps one after another, each a few small kernels on a GPU: there the step
is mostly this term) and a cost per padded token. Each bucket costs `kappa` seconds of
compilation once. For a run of `num_epochs` epochs:

    total = num_epochs * sum_b steps_b * (alpha + gamma * L_b + beta * B_b * L_b) + kappa * K,

with `steps_b = ceil(n_b / B_b)`: a partial batch costs a full step, as it does on the device.
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


@dataclasses.dataclass(frozen=True)
class AutoChoice:
  """What `auto` considered: the predicted run seconds for each bucket count, and its pick."""

  num_buckets: int
  upper_bounds: np.ndarray
  seconds_per_count: np.ndarray  # [max_buckets]; entry k-1 is for k buckets.


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
  """Picks K in 1..max_buckets minimising the modelled run time of the optimal K-bucket plan.

  For each K the bounds are the exact minimisers of padded timesteps; the choice among K is exact
  for the given batch sizes. Ties go to the fewer buckets.
  """
  seconds, candidates = [], boundaries.optimal_bounds_per_count(lengths, max_buckets)
  for bounds in candidates:
    sizes = bucket_sizes(lengths, bounds)
    batch = batch_sizes(
      bounds, sizes, batch_size=batch_size, max_tokens=max_tokens, num_devices=num_devices
    )
    seconds.append(run_seconds(cost_model, bounds, sizes, batch, num_epochs))
  seconds = np.array(seconds)
  best = int(np.argmin(seconds))
  return AutoChoice(len(candidates[best]), candidates[best], seconds)
