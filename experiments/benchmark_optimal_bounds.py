"""Run time of the exact `optimal` bucket bounds for growing corpora and bucket counts, and
what `auto`'s run-time-optimal bounds save over them.

    python -m experiments.benchmark_optimal_bounds [--repeats 5] [--lengths FILE] [--out FILE]

Prints Markdown tables and writes them with the machine and date to
`experiments/results/benchmark_optimal_bounds_<machine>.md`:

- the median wall time of `--repeats` solves of `optimal_bounds`, after one warm-up; for the
  smallest distinct-length count also a plain O(K m^2) dynamic programme, the textbook solution,
  for scale;
- on the lengths of `--lengths` (one per line or `.npy`, as `python -m bucketing plan` reads
  them; uniform random ones without it), the modelled epoch seconds of `optimal`'s
  padding-minimal bounds against `auto`'s (`bucketing.cost.fastest_bounds_per_count`) for the
  same K, under three batch rules and a step cost model, with the time that solve took. The
  cost model is the one `auto` would fit (`bucketing.fit_step_model`) to the H200 step times of
  `experiments/iam.py`'s model on raw pen points in `benchmark_step_gpu.md` (the scan at unroll
  8), read from that file; `--alpha`, `--gamma`, `--beta` replace its figures.
"""

import dataclasses
import pathlib
import statistics
import sys
import textwrap
import time

import numpy as np

import cli_errors
from bucketing import boundaries, cost
from bucketing.__main__ import read_lengths
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


STEP_ANATOMY = RESULTS / "benchmark_step_gpu.md"
STEP_ANATOMY_TABLE = "## Anatomy of one train step (ms, medians)"
STEP_ANATOMY_ROWS = "scan unroll 8, optax CTC"
SIZINGS = {
  "32 sequences, 8 devices": {"batch_size": 32, "num_devices": 8},
  "16 sequences, 1 device": {"batch_size": 16, "num_devices": 1},
  "20,000 tokens, 8 devices": {"max_tokens": 20_000, "num_devices": 8},
}


def step_cost_on_the_gpu() -> tuple[dict[str, float], str]:
  """alpha, gamma and beta fitted to the committed H200 step anatomy, and a line saying so."""
  rows = reporting.read_markdown_table(STEP_ANATOMY.read_text(), STEP_ANATOMY_TABLE)
  rows = [row for row in rows if row["implementation"] == STEP_ANATOMY_ROWS]
  batches, lengths = [int(row["B"]) for row in rows], [int(row["T"]) for row in rows]
  alpha, gamma, beta = cost.fit_step_model(
    batches, lengths, [float(row["step"]) / 1000 for row in rows]
  )
  shapes = ", ".join(f"{b} x {t}" for b, t in zip(batches, lengths, strict=True))
  source = (
    f"fitted as `auto` fits them to the NVIDIA H200 steps of `iam.py`'s model ({STEP_ANATOMY_ROWS};"
    f" B x T {shapes}) in `{STEP_ANATOMY.name}`"
  )
  return {"alpha": alpha, "gamma": gamma, "beta": beta}, source


def auto_against_optimal(
  lengths: np.ndarray, cost_model: cost.CostModel, bucket_counts: tuple[int, ...]
) -> list[dict[str, str]]:
  """A row per batch rule and K: the modelled epoch of `optimal`'s bounds and of `auto`'s."""
  rows = []
  for name, sizing in SIZINGS.items():
    start = time.perf_counter()
    fastest = cost.fastest_bounds_per_count(
      lengths, max(bucket_counts), cost_model=cost_model, **sizing
    )
    solve_s = time.perf_counter() - start
    least_padding = boundaries.optimal_bounds_per_count(lengths, max(bucket_counts))
    no_compiles = dataclasses.replace(cost_model, kappa=0)  # one epoch's steps alone
    for num in bucket_counts:
      used = min(num, len(fastest))  # the lists stop at one bucket per distinct length
      padding_s = cost.plan_seconds(no_compiles, lengths, least_padding[used - 1], **sizing)
      time_s = cost.plan_seconds(no_compiles, lengths, fastest[used - 1], **sizing)
      rows.append(
        {
          "batch": name,
          "K": str(num),
          "optimal (s)": f"{padding_s:.2f}",
          "auto (s)": f"{time_s:.2f}",
          "saved": f"{1 - time_s / padding_s:.1%}",
          "auto's bounds": " ".join(str(bound) for bound in fastest[used - 1]),
          "solve (s)": f"{solve_s:.2f}",
        }
      )
  return rows


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=cli_errors.positive_int, default=5)
  parser.add_argument("--out", default=None)
  parser.add_argument(
    "--lengths", type=pathlib.Path, help="lengths for auto against optimal (one per line, .npy)"
  )
  parser.add_argument(
    "--alpha", type=float, help="seconds per step (default: fitted to the H200's steps)"
  )
  parser.add_argument("--gamma", type=float, help="seconds per padded timestep (default: fitted)")
  parser.add_argument("--beta", type=float, help="seconds per padded token (default: fitted)")
  args = parser.parse_args(argv)
  out = reporting.results_path(args.out, RESULTS / "benchmark_optimal_bounds_cpu.md")
  record = reporting.RunRecord(
    "experiments.benchmark_optimal_bounds", argv, reporting.versions(("numpy",))
  )
  fitted, cost_source = step_cost_on_the_gpu()
  given = {name: getattr(args, name) for name in ("alpha", "gamma", "beta")}
  alpha, gamma, beta = (
    fitted[n] if given[n] is None else given[n] for n in ("alpha", "gamma", "beta")
  )
  if any(value is not None for value in given.values()):
    cost_source += f"; {', '.join(n for n, v in given.items() if v is not None)} given"
  cost_model = cost.CostModel(alpha=alpha, gamma=gamma, beta=beta)
  rng = np.random.default_rng(0)
  if args.lengths is None:
    corpus, source = rng.integers(1, 1541, 5000), "5,000 uniform random lengths in [1, 1540]"
  else:
    corpus = read_lengths(args.lengths)
    source = f"the {corpus.size:,} lengths of `{args.lengths}`"
  comparison = auto_against_optimal(corpus, cost_model, (2, 4, 8))

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
    *record.header(),
    "Lengths are uniform random integers in [1, distinct]. Median of the repeats after a",
    "warm-up; the plain DP is timed once and checked to reach the same optimum.",
    "",
    *table,
    "",
    "## `auto`'s bounds against `optimal`'s",
    "",
    *textwrap.wrap(
      f"On {source} ({np.unique(corpus).size:,} distinct), one epoch's modelled seconds "
      f"(`alpha + gamma * L + beta * B * L` a step: alpha {alpha:.3g} s, gamma {gamma:.3g} s, "
      f"beta {beta:.3g} s, {cost_source}) with `optimal`'s padding-minimal bounds and with "
      "`auto`'s run-time-minimal ones (`fastest_bounds_per_count`, exact among bounds at the "
      "corpus's lengths), for the same K. Partial batches, the batches of small buckets and, "
      "under a token budget, gamma's per-step cost are what padding alone does not see. Solve: "
      "one call for K = 1..8, run once.",
      100,
    ),
    "",
    *reporting.markdown_table(comparison, list(comparison[0])),
    "",
  ]
  reporting.write_report(out, report, echo=True)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
