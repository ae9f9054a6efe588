"""`python -m bucketing plan`: plan the buckets of a file of sequence lengths and report them.

Bad input ends with one line naming the file (and line) and exit code 2; `BUCKETED_RNN_DEBUG=1`
shows the traceback.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Callable

import numpy as np

import cli_errors
from bucketing import boundaries, cost
from bucketing.plan import (
  OVERFLOW_POLICIES,
  BucketPlan,
  check_upper_bounds,
  format_report,
  make_plan,
)


def read_lengths(path: pathlib.Path) -> np.ndarray:
  """One integer per line (blank lines ignored), or a 1-D `.npy` array.

  A bad value in a text file is named by its 1-based line number (`file:line`, as editors count),
  one in a `.npy` array by its index.
  """
  cli_errors.input_file(path, str(path), "a file of lengths (one per line, or .npy)")
  if path.suffix == ".npy":
    try:
      values = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's own words invite loading pickles, which we never do
      raise ValueError(f"{path}: not a numpy array file (.npy) of integer lengths") from None
    if values.ndim != 1:
      raise ValueError(f"{path}: expected a 1-D array of lengths, got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"{path}: expected integer lengths, got dtype {values.dtype}")
  else:
    try:
      text = path.read_text()
    except UnicodeDecodeError as error:
      raise ValueError(
        f"{path}: not a text file of lengths ({error}); a numpy array file needs the .npy suffix"
      ) from None
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        value = int(line)
      except ValueError:
        raise ValueError(f"{path}:{number}: {line.strip()!r} is not an integer length") from None
      if value < 1:
        raise ValueError(f"{path}:{number}: {value} is not a positive length")
      if value > boundaries.MAX_LENGTH:  # here, named by its line, before int64 cannot hold it
        raise ValueError(
          f"{path}:{number}: {value} is longer than the longest length allowed, "
          f"{boundaries.MAX_LENGTH:,}"
        )
      values.append(value)
    values = np.array(values, np.int64)
  if values.size == 0:
    raise ValueError(f"{path}: holds no lengths")
  try:
    return boundaries.validate_lengths(values)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from None


def count_up_to(largest: int) -> Callable[[str], int]:
  """An argparse type for a count of 1..`largest`: a larger one would wrap the plan's int64 sums
  (or not fit int64 at all), so it is named with its flag."""

  def count(text: str) -> int:
    value = cli_errors.positive_int(text)
    if value > largest:
      raise argparse.ArgumentTypeError(f"must be <= {largest:,}, got {value}")
    return value

  return count


def check_rounding(lengths: np.ndarray, round_to: int, path: pathlib.Path) -> None:
  """The longest length rounded up to `round_to` is a bound, so it must be a length too."""
  longest = int(lengths.max())
  rounded = int(boundaries.round_up(longest, round_to))
  if rounded > boundaries.MAX_LENGTH:
    raise ValueError(
      f"--round-to {round_to}: rounds the longest length of {path}, {longest:,}, up to "
      f"{rounded:,}, longer than the longest length allowed, {boundaries.MAX_LENGTH:,}"
    )


def plot_plan(plan: BucketPlan, path: pathlib.Path) -> None:
  """The length histogram with the bucket bounds drawn over it."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  figure, axis = plt.subplots(figsize=(8, 3.5))
  axis.hist(plan.lengths, bins=min(100, len(np.unique(plan.lengths))), color="0.6")
  for bound in plan.upper_bounds:
    axis.axvline(bound, color="tab:red", linewidth=1)
  summary = plan.summary()
  axis.set_title(
    f"{plan.strategy}, {plan.num_buckets} bucket(s): efficiency {summary['efficiency']:.1%}"
  )
  axis.set_xlabel("sequence length")
  axis.set_ylabel("sequences")
  figure.tight_layout()
  try:
    figure.savefig(path, dpi=120)
  finally:
    plt.close(figure)


# The cost model's terms, as the report names them.
COST_TERMS = {
  "alpha": "s a step",
  "gamma": "s a padded timestep",
  "beta": "s a padded token",
  "kappa": "s a compile",
}


