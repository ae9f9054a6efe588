"""Start-up time of a training run: compiling the buckets one after another, in parallel, and
overlapped with training, and from the persistent compilation cache.

    python -m experiments.benchmark_compile [--config=experiments/synthetic.py:tiny]
        [--num-buckets 4] [--repeats 3] [--out FILE] [--config.FIELD=VALUE ...]

    # IAM-OnDB K = 8 on a GPU: 20 steps per run are enough, compiling is what is measured
    python -m experiments.benchmark_compile --config=experiments/iam.py --num-buckets 8 \
        --repeats 1 --config.max_steps=20 --config.data.data_dir=DIR

Each repeat trains the config with `compile_mode` sequential, parallel and overlap (persistent
cache off, in-memory caches cleared before each run, as a new process would start), then overlap
twice with a fresh persistent cache: once to fill it, once to read it. The table gives the median
and the range over the repeats of what `summary.json` reports; the runs take turns within each
repeat, so load from other processes falls on all of them alike. Writes
`experiments/results/benchmark_compile_<machine>.md` (`cpu`, `gpu`) with the machine, date,
command and load.
"""

import pathlib
import statistics
import sys
import tempfile

import jax

import cli_errors
import train
from experiments import cli
from experiments.reporting import (
  RunRecord,
  markdown_table,
  results_path,
  versions,
  write_report,
)

RESULTS = pathlib.Path(__file__).parent / "results"
RUNS = ("sequential", "parallel", "overlap", "overlap, cold cache", "overlap, warm cache")
MEASURES = {
  "time to first step (s)": "time_to_first_step_s",
  "compile wall (s)": "compile_wall_s",
  "compile summed (s)": "compile_seconds_sum",
  "train time (s)": "train_and_wait_s",
}


def one_run(config, mode: str, cache_dir: str, workdir: pathlib.Path) -> dict:
  """A fresh run's summary (in-memory caches cleared, as in a new process) with its training's
  wall time, waits for compiles included (`train_and_wait_s`): what overlapping costs."""
  config = config.copy_and_resolve_references()
  config.compile_mode, config.compilation_cache_dir = mode, cache_dir
  jax.clear_caches()
  summary = train.train_and_evaluate(config, workdir)
  return summary | {"train_and_wait_s": summary["train_time_s"] + summary["compile_wait_s"]}


def spread(values: list[float]) -> str:
  return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> pathlib.Path:
  argv = sys.argv[1:] if argv is None else argv
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="experiments/synthetic.py:tiny")
  parser.add_argument(
    "--num-buckets",
    type=cli_errors.positive_int,
    default=None,
    help="K (default: --config.bucketing.num_buckets, else 4)",
  )
  parser.add_argument("--repeats", type=cli_errors.positive_int, default=3)
  parser.add_argument("--out", default=None)
  args, overrides = parser.parse_known_args(argv)
  unknown = [argument for argument in overrides if not argument.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  config = cli.load_config([parser.prog, f"--config={args.config}", *overrides])
  if args.num_buckets is not None:
    config.bucketing.num_buckets = args.num_buckets
  elif not any(argument.startswith("--config.bucketing.num_buckets") for argument in overrides):
    config.bucketing.num_buckets = 4
  out = results_path(args.out, RESULTS / f"benchmark_compile_{jax.default_backend()}.md")

  record = RunRecord("experiments.benchmark_compile", argv, versions())
  summaries = {run: [] for run in RUNS}
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    for repeat in range(args.repeats):
      for mode in ("sequential", "parallel", "overlap"):
        summaries[mode].append(one_run(config, mode, "", scratch / f"{mode}-{repeat}"))
      cache_dir = str(scratch / f"cache-{repeat}")
      for run in ("overlap, cold cache", "overlap, warm cache"):
        summaries[run].append(one_run(config, "overlap", cache_dir, scratch / f"{run}-{repeat}"))
      for run in RUNS:
        print(repeat, run, {k: summaries[run][-1][k] for k in MEASURES.values()}, flush=True)

  rows = []
  for run in RUNS:
    runs = summaries[run]
    row = {"compile mode": run} | {
      column: spread([summary[key] for summary in runs]) for column, key in MEASURES.items()
    }
    row["parallelism (summed / wall)"] = spread(
      [s["compile_seconds_sum"] / s["compile_wall_s"] for s in runs]
    )
    hits = {(s["compilation_cache_hits"], s["compilation_cache_misses"]) for s in runs}
    row["cache hits / misses"] = ", ".join(f"{h} / {m}" for h, m in sorted(hits))
    rows.append(row)
  sequential_walls = [summary["compile_wall_s"] for summary in summaries["sequential"]]
  first_step_ratios = [
    summary["time_to_first_step_s"] / wall
    for summary, wall in zip(summaries["overlap"], sequential_walls, strict=True)
  ]
  parallel_ratios = [
    summary["compile_wall_s"] / wall
    for summary, wall in zip(summaries["parallel"], sequential_walls, strict=True)
  ]
  first = summaries["sequential"][0]
  report = [
    "# Start-up: compiling the buckets sequentially, in parallel, overlapped, from the cache",
    "",
    *record.header(),
    f"Config: `{args.config}` with K = {first['num_buckets']} buckets (bounds "
    f"{first['upper_bounds']}): {first['train_compiles']} train and {first['eval_compiles']} "
    f"eval steps to compile, {first['epochs']} epochs on {first['num_devices']} device(s).",
    "",
    f"Cells: median (min-max) of {args.repeats} repeats; the runs take turns within each repeat. "
    "Time to first step: from the start of compiling to the first train step's dispatch. "
    "Compile wall: from the first compile's start to the last one's end. Compile summed: the "
    "per-step compile times added up. Train time: the training steps' wall time (an epoch a "
    "stop cut short included), including any wait for a bucket still compiling. Sequential, "
    "parallel and overlap run with the persistent cache off; the cache runs use a fresh cache "
    "folder per repeat, filled by the cold run.",
    "",
    *markdown_table(
      rows, ["compile mode", *MEASURES, "parallelism (summed / wall)", "cache hits / misses"]
    ),
    "",
    f"Overlapped, the first train step starts after {spread(first_step_ratios)} of the "
    "sequential compile time (time to first step with overlap over the compile wall time of the "
    "sequential run of the same repeat). Compiling everything in parallel takes "
    f"{spread(parallel_ratios)} of the sequential compile wall time. Parallelism is how many "
    "compiles were in flight on average, not a speed-up: on a shared machine each of them then "
    "runs slower.",
    "",
  ]
  return write_report(out, report, echo=True)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
