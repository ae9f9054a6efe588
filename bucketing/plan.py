"""A bucket plan: bounds, batch sizes and each sequence's bucket, with the report users read."""

import dataclasses
import functools
import numbers
from collections.abc import Sequence

import numpy as np

from bucketing import boundaries, cost

OVERFLOW_POLICIES = ("error", "drop", "truncate")


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """Where every sequence of a corpus goes, and the static batch shape of each bucket.

  Per-example reductions (bucket sizes, dropped and truncated sequences) are computed once: the
  trainer's input pipeline consults them for every batch.

  Attributes:
    strategy: the boundary strategy that made `upper_bounds`.
    upper_bounds: [num_buckets] inclusive length bound of each bucket, ascending.
    batch_sizes: [num_buckets] global batch size of each bucket (a multiple of `num_devices`).
    bucket_of_example: [num_examples] bucket index of each sequence; -1 for a dropped one.
    lengths: [num_examples] the sequences' own lengths, before any truncation.
    label_upper_bounds: [num_buckets] static label width of each bucket, when label lengths were
      given (the longest label in the bucket; 1 in a bucket that holds none), else None.
    num_devices: the global device count batch sizes are divisible by.
    batch_size, max_tokens: the batch-size rule (one of them is set), see `cost.batch_sizes`.
    round_to: bounds are multiples of this; the `none` baseline of the report is rounded alike.
    example_ids: names of the sequences for messages and reports (default: their indices).
    auto: what `auto` weighed, when that strategy made the plan.
  """

  strategy: str
  upper_bounds: np.ndarray
  batch_sizes: np.ndarray
  bucket_of_example: np.ndarray
  lengths: np.ndarray
  label_upper_bounds: np.ndarray | None
  num_devices: int
  batch_size: int | None
  max_tokens: int | None
  round_to: int = 1
  example_ids: Sequence[str] | None = None
  auto: cost.AutoChoice | None = None

  @property
  def num_buckets(self) -> int:
    return len(self.upper_bounds)

  @functools.cached_property
  def bucket_sizes(self) -> np.ndarray:
    kept = self.bucket_of_example[self.bucket_of_example >= 0]
    return np.bincount(kept, minlength=self.num_buckets)

  @property
  def steps_per_epoch(self) -> np.ndarray:
    return -(-self.bucket_sizes // self.batch_sizes)

  @property
  def num_steps(self) -> int:
    """Global steps in one epoch."""
    return int(self.steps_per_epoch.sum())

  @property
  def filler_rows(self) -> np.ndarray:
    return self.steps_per_epoch * self.batch_sizes - self.bucket_sizes

  @property
  def effective_lengths(self) -> np.ndarray:
    """Lengths as the model sees them: truncated to the last bound, 0 for dropped sequences."""
    clipped = np.minimum(self.lengths, self.upper_bounds[-1])
    return np.where(self.bucket_of_example >= 0, clipped, 0)

  @functools.cached_property
  def dropped(self) -> np.ndarray:
    return np.flatnonzero(self.bucket_of_example < 0)

  @functools.cached_property
  def truncated(self) -> np.ndarray:
    return np.flatnonzero((self.bucket_of_example >= 0) & (self.lengths > self.upper_bounds[-1]))

  def members(self, bucket: int) -> np.ndarray:
    """Indices of the sequences in `bucket`, ascending."""
    return np.flatnonzero(self.bucket_of_example == bucket)

  def example_name(self, index: int) -> str:
    return str(self.example_ids[index]) if self.example_ids is not None else f"#{index}"

  def for_sequences(
    self, lengths: np.ndarray, example_ids: Sequence[str] | None = None
  ) -> "BucketPlan":
    """These buckets (bounds, batch sizes, label widths) for other sequences, each in the first
    bucket that holds it: plans of one set of shapes, so of one set of compiled steps, for
    several splits. Their labels must fit the label widths; a sequence longer than the last
    bound is an error."""
    lengths = np.asarray(lengths)
    if lengths.size and lengths.max() > self.upper_bounds[-1]:
      longest = int(np.argmax(lengths))
      name = f"#{longest}" if example_ids is None else str(example_ids[longest])
      raise ValueError(
        f"sequence {name} of length {lengths[longest]} is longer than the last bound "
        f"{self.upper_bounds[-1]}"
      )
    return dataclasses.replace(
      self,
      bucket_of_example=np.searchsorted(self.upper_bounds, lengths, side="left"),
      lengths=lengths,
      example_ids=example_ids,
    )

  def summary(self, cost_model: cost.CostModel | None = cost.CostModel()) -> dict:
    """The plan report as plain Python values (what `python -m bucketing plan --json` prints);
    without a `cost_model` it predicts no speed-up (`predicted_speedup` and `cost_model` None)."""
    kept = self.bucket_of_example >= 0
    effective = self.effective_lengths
    real_per_bucket = np.zeros(self.num_buckets, np.int64)  # exact sums (bincount's are floats)
    np.add.at(real_per_bucket, self.bucket_of_example[kept], effective[kept])
    padded_per_bucket = self.bucket_sizes * self.upper_bounds
    filler_per_bucket = self.filler_rows * self.upper_bounds
    real, padded = int(real_per_bucket.sum()), int(padded_per_bucket.sum())
    with_filler = padded + int(filler_per_bucket.sum())

    # The baseline: the same sequences, one bucket at the longest, same batch-size rule.
    baseline_bound = boundaries.round_up(np.array([effective.max()]), self.round_to)
    baseline_size = np.array([kept.sum()], np.int64)
    baseline_batch = cost.batch_sizes(
      baseline_bound,
      baseline_size,
      batch_size=self.batch_size,
      max_tokens=self.max_tokens,
      num_devices=self.num_devices,
    )
    baseline_steps = -(-baseline_size // baseline_batch)
    baseline_padded = int((baseline_steps * baseline_batch * baseline_bound).sum())
    predicted = None
    if cost_model is not None:
      epoch_seconds = (
        cost.run_seconds(cost_model, self.upper_bounds, self.bucket_sizes, self.batch_sizes)
        - cost_model.kappa * self.num_buckets
      )
      baseline_seconds = (
        cost.run_seconds(cost_model, baseline_bound, baseline_size, baseline_batch)
        - cost_model.kappa
      )
      # A model that costs nothing per step (alpha = gamma = beta = 0) predicts nothing.
      predicted = baseline_seconds / epoch_seconds if epoch_seconds > 0 else None

    buckets = [
      {
        "upper_bound": int(self.upper_bounds[b]),
        "label_upper_bound": (
          None if self.label_upper_bounds is None else int(self.label_upper_bounds[b])
        ),
        "examples": int(self.bucket_sizes[b]),
        "batch_size": int(self.batch_sizes[b]),
        "steps_per_epoch": int(self.steps_per_epoch[b]),
        "real_timesteps": int(real_per_bucket[b]),
        "padded_timesteps": int(padded_per_bucket[b]),
        "filler_rows": int(self.filler_rows[b]),
      }
      for b in range(self.num_buckets)
    ]
    # A token budget gives each bucket at least one sequence per device, so a bucket whose
    # bound times that minimum exceeds the budget takes more tokens a step than it allows.
    tokens_per_step = self.batch_sizes * self.upper_bounds
    over_budget = (
      [] if self.max_tokens is None else np.flatnonzero(tokens_per_step > self.max_tokens).tolist()
    )
    return {
      "strategy": self.strategy,
      "num_buckets": self.num_buckets,
      "num_devices": self.num_devices,
      "num_examples": int(kept.sum()),
      "upper_bounds": self.upper_bounds.tolist(),
      "label_upper_bounds": (
        None if self.label_upper_bounds is None else self.label_upper_bounds.tolist()
      ),
      "bucket_sizes": self.bucket_sizes.tolist(),
      "batch_sizes": self.batch_sizes.tolist(),
      "steps_per_epoch": self.steps_per_epoch.tolist(),
      "filler_rows": self.filler_rows.tolist(),
      "max_tokens": self.max_tokens,
      "tokens_per_step": tokens_per_step.tolist(),
      "over_budget_buckets": over_budget,
      "real_timesteps": real,
      "padded_timesteps": padded,
      "padded_timesteps_with_filler": with_filler,
      "efficiency": real / padded,
      "efficiency_with_filler": real / with_filler,
      "ideal_speedup": baseline_padded / with_filler,
      "predicted_speedup": predicted,
      "cost_model": None if cost_model is None else dataclasses.asdict(cost_model),
      "dropped": [self.example_name(i) for i in self.dropped],
      "truncated": [self.example_name(i) for i in self.truncated],
      "auto_seconds_per_count": (
        None if self.auto is None else self.auto.seconds_per_count.tolist()
      ),
      "auto_bounds_minimise": None if self.auto is None else self.auto.bounds_minimise,
      "buckets": buckets,
    }


def format_report(summary: dict) -> str:
  """The plan as a fixed-width table, one row per bucket, then the totals."""
  header = ("bucket", "bound", "examples", "batch", "steps", "real steps", "padded", "filler rows")
  rows = [
    (
      str(b),
      str(bucket["upper_bound"]),
      str(bucket["examples"]),
      str(bucket["batch_size"]),
      str(bucket["steps_per_epoch"]),
      f"{bucket['real_timesteps']:,}",
      f"{bucket['padded_timesteps']:,}",
      str(bucket["filler_rows"]),
    )
    for b, bucket in enumerate(summary["buckets"])
  ]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  justify = lambda row: "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
  lines = [justify(row) for row in [header, *rows]]
  lines.insert(1, "  ".join("-" * width for width in widths))
  lines += [
    "",
    f"strategy {summary['strategy']}: {summary['num_buckets']} bucket(s), "
    f"{summary['num_examples']:,} sequences, {sum(summary['steps_per_epoch']):,} steps per epoch "
    f"on {summary['num_devices']} device(s)",
    f"real timesteps {summary['real_timesteps']:,}; padded {summary['padded_timesteps']:,} "
    f"({summary['padded_timesteps_with_filler']:,} with filler rows)",
    f"efficiency {summary['efficiency']:.1%} ({summary['efficiency_with_filler']:.1%} with filler)",
    f"speed-up against one bucket: ideal (padded timesteps) {summary['ideal_speedup']:.2f}x"
    + (
      ""
      if summary["predicted_speedup"] is None
      else f", predicted by the cost model {summary['predicted_speedup']:.2f}x"
    ),
  ]
  for b in summary["over_budget_buckets"]:
    lines.append(
      f"bucket {b} takes {summary['tokens_per_step'][b]:,} padded tokens a step, over max_tokens "
      f"{summary['max_tokens']:,}: its batch is the least it can be, one sequence per device"
    )
  if summary["auto_bounds_minimise"] == "padded timesteps":
    lines.append(
      f"auto chose K by modelled run time, but with over "
      f"{cost.MAX_DISTINCT_LENGTHS_FOR_RUN_TIME:,} distinct lengths each K's bounds are those of "
      "least padding; a round_to that leaves fewer padded lengths lets auto pick the fastest "
      "bounds"
    )
  if summary["dropped"]:
    lines.append(f"dropped {len(summary['dropped'])} sequence(s) over the largest bound")
  if summary["truncated"]:
    lines.append(f"truncated {len(summary['truncated'])} sequence(s) to the largest bound")
  return "\n".join(lines)


def check_upper_bounds(
  strategy: str, upper_bounds, names: tuple[str, str] = ("strategy", "upper_bounds")
) -> None:
  """Upper bounds are given with the `fixed` strategy, and only with it; the error calls them by
  `names` (the caller's: a flag or a config field)."""
  strategy_name, bounds_name = names
  if strategy == "fixed" and upper_bounds is None:
    raise ValueError(f"{strategy_name}='fixed' needs {bounds_name}")
  if strategy != "fixed" and upper_bounds is not None:
    raise ValueError(f"{bounds_name} are for {strategy_name}='fixed' only, not {strategy!r}")


def make_plan(
  lengths: Sequence[int] | np.ndarray,
  *,
  strategy: str = "optimal",
  num_buckets: int = 1,
  upper_bounds: Sequence[int] | None = None,
  batch_size: int | None = None,
  max_tokens: int | None = None,
  num_devices: int = 1,
  round_to: int = 1,
  overflow: str = "error",
  label_lengths: Sequence[int] | np.ndarray | None = None,
  example_ids: Sequence[str] | None = None,
  cost_model: cost.CostModel = cost.CostModel(),
  num_epochs: float = 1.0,
) -> BucketPlan:
  """Plans the buckets of a corpus.

  Args:
    lengths: [num_examples] positive sequence lengths.
    strategy: one of `boundaries.STRATEGIES`.
    num_buckets: K for `uniform`, `quantile` and `optimal`; the largest K `auto` considers.
    upper_bounds: the user's bounds, for `fixed` only.
    batch_size: sequences per global batch, or
    max_tokens: a padded-token budget per global batch (`B_b = max_tokens // L_b`).
    num_devices: global device count; batch sizes are multiples of it.
    round_to: bounds are multiples of this (e.g. 8). Strategies see lengths rounded up to it, so
      `optimal` stays exact among such bounds.
    overflow: what to do with a sequence longer than the last bound: `error`, `drop` or
      `truncate` (to the last bound). Dropped and truncated sequences are listed in the report.
    label_lengths: [num_examples] label lengths; gives each bucket a static label width.
    example_ids: names for messages and reports.
    cost_model: per-step, per-token and per-compile seconds, for `auto`.
    num_epochs: epochs the run is planned for, for `auto` (compiles are paid once).
  """
  lengths = boundaries.validate_lengths(lengths)
  if example_ids is not None and len(example_ids) != len(lengths):
    raise ValueError(f"{len(example_ids)} example ids for {len(lengths)} lengths")
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f"unknown overflow policy {overflow!r}; expected one of {OVERFLOW_POLICIES}")
  if strategy not in boundaries.STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {boundaries.STRATEGIES}")
  check_upper_bounds(strategy, upper_bounds)
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  if not isinstance(num_buckets, numbers.Integral) or num_buckets < 1:
    raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
  if not (np.isfinite(num_epochs) and num_epochs > 0):
    raise ValueError(f"num_epochs must be a finite number > 0, got {num_epochs}")

  rounded = boundaries.round_up(lengths, round_to)
  auto = None
  if strategy == "none":
    bounds = boundaries.none_bounds(rounded)
  elif strategy == "uniform":
    bounds = boundaries.uniform_bounds(rounded, num_buckets)
  elif strategy == "quantile":
    bounds = boundaries.quantile_bounds(rounded, num_buckets)
  elif strategy == "optimal":
    bounds = boundaries.optimal_bounds(rounded, num_buckets)
  elif strategy == "auto":
    auto = cost.choose_num_buckets(
      rounded,
      num_buckets,
      cost_model=cost_model,
      num_epochs=num_epochs,
      batch_size=batch_size,
      max_tokens=max_tokens,
      num_devices=num_devices,
    )
    bounds = auto.upper_bounds
  else:
    bounds = np.unique(boundaries.round_up(boundaries.fixed_bounds(upper_bounds), round_to))

  bucket_of_example = np.searchsorted(bounds, lengths, side="left")
  too_long = np.flatnonzero(bucket_of_example == len(bounds))
  if too_long.size:
    if overflow == "error":
      names = [example_ids[i] if example_ids is not None else f"#{i}" for i in too_long[:5]]
      shown = ", ".join(f"{n} (length {lengths[i]})" for n, i in zip(names, too_long, strict=False))
      more = f" and {too_long.size - 5} more" if too_long.size > 5 else ""
      raise ValueError(
        f"{too_long.size} sequence(s) longer than the largest bucket bound {bounds[-1]}: "
        f"{shown}{more}; use overflow='drop' or 'truncate' to allow it"
      )
    bucket_of_example[too_long] = -1 if overflow == "drop" else len(bounds) - 1
  kept = bucket_of_example >= 0
  if not kept.any():
    raise ValueError("every sequence was dropped: all are longer than the largest bound")

  sizes = np.bincount(bucket_of_example[kept], minlength=len(bounds))
  batch = cost.batch_sizes(
    bounds, sizes, batch_size=batch_size, max_tokens=max_tokens, num_devices=num_devices
  )
  # An epoch's padded timesteps (filler rows included) are summed in int64: counted exactly here.
  rows = -(-sizes // batch) * batch
  padded = sum(int(row) * int(bound) for row, bound in zip(rows, bounds, strict=True))
  if padded >= 2**63:
    raise ValueError(
      f"{len(bounds)} bucket(s) of batches of up to {int(batch.max()):,} rows pad an epoch to "
      f"{padded:,} timesteps, more than int64 counts: use fewer devices"
    )
  label_bounds = None
  if label_lengths is not None:
    label_lengths = np.asarray(label_lengths, np.int64)
    if label_lengths.shape != lengths.shape:
      raise ValueError(f"{label_lengths.size} label lengths for {lengths.size} lengths")
    label_bounds = np.ones(len(bounds), np.int64)
    np.maximum.at(label_bounds, bucket_of_example[kept], label_lengths[kept])
  return BucketPlan(
    strategy=strategy,
    upper_bounds=bounds,
    batch_sizes=batch,
    bucket_of_example=bucket_of_example,
    lengths=lengths,
    label_upper_bounds=label_bounds,
    num_devices=num_devices,
    batch_size=batch_size,
    max_tokens=max_tokens,
    round_to=round_to,
    example_ids=example_ids,
    auto=auto,
  )
