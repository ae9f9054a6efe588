"""The README's quickstart run, recorded: train.py as a user types it, and a results file of what
it printed and wrote.

    python -m experiments.quickstart        # experiments/synthetic.py -> results/synthetic_cpu.md
    python -m experiments.quickstart --config experiments/synthetic.py:tiny --workdir /tmp/q \
        --out /tmp/q.md [--config.FIELD=VALUE ...]

Runs `python train.py --config=CONFIG --workdir=WORKDIR` in a process of its own, echoing its
output, with a fresh, empty persistent compilation cache (a new user's first run; `--warm-cache`
keeps yours). Then writes `--out` (default `experiments/results/<config>_<backend>.md`): the
machine (with the CPU's widest vector instructions: XLA compiles for those, and float32 results
differ between hosts that differ in them), the package versions, the load before and after, the
plan and compile figures of `summary.json`, one row per epoch of `metrics.jsonl`, and the console
as train.py printed it, so that the README quotes a run, not a memory of one.
"""

import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile

import cli_errors
from experiments import paper, reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
EPOCH_COLUMNS = {
  "epoch": lambda row: str(row["epoch"]),
  "train loss": lambda row: f"{row['train_loss']:.3f}",
  "val loss": lambda row: f"{row['val_loss']:.3f}",
  "val CER": lambda row: f"{row['val_cer']:.3f}",
  "val WER": lambda row: f"{row['val_wer']:.3f}",
  "epoch time (s)": lambda row: f"{row['epoch_time_s']:.1f}",
  "waiting for compiles (s)": lambda row: f"{row.get('compile_wait_s', 0.0):.1f}",
  "sequences/s": lambda row: f"{row['sequences_per_s']:.1f}",
}
# What the record reads of the run's files (`paper.read_run` names a file that lacks one).
EPOCH_NUMBERS = (
  "epoch", "train_loss", "val_loss", "val_cer", "val_wer", "epoch_time_s", "sequences_per_s",
)  # fmt: skip
SUMMARY_KEYS = (
  "strategy", "num_buckets", "upper_bounds", "efficiency", "train_compiles", "eval_compiles",
  "compilation_cache_hits", "compilation_cache_misses", "time_to_first_step_s", "compile_wall_s",
  "peak_step_memory_mb", "mean_step_memory_mb", "best_epoch", "best_val_loss", "best_val_cer",
  "train_time_s", "ended_by",
)  # fmt: skip


def train_command(config: str, workdir: pathlib.Path, overrides: list[str]) -> list[str]:
  return ["python", "train.py", f"--config={config}", f"--workdir={workdir}", *overrides]


def run_train(command: list[str], cache_dir: str | None) -> list[str]:
  """Runs `command` from the repository root; returns the lines it printed, stdout and stderr as
  they came, echoed to stderr. With `cache_dir`, its persistent compilation cache is there."""
  env = dict(os.environ)
  if cache_dir is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  lines = []
  with subprocess.Popen(
    [sys.executable, *command[1:]],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,  # its log lines: the epochs, the compiles
    text=True,
  ) as process:
    for line in process.stdout:
      print(line, end="", file=sys.stderr, flush=True)
      lines.append(line.rstrip("\n"))
  if process.returncode == cli_errors.USAGE_EXIT_CODE:
    raise cli_errors.AlreadyReported("train.py refused the run")
  if process.returncode:
    sys.exit(process.returncode)  # a crash: its traceback is on stderr
  return lines


def console(lines: list[str]) -> list[str]:
  """train.py's console without the summary JSON it ends with (summary.json is on file)."""
  return lines[: lines.index("{")] if "{" in lines else lines


def default_out(config: str, backend: str) -> pathlib.Path:
  """results/<config>[_<variant>]_<backend>.md: `experiments/iam.py:tiny` on a CPU is
  iam_tiny_cpu.md."""
  path, _, variant = config.partition(":")
  return RESULTS / ("_".join(filter(None, (pathlib.Path(path).stem, variant, backend))) + ".md")