def main(argv: list[str] | None = None) -> int:
  parser = cli_errors.ArgumentParser(prog="python -m bucketing", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  plan = commands.add_parser("plan", help="plan buckets for a file of lengths")
  plan.add_argument(
    "--lengths", type=pathlib.Path, required=True, help="one length per line, or .npy"
  )
  plan.add_argument("--strategy", choices=boundaries.STRATEGIES, default="optimal")
  count = cli_errors.positive_int
  # Bounds and devices multiply the plan's sums; a batch size or token budget only caps a batch.
  length_count = count_up_to(boundaries.MAX_LENGTH)
  int64_count = count_up_to(int(np.iinfo(np.int64).max))
  plan.add_argument(
    "--num-buckets", type=count, help="K (the largest K for auto; not for fixed): 8 by default"
  )
  plan.add_argument(
    "--bounds", type=cli_errors.int_list, help="comma-separated upper bounds, for --strategy fixed"
  )
  sizing = plan.add_mutually_exclusive_group()
  sizing.add_argument(
    "--batch-size", type=int64_count, help="sequences per global batch: 32 by default"
  )
  sizing.add_argument("--max-tokens", type=int64_count, help="padded-token budget per global batch")
  plan.add_argument(
    "--devices", type=length_count, default=1, help="batch sizes are multiples of this: %(default)s"
  )
  plan.add_argument(
    "--round-to",
    type=length_count,
    default=1,
    help="bounds are multiples of this: %(default)s (the trainer's: 8)",
  )
  plan.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="error")
  # The cost model's defaults are placeholders; the trainer measures its own before planning.
  for name, unit in COST_TERMS.items():
    placeholder = getattr(cost.CostModel, name)
    plan.add_argument(f"--{name}", type=float, help=f"{unit}; a placeholder {placeholder} if unset")
  plan.add_argument(
    "--epochs",
    type=cli_errors.positive_float,
    default=20,
    help="planned epochs, for auto: %(default)s",
  )
  plan.add_argument("--json", action="store_true", help="print one JSON object")
  plan.add_argument(
    "--plot",
    metavar="FILE",
    help="write the length histogram with bounds to this PNG (.png added if no suffix)",
  )
  args = parser.parse_args(argv)

  check_upper_bounds(args.strategy, args.bounds, ("--strategy", "--bounds"))
  if args.num_buckets is not None and args.strategy in ("fixed", "none"):
    plan.error(f"--num-buckets is not for --strategy {args.strategy}, which sets its own bounds")
  if args.bounds is not None:
    try:
      boundaries.fixed_bounds(args.bounds)
    except ValueError as error:
      plan.error(f"--bounds: {error}")
  given = {name: getattr(args, name) for name in COST_TERMS if getattr(args, name) is not None}
  for name, value in given.items():  # one at a time, so that the error names its flag
    try:
      cost.CostModel(**{name: value})
    except ValueError as error:
      plan.error(f"--{name}: {error}")
  cost_model = cost.CostModel(**given)
  plot = cli_errors.figure_file("--plot", args.plot) if args.plot is not None else None
  lengths = read_lengths(args.lengths)
  check_rounding(lengths, args.round_to, args.lengths)
  result = make_plan(
    lengths,
    strategy=args.strategy,
    num_buckets=8 if args.num_buckets is None else args.num_buckets,
    upper_bounds=args.bounds,
    batch_size=32 if args.batch_size is None and args.max_tokens is None else args.batch_size,
    max_tokens=args.max_tokens,
    num_devices=args.devices,
    round_to=args.round_to,
    overflow=args.overflow,
    cost_model=cost_model,
    num_epochs=args.epochs,
  )
  summary = result.summary(cost_model)
  if plot is not None:
    with cli_errors.naming_write_errors("--plot", plot):
      plot_plan(result, plot)
  if args.json:
    print(json.dumps(summary))
  else:
    print(format_report(summary))
    _print_placeholders(cost_model, given)
  if plot is not None:  # after the report: the file may not be the name typed (".png" added)
    print(f"wrote {plot}", file=sys.stderr if args.json else sys.stdout)
  return 0


def _print_placeholders(cost_model: cost.CostModel, given: dict[str, float]) -> None:
  """Say which cost figures of the report are placeholders, not measured or given."""
  placeholders = [
    f"{name} {getattr(cost_model, name):g} {unit}"
    for name, unit in COST_TERMS.items()
    if name not in given
  ]
  if placeholders:
    print(
      f"placeholder cost figures ({', '.join(placeholders)}): give measured ones with "
      "--alpha/--gamma/--beta/--kappa (the trainer measures its own, README: Bucketing)"
    )


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
