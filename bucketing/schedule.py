"""The epoch schedule: which sequences form each global batch, as a pure function of (seed, epoch).

Inside each bucket the sequences are shuffled and cut into batches of the bucket's size; the last,
partial batch is completed with filler rows (index -1, weight 0). Then the batches of all buckets
are shuffled together, so consecutive steps come from different buckets and the loss does not
saw-tooth by length. Because nothing but (seed, epoch) drives the shuffle, any process can
recompute any step: a resumed run and every host of a multi-host run see the same global schedule,
and each process takes its own contiguous slice of every global batch.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from bucketing.plan import BucketPlan

FILLER = -1


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
  """One step of the schedule.

  Attributes:
    epoch, step: position in the run; `step` counts from 0 within the epoch.
    bucket: index into the plan's buckets (fixes the batch's static shape).
    indices: [rows] example indices of this process's slice; FILLER marks a filler row.
  """

  epoch: int
  step: int
  bucket: int
  indices: np.ndarray


def epoch_batches(plan: BucketPlan, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
  """The global batches of one epoch, in order: (bucket, [batch_size] example indices)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
  batches = []
  for bucket in range(plan.num_buckets):
    members = rng.permutation(plan.members(bucket))
    size = int(plan.batch_sizes[bucket])
    padded = np.full(-(-members.size // size) * size, FILLER, np.int64)
    padded[: members.size] = members
    batches += [(bucket, rows) for rows in padded.reshape(-1, size)]
  order = rng.permutation(len(batches))
  return [batches[i] for i in order]


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous share of a global batch."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  if indices.size % process_count:
    raise ValueError(
      f"a batch of {indices.size} rows does not split over {process_count} processes"
    )
  share = indices.size // process_count
  return indices[process_index * share : (process_index + 1) * share]


def iterate(
  plan: BucketPlan,
  seed: int,
  *,
  start_epoch: int = 0,
  start_step: int = 0,
  num_epochs: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[ScheduledBatch]:
  """Yields the schedule from (start_epoch, start_step) on, exactly as an unbroken run would.

  Stops after epoch `num_epochs - 1`, or never when `num_epochs` is None.
  """
  if not 0 <= start_step <= plan.num_steps:
    raise ValueError(f"start_step {start_step} is outside an epoch of {plan.num_steps} steps")
  epoch, first_step = start_epoch, start_step
  while num_epochs is None or epoch < num_epochs:
    batches = epoch_batches(plan, seed, epoch)
    for step in range(first_step, len(batches)):
      bucket, indices = batches[step]
      yield ScheduledBatch(
        epoch, step, bucket, process_slice(indices, process_index, process_count)
      )
    epoch, first_step = epoch + 1, 0