def report_lines(
  summary: dict, history: list[dict], header: list[str], command: list[str], output: list[str]
) -> list[str]:
  """The results file: `header` (machine, versions, command, load), the plan and compile figures,
  the epochs' table, the best epoch, and the console of train.py's `command`."""
  times = [row["epoch_time_s"] for row in history]
  best = summary["best_epoch"]
  cache = summary["compilation_cache_hits"], summary["compilation_cache_misses"]
  return [
    f"# `{shlex.join(command)}`",
    "",
    *header,
    "The numbers below are the run's `metrics.jsonl` and `summary.json`.",
    "",
    f"Plan: {summary['strategy']}, {summary['num_buckets']} buckets, bounds "
    f"{summary['upper_bounds']}, efficiency {summary['efficiency']:.1%} with filler rows; "
    f"{summary['train_compiles']} train and {summary['eval_compiles']} eval compiles "
    f"(persistent cache: {cache[0]} hits, {cache[1]} misses), first train step after "
    f"{summary['time_to_first_step_s']:.1f} s, compile wall {summary['compile_wall_s']:.1f} s; "
    f"XLA plans the largest train step at {summary['peak_step_memory_mb']:.1f} MB, "
    f"{summary['mean_step_memory_mb']:.1f} MB on average over an epoch's steps.",
    "",
    "## Epochs",
    "",
    *reporting.markdown_table(
      [{column: cell(row) for column, cell in EPOCH_COLUMNS.items()} for row in history],
      EPOCH_COLUMNS,
    ),
    "",
    f"Best epoch {best}: validation loss {summary['best_val_loss']:.3f}, CER "
    f"{summary['best_val_cer']:.4f}; training time {summary['train_time_s']:.1f} s (the epochs' "
    f"steps, waits for compiles left out); median epoch {statistics.median(times):.1f} s "
    f"({min(times):.1f}-{max(times):.1f}); ended by {summary['ended_by']}.",
    "",
    "## Console",
    "",
    "```console",
    f"$ {shlex.join(command)}",
    *console(output),
    "```",
    "",
  ]


def main(argv: list[str] | None = None) -> pathlib.Path:
  argv = sys.argv[1:] if argv is None else argv
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="experiments/synthetic.py")
  parser.add_argument("--workdir", default="/tmp/synthetic")
  parser.add_argument("--out", help="the results file (default results/<config>_<backend>.md)")
  parser.add_argument(
    "--warm-cache",
    action="store_true",
    help="use the persistent compilation cache train.py finds, not a fresh one",
  )
  args, overrides = parser.parse_known_args(argv)
  unknown = [flag for flag in overrides if not flag.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  workdir = pathlib.Path(args.workdir)
  if workdir.exists() and any(workdir.iterdir()):
    # train.py would resume it, or return a finished run's summary without training.
    raise cli_errors.UsageError(
      f"--workdir: {workdir} already holds files; the record is of a fresh run, so remove it "
      "or name another"
    )
  if args.out:
    reporting.results_path(args.out, RESULTS)  # checked now, not after minutes of training
  command = train_command(args.config, workdir, overrides)
  record = reporting.RunRecord("experiments.quickstart", argv, reporting.versions())
  with tempfile.TemporaryDirectory(prefix="quickstart-cache-") as fresh_cache:
    output = run_train(command, None if args.warm_cache else fresh_cache)
  # JAX starts here only once train.py has ended: on a GPU, train.py had the memory to itself.
  import jax

  out = reporting.results_path(args.out, default_out(args.config, jax.default_backend()))
  run = paper.read_run(workdir, SUMMARY_KEYS, epoch_numbers=EPOCH_NUMBERS)
  cache = "the one train.py finds" if args.warm_cache else "a fresh, empty one"
  header = [*record.header(), f"Persistent compilation cache: {cache}."]
  lines = report_lines(run["summary"], run["history"], header, command, output)
  return reporting.write_report(out, lines)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
