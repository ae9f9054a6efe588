"""Length bucketing: boundaries, batch sizes, the epoch schedule and batch assembly (numpy only).

plan = bucketing.make_plan(lengths, strategy="optimal", num_buckets=8, batch_size=32)
for step in bucketing.iterate(plan, seed=0, num_epochs=1):
  batch = bucketing.assemble_batch(features, labels, step.indices, ...)
"""

from bucketing.batching import assemble_batch
from bucketing.boundaries import STRATEGIES, optimal_bounds, optimal_bounds_per_count
from bucketing.cost import (
  CostModel,
  batch_sizes,
  choose_num_buckets,
  fastest_bounds_per_count,
  fit_step_model,
)
from bucketing.plan import (
  OVERFLOW_POLICIES,
  BucketPlan,
  check_upper_bounds,
  format_report,
  make_plan,
)
from bucketing.schedule import FILLER, ScheduledBatch, epoch_batches, iterate, process_slice

__all__ = [
  "FILLER",
  "OVERFLOW_POLICIES",
  "STRATEGIES",
  "BucketPlan",
  "CostModel",
  "ScheduledBatch",
  "assemble_batch",
  "batch_sizes",
  "check_upper_bounds",
  "choose_num_buckets",
  "epoch_batches",
  "fastest_bounds_per_count",
  "fit_step_model",
  "format_report",
  "iterate",
  "make_plan",
  "optimal_bounds",
  "optimal_bounds_per_count",
  "process_slice",
]
