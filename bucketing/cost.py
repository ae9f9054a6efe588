"""Batch sizes per bucket and the step-time cost model that lets `auto` choose the bucket count.

A train step on a `[B, L]` batch is modelled as `alpha + beta * B * L` seconds (a fixed per-step
overhead plus a cost per padded token) and each bucket costs `kappa` seconds of compilation once.
For a run of `num_epochs` epochs:

    total = num_epochs * sum_b steps_b * (alpha + beta * B_b * L_b) + kappa * K,

with `steps_b = ceil(n_b / B_b)`: a partial batch costs a full step, as it does on the device.
"""

import dataclasses

import numpy as np

from bucketing import boundaries


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Seconds per step (`alpha`), per padded token (`beta`) and per compiled bucket (`kappa`).

  The defaults are placeholders of a plausible magnitude, not measurements: measure the figures
  of your model and machine (`python -m experiments.benchmark`) and pass them in.
  """

  alpha: float = 5e-3
  beta: float = 5e-7
  kappa: float = 10.0

  def __post_init__(self):
    for name in ("alpha", "beta", "kappa"):
      value = getattr(self, name)
      if not np.isfinite(value) or value < 0:
        raise ValueError(f"cost model {name} must be a finite number >= 0, got {value}")

  def step_seconds(self, batch_size: np.ndarray, upper_bound: np.ndarray) -> np.ndarray:
    return self.alpha + self.beta * np.asarray(batch_size) * np.asarray(upper_bound)


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
