"""Run time of the exact `optimal` bucket bounds for growing corpora and bucket counts.

    python -m experiments.benchmark_optimal_bounds [--repeats 5] [--out FILE]

Prints a Markdown table (median wall time of `--repeats` solves, after one warm-up) and writes it
with the machine and date to `experiments/results/benchmark_optimal_bounds_<machine>.md`. For the
smallest distinct-length count it also times a plain O(K m^2) dynamic programme, the textbook
solution, for scale.
"""

import datetime
import pathlib
import statistics
import sys
import time

import numpy as np

import cli_errors
from bucketing import boundaries
from experiments import reporting

RESULTS = pathlib.Path(__file__).parent / "results"


def plain_dp_cost(lengths: np.ndarray, num_buckets: int) -> int:
  """Least padded timesteps by the O(K m^2) recurrence, vectorised over split points only."""
  values, counts = np.unique(lengths, return_counts=True)
  cumulative = np.concatenate([[0], np.cumsum(counts)])
  cost = cumulative * np.concatenate([[0], values])
  for _ in range(num_buckets - 1):
    new = cost.copy()
    for end in range(1, values.size + 1):
      starts = np.arange(end)
      new[end] = np.min(cost[starts] + (cumulative[end] - cumulative[starts]) * values[end - 1])
    cost = new
  return int(cost[-1])


def median_seconds(lengths: np.ndarray, num_buckets: int, repeats: int) -> float:
  boundaries.optimal_bounds(lengths, num_buckets)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    boundaries.optimal_bounds(lengths, num_buckets)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--out", type=pathlib.Path, default=RESULTS / "benchmark_optimal_bounds_cpu.md"
  )
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  rows = []
  for num_lengths in (10_000, 100_000, 1_000_000):
    for distinct in (1_000, 10_000):
      lengths = rng.integers(1, distinct + 1, num_lengths)
      for num_buckets in (8, 16, 64):
        seconds = median_seconds(lengths, num_buckets, args.repeats)
        plain = "-"
        if distinct == 1_000 and num_lengths == 10_000:
          expected = boundaries.padded_timesteps(
            lengths, boundaries.optimal_bounds(lengths, num_buckets)
          )
          start = time.perf_counter()
          assert plain_dp_cost(lengths, num_buckets) == expected
          plain = f"{time.perf_counter() - start:.3f}"
        rows.append((num_lengths, len(np.unique(lengths)), num_buckets, seconds, plain))
        print(rows[-1], flush=True)

  table = [
    "| lengths | distinct | K | optimal_bounds (s, median) | plain O(K m^2) DP (s, once) |",
    "| ---: | ---: | ---: | ---: | ---: |",
  ]
  table += [f"| {n:,} | {m:,} | {k} | {s:.3f} | {p} |" for n, m, k, s, p in rows]
  report = [
    "# Run time of the exact optimal bucket bounds",
    "",
    f"Machine: {reporting.machine_description()}; numpy {np.__version__};",
    f"{datetime.date.today().isoformat()}.",
    f"Command: `python -m experiments.benchmark_optimal_bounds --repeats {args.repeats}`.",
    "Lengths are uniform random integers in [1, distinct]. Median of the repeats after a",
    "warm-up; the plain DP is timed once and checked to reach the same optimum.",
    "",
    *table,
    "",
  ]
  reporting.write_report(args.out, report, echo=True)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
