"""The paper's table: wall time, epochs and validation loss for no bucketing against K buckets.

    python -m experiments.paper --data-dir ~/tensorflow_datasets          # full: IAM-OnDB, a GPU
    python -m experiments.paper --gpu --budget-minutes 9 --min-epochs 8 --data-dir DIR  # a GPU call
    python -m experiments.paper --quick --out experiments/results/paper_quick_cpu   # minutes, CPU
    python -m experiments.paper --tiny --workdir /tmp/paper-tiny          # seconds; for the tests

Every run is `train.train_and_evaluate` with the same seed, model and optimiser; only the bucket
plan differs: `none` (the baseline, one bucket), `quantile` and `optimal` at each K of `--buckets`
(K = 1 of either is the baseline itself, so it is not run twice), and `auto` with the largest K.
Full runs stop early on the validation loss (`config.patience`); `--gpu`, `--quick` and `--tiny`
train a fixed number of epochs, so that all runs see the same number of updates. Every run
compiles cold, as a first run on a fresh machine does: the persistent compilation cache is off, and
each run trains in a worker process of its own, since XLA keeps what it compiled and autotuned for
the life of a process (on an H200, sharing one process, `auto`'s plan of two buckets compiled in
13.0 s after `optimal`'s identical one had taken 25.3 s).
`--gpu` is the table within one GPU call: IAM-OnDB lines resampled as `experiments/iam.py:gpu`'s,
iam.py's model and batch, K = 1, 2, 4, at most 30 epochs, made to fit with `--budget-minutes`.

Device counts (`--devices`, default: 1, 2, 4, ... up to the devices there are, less those the
batch sizes are no multiple of) need those processes too, because the device count is fixed when
JAX starts: on a CPU a worker gets `--xla_force_host_platform_device_count=N`
(simulated devices share the same cores, so this checks the data-parallel path and its overhead,
not a speed-up), on GPUs the first N of `CUDA_VISIBLE_DEVICES`. This process never starts JAX
itself, so it holds no GPU memory.

Writes, next to `--out` (default `<workdir>/paper_table`): `.md` and `.csv` (one row per run),
`_val_loss.png` (validation loss against wall time, the paper's key figure) and `_speedup.png`
(median epoch time and speed-up against K, with the ideal speed-up). Definitions:
- wall time to best: the time to the first train step (the compiling training waits for) plus
  the training time of the epochs up to the best one, which includes any wait for a bucket still
  compiling (evaluation excluded: how often to evaluate is a choice, not a cost of bucketing);
- measured speed-up: the `none` run's median epoch time over this run's, at the same device count;
- ideal speed-up: the `none` run's padded timesteps (filler rows included) over this run's;
- padding efficiency: real over padded timesteps of the run's plan, filler rows included.
`--budget-minutes N` fits the sweep (probe, compiling, training, evaluation, the report) into N
minutes of wall time. It first measures: a probe trains the baseline and `optimal` at the largest K
for 2 epochs each (in `<workdir>/probe/`, at the first device count, compiling cold as the runs
do) and writes `<workdir>/probe.json` with
their `summary.json` times (`time_to_first_step_s`, `compile_wall_s`), the clean second epoch
(training plus evaluation) and each planned run's padded timesteps; `--estimates <earlier
probe.json>` reuses one instead (same settings and machine: yours to vouch for), as does the same
command started again in the same workdir (checked: `<workdir>/probe/settings.json` keeps the
probe's settings; other ones, or none, are refused). Every run is then estimated (`estimate_runs`:
epoch time linear in padded timesteps, compile wall linear in K), and `plan_budget` keeps as many
runs as fit at `--min-epochs` (default: the preset's epochs) in the order of `budget_priority`
(baseline, `optimal` by K, `auto`, `quantile` by K), then gives all of them the same, largest epoch
count (at most the preset's) that fits, without early stopping. A worker skips a run that its
estimate says would end past the deadline, and a run slower than its estimate stops at the deadline
with a checkpoint (`config.max_minutes`); the table and plots cover the runs that finished and name
those left out. Interrupted (Ctrl-C), the sweep writes the report of the runs that finished (none
before the baseline has: one line says so) and exits with code 130. A run whose `summary.json` says
it finished is reused, so an interrupted sweep continues where it stopped (a run the deadline cut
short resumes from its checkpoint). Started again, a budget sweep plans only what is left: its
finished runs cost nothing, and every other run gets the epoch count of its first plan or is left
out, so that a sweep can be finished in a second GPU call. Each run's folder keeps the settings it
was trained with (`settings.json`: its config, less where the data lies, the time cap and, but for
`auto`, the `--cost` model; a run from before that file is checked against the trainer's
`config.json`); a command that would reuse it under others (another dataset, preset, epoch count,
`auto`'s cost model...) is refused, naming the run and what differs, before any run of the sweep
trains: use a new workdir for it.

Measured: `--quick --budget-minutes 12` on IAM-OnDB on a 2-core CPU, then the same with
`--budget-minutes 6` (`experiments/results/paper_quick_cpu.md`; 11.7 min for the probe and four
runs, 5.1 for the two `quantile` runs the first start left out): every run learns (validation CER
0.33-0.35 after 12 epochs); optimal K = 2 reached the baseline's best loss at its 9th epoch
instead of the 11th, 1.39x sooner in wall time; the epochs gained 86-90% of their ideal
speed-up; `auto` measured its cost model and chose K = 4 with bounds of its own, the fastest
epoch (8.46 s), but its loss lagged the other bucketed runs' (one seed).
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import ml_collections
import numpy as np

import bucketing
import cli_errors
from experiments import cli, common, iam, reporting, synthetic
from handwriting import dataset as dataset_lib

DEFAULT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
PRESET_BUCKETS = {"full": DEFAULT_BUCKETS, "gpu": (1, 2, 4), "quick": (1, 2, 4), "tiny": (1, 2)}
# Presets whose runs all train their epochs (no early stopping), so that their losses compare.
FIXED_EPOCH_PRESETS = ("gpu", "quick", "tiny")
STRATEGIES = ("none", "quantile", "optimal", "auto")
COLUMNS = (
  "devices",
  "strategy",
  "buckets",
  "upper bounds",
  "median epoch (s)",
  "epochs to best",
  "epochs run",
  "wall to best (s)",
  "epochs to baseline loss",
  "wall to baseline loss (s)",
  "best val loss",
  "best val CER",
  "compile (s)",
  "padding efficiency",
  "speed-up",
  "ideal speed-up",
)


def make_config(
  preset: str = "full",
  dataset: str = "auto",
  data_dir: str | None = None,
  epochs: int = 0,
  cost: str | None = None,
) -> ml_collections.ConfigDict:
  """The experiment config of a preset (`full`, `gpu`, `quick`, `tiny`) with command-line overrides.

  `dataset="auto"` takes IAM-OnDB when `data_dir` holds it or `IAM_ONDB_DIR` is set (the
  download, built on first use: into `data_dir` when given), else the synthetic set. A `data_dir`
  given for IAM-OnDB (`auto` or `iam_ondb`) that holds neither its export nor a TFDS build, with
  no `IAM_ONDB_DIR` to build one from, is an error, not the synthetic set, and so is one given
  with `dataset="synthetic"`, which would read nothing from it. `cost` is
  "alpha,beta,kappa[,gamma]" for `auto`, in seconds (gamma 0 when left out); without it `auto`
  measures its cost model.
  """
  if dataset == "synthetic" and data_dir:  # else silently another dataset's table
    raise cli_errors.UsageError(
      f"--data-dir {data_dir} with --dataset synthetic: the synthetic set is generated; leave "
      "one of them out"
    )
  if dataset in ("auto", "iam_ondb") and data_dir:
    check_data_dir(data_dir)
  if dataset == "auto":
    dataset = "iam_ondb" if data_dir or os.environ.get("IAM_ONDB_DIR") else "synthetic"
  config = iam.get_config() if dataset == "iam_ondb" else synthetic.get_config()
  config.data.data_dir = data_dir
  config.progress_bar = False
  if preset == "tiny":
    config = common.tiny(config)
  elif preset == "gpu":
    # One 10-minute call on one GPU (`gpu_call.sh paper:M`), where the full preset does not fit:
    # on an H200 its probe alone (raw points, compiled cold) took over 5.3 of 8 minutes, and its
    # baseline was estimated at 9.7 minutes for 50 epochs. iam.py's model and batch of 32 lines,
    # on lines resampled as iam.py:gpu's (whose epoch, under its token budget at K = 8, took
    # 0.7 s there), no test split, fixed epochs that a budget shortens equally. K up to 4: every
    # run compiles cold, and iam.py:gpu's 17 steps took 112 s to compile there.
    config.data.features.resample_spacing = 0.2
    config.data.test_split = None
    config.num_epochs = 30
  elif preset == "quick":
    # About two minutes per run on a 2-core CPU, and it learns (optimal K = 4 alone: val CER
    # 0.36 after 12 epochs, 9 s each): a subset, lines resampled to about half the points, a
    # 2 x 64 BLSTM, a high learning rate, fixed epochs.
    config.data.train_limit = 1000
    config.data.eval_limit = 120
    config.data.test_split = None
    config.data.features.resample_spacing = 0.2
    config.model.num_layers = 2
    config.model.hidden_size = 64
    config.model.unroll = 1
    config.bucketing.batch_size = 16
    config.eval_batch_size = 40
    config.optimizer.learning_rate = 6e-3
    config.optimizer.warmup_steps = 20
    config.num_epochs = 12
  if epochs:
    config.num_epochs = epochs
  if preset in FIXED_EPOCH_PRESETS:  # every run trains all its epochs
    config.patience = config.num_epochs
  if cost:
    alpha, beta, kappa, gamma = [*(float(value) for value in cost.split(",")), 0.0][:4]
    config.bucketing.alpha, config.bucketing.beta, config.bucketing.kappa = alpha, beta, kappa
    config.bucketing.gamma = gamma
  return config


def check_data_dir(data_dir: str) -> None:
  """Refuses a `--data-dir` without IAM-OnDB (its export or a TFDS build's folder; TFDS is not
  imported) unless `IAM_ONDB_DIR` names a download to build it there from."""
  export = dataset_lib.export_path("iam_ondb", data_dir)
  build = dataset_lib.user_path(data_dir) / "iam_ondb"
  if not (export.is_file() or build.is_dir() or os.environ.get("IAM_ONDB_DIR")):
    raise cli_errors.UsageError(
      f"--data-dir {data_dir} holds no IAM-OnDB (neither {export.name} nor a TFDS build "
      f"{build.name}/) and IAM_ONDB_DIR is not set to build it from; build it there (python -m "
      "handwriting build, README: Getting IAM-OnDB), or leave --data-dir out for the synthetic set"
    )


def args_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  config = make_config(args.preset, args.dataset, args.data_dir, args.epochs, args.cost)
  if args.budget_minutes:  # equal epochs for every run: no early stopping
    config.patience = config.num_epochs
  # Every run compiles cold, as on a fresh machine: runs share shapes (every plan's longest
  # bucket), and through JAX's persistent cache a later run loaded the steps an earlier one had
  # compiled (on an H200, auto's one bucket compiled in 1.9 s after the baseline's 28.3).
  config.compilation_cache_dir = ""
  return config


def run_config(
  args: argparse.Namespace, strategy: str, num_buckets: int
) -> ml_collections.ConfigDict:
  """The config one run of the sweep trains with."""
  config = args_config(args)
  config.bucketing.strategy, config.bucketing.num_buckets = strategy, num_buckets
  return config


# Fields that steer a run without changing its results: where the data lies, the time cap, the bar.
STEERING_FIELDS = ("data.data_dir", "data.manual_dir", "max_minutes", "progress_bar")
COST_FIELDS = ("bucketing.alpha", "bucketing.beta", "bucketing.kappa", "bucketing.gamma")
SETTINGS_FILE = "settings.json"
TRAINED_WITH_FILE = "config.json"  # what the trainer records at every start (train.CONFIG_FILE)


def run_settings(config: ml_collections.ConfigDict) -> dict:
  """What a run's results depend on: its config, less `STEERING_FIELDS`, and less the cost model
  (`--cost`) unless `auto` plans with it."""
  settings = json.loads(config.to_json_best_effort())
  ignored = (
    STEERING_FIELDS if config.bucketing.strategy == "auto" else STEERING_FIELDS + COST_FIELDS
  )
  for field in ignored:
    *parents, name = field.split(".")
    functools.reduce(dict.__getitem__, parents, settings).pop(name, None)
  if config.bucketing.strategy == "auto":  # since auto's bounds minimise run time, not padding
    return {"config": settings, "auto_bounds_minimise": "run time"}
  return {"config": settings}


def check_run_settings(
  args: argparse.Namespace, device_counts: list[int], budget: dict | None
) -> None:
  """Records in each run's folder (`settings.json`) the settings of every run this command trains
  or reuses, and refuses a run folder that holds others, naming what differs: a finished run is
  reused, and the report describes it by this command's settings. A run folder from before
  `settings.json` is checked against the trainer's `config.json`. Every run is checked before any
  is recorded, so that a refused command records nothing."""
  workdir = pathlib.Path(args.workdir)
  runs = [
    (devices, *run) for devices in device_counts for run in worker_runs(args, devices, budget)
  ]
  paths = {run: workdir / run_name(*run) / SETTINGS_FILE for run in runs}
  settings = {run: run_settings(run_config(args, *run[1:])) for run in runs}
  for run in runs:
    cli.check_settings(paths[run], settings[run], "a run", trained_with=TRAINED_WITH_FILE)
  for run in runs:  # all checked: a refused command records nothing
    cli.record_settings(paths[run], settings[run])


def batch_mismatch(config: ml_collections.ConfigDict, devices: int) -> str | None:
  """Why the worker for `devices` would refuse the config (`train.validate_config`: a batch size
  that is no multiple of them), asked before any worker starts, so that the workers for the
  counts before it do not train first; None when it would not. A token budget's batch sizes are
  made multiples of the devices."""
  for field, size in (
    ("bucketing.batch_size", config.bucketing.batch_size),
    ("eval_batch_size", config.eval_batch_size),
  ):
    if size % devices:
      return f"config.{field}={size} is not a multiple of {devices}"
  return None


def default_device_counts(config: ml_collections.ConfigDict, available: int) -> list[int]:
  """1, 2, 4, ... up to the `available` devices, less those the batch sizes do not allow (each
  left out with a line saying why)."""
  counts = []
  for devices in (2**i for i in range(available.bit_length())):
    if why := batch_mismatch(config, devices):
      print(f"left out {devices} devices: {why}", flush=True)
    else:
      counts.append(devices)
  return counts


def planned_runs(buckets: list[int], strategies: list[str]) -> list[tuple[str, int]]:
  """(strategy, K) of every run: the baseline first, K = 1 only once, `auto` up to max K."""
  runs = [("none", 1)]
  for strategy in strategies:
    if strategy in ("quantile", "optimal"):
      runs += [(strategy, k) for k in buckets if k > 1]
    elif strategy == "auto":
      runs.append(("auto", max(buckets)))
  return runs


def run_name(devices: int, strategy: str, num_buckets: int) -> str:
  return f"devices{devices}/{strategy}_k{num_buckets}"


# ---------------------------------------------------------------------------------------------
# The time budget: estimate every run from a short probe, then plan runs and equal epochs.

BUDGET_PRIORITY = ("none", "optimal", "auto", "quantile")
PROBE_EPOCHS = 2  # the second epoch is clean of compiling: it gives the per-epoch time
REPORT_RESERVE_S = 15.0  # a margin for writing the table and plots, not a measurement


@dataclasses.dataclass(frozen=True)
class RunEstimate:
  """Predicted seconds of one run: `fixed_s` once (start-up, compiling), `epoch_s` per epoch."""

  devices: int
  strategy: str
  num_buckets: int
  fixed_s: float
  epoch_s: float

  def seconds(self, epochs: int) -> float:
    return self.fixed_s + epochs * self.epoch_s


def budget_priority(runs: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
  """(devices, strategy, K) in the order runs are kept: device counts ascending; at each, the
  baseline (every speed-up is measured against it), `optimal` (the claim) by K ascending
  (cheapest to compile first), `auto`, then `quantile` by K."""
  return sorted(runs, key=lambda run: (run[0], BUDGET_PRIORITY.index(run[1]), run[2]))


def plan_budget(
  estimates: list[RunEstimate], budget_s: float, max_epochs: int, min_epochs: int = 1
) -> tuple[list[RunEstimate], int]:
  """The runs kept (a prefix of `estimates`, in priority order) and their common epoch count.

  Keeps as many runs as fit `budget_s` at `min_epochs` each, then gives all of them the most
  epochs (at most `max_epochs`, the same for every run so that their losses compare) that still
  fit. Returns ([], 0) when not even the first run fits.
  """
  if not 1 <= min_epochs <= max_epochs:
    raise ValueError(f"need 1 <= min_epochs <= max_epochs, got {min_epochs} and {max_epochs}")
  for count in range(len(estimates), 0, -1):
    kept = estimates[:count]
    fixed = sum(run.fixed_s for run in kept)
    per_epoch = sum(run.epoch_s for run in kept)
    epochs = max_epochs if per_epoch <= 0 else math.floor((budget_s - fixed) / per_epoch)
    epochs = min(epochs, max_epochs)
    while epochs >= min_epochs and sum(run.seconds(epochs) for run in kept) > budget_s:
      epochs -= 1  # floating-point rounding of the division
    if epochs >= min_epochs:
      return kept, epochs
  return [], 0


def _interpolate(x: float, x0: float, y0: float, x1: float, y1: float) -> float:
  return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def estimate_runs(probes: list[dict], planned: list[dict], devices: int) -> list[RunEstimate]:
  """Every planned run's estimate from one or two probe runs (the baseline and the largest K).

  A probe trained `PROBE_EPOCHS` epochs; its last epoch (training plus evaluation) is the clean
  epoch time. The epoch time is interpolated linearly in padded timesteps (filler included)
  between the probes, `compile_wall_s` linearly in the bucket count. The rest of a probe's wall
  time (loading data, `time_to_first_step_s` within the compile wall, waiting for compiles in the
  first epoch, the test split) is `fixed_s` less the compile wall, the larger of the probes':
  counting the compile wall as if nothing overlapped it keeps the estimate on the safe side.
  """
  low, high = min(probes, key=lambda p: p["padded"]), max(probes, key=lambda p: p["padded"])
  setup = max(
    max(0.0, probe["wall_s"] - probe["compile_wall_s"] - PROBE_EPOCHS * probe["epoch_s"])
    for probe in probes
  )
  by_buckets = sorted(probes, key=lambda p: p["num_buckets"])
  first, last = by_buckets[0], by_buckets[-1]
  return [
    RunEstimate(
      devices,
      run["strategy"],
      run["requested_buckets"],
      fixed_s=setup
      + run.get("measure_s", 0.0)  # auto's measuring of its cost model
      + _interpolate(
        run["num_buckets"],
        first["num_buckets"],
        first["compile_wall_s"],
        last["num_buckets"],
        last["compile_wall_s"],
      ),
      epoch_s=_interpolate(
        run["padded"], low["padded"], low["epoch_s"], high["padded"], high["epoch_s"]
      ),
    )
    for run in planned
  ]


# ---------------------------------------------------------------------------------------------
# The worker: one process per run.


def run_worker(args: argparse.Namespace, devices: int) -> int:
  """Trains one run (`--worker-run STRATEGY:K`) on `devices` devices: this process was started
  with them, and for it alone, so that it compiles as cold as the run's own `train.py` would."""
  import jax
  from absl import logging as absl_logging

  import train

  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's INFO lines
  if jax.device_count() != devices:
    raise RuntimeError(f"the worker for {devices} devices sees {jax.device_count()}")
  workdir = pathlib.Path(args.workdir)
  (workdir / f"devices{devices}").mkdir(parents=True, exist_ok=True)
  (workdir / f"devices{devices}" / "machine.json").write_text(
    json.dumps({"machine": reporting.machine_description(), "jax": jax.__version__})
  )
  strategy, num_buckets = args.worker_run
  if args.probe:
    return probe(args, devices, workdir, strategy, num_buckets)
  name = run_name(devices, strategy, num_buckets)
  config = run_config(args, strategy, num_buckets)
  if args.budget_minutes:
    # A run slower than its estimate stops at the deadline with a checkpoint (train.py's time
    # cap); the same command, given more time, continues it.
    left_s = read_budget(workdir)["deadline"] - time.time()
    if left_s <= 0:  # its start outlasted its estimate: 0 would be no cap, less than 0 an error
      print(f"{name}: left out, out of time", flush=True)
      return 0
    config.max_minutes = left_s / 60
  summary = train.train_and_evaluate(config, workdir / name)
  if code := signal_exit_code(name, summary):  # checkpointed; the same command resumes
    return code
  if summary["stopped_by"]:
    print(f"{name}: stopped by the deadline", flush=True)
  else:
    print(
      f"{name}: {summary['num_buckets']} bucket(s), {summary['epochs']} epochs, best val loss "
      f"{summary['best_val_loss']:.3f}, train {summary['train_time_s']:.1f} s, compile "
      f"{summary['compile_wall_s']:.1f} s",
      flush=True,
    )
  return 0


def signal_exit_code(name: str, summary: dict, say: Callable[[str], None] = print) -> int | None:
  """A worker's exit code when a signal stopped its run named `name`, 128 + the signal, after
  `say`ing so (the parent, stopped by the same Ctrl-C, reports); None otherwise."""
  if summary["stopped_by"] not in ("SIGINT", "SIGTERM"):
    return None
  say(f"{name}: stopped by {summary['stopped_by']}")
  return 128 + getattr(signal, summary["stopped_by"])


def finished_run(run_dir: pathlib.Path) -> bool:
  """Whether the run in `run_dir` trained to its end (not cut short by the deadline)."""
  summary_path = run_dir / "summary.json"
  return summary_path.is_file() and not cli_errors.read_json_object(summary_path).get("stopped_by")


def worker_runs(args: argparse.Namespace, devices: int, budget: dict | None):
  """(strategy, K) of the runs to train on `devices`: all planned, or those the budget kept."""
  if budget is None:
    return planned_runs(args.buckets, args.strategies)
  return [(strategy, k) for d, strategy, k in budget["runs"] if d == devices]


def train_runs(args, worker_argv, device_counts, budget: dict | None) -> bool:
  """Trains every run not finished yet, each in a worker process of its own; False when
  interrupted. With a budget, a run whose estimate would end past the deadline is left out."""
  workdir = pathlib.Path(args.workdir)
  for devices in device_counts:
    for strategy, num_buckets in worker_runs(args, devices, budget):
      name = run_name(devices, strategy, num_buckets)
      if finished_run(workdir / name):
        continue
      if budget and time.time() + budget["estimates"][name] > budget["deadline"]:
        print(f"{name}: left out, out of time", flush=True)
        continue
      run = [*worker_argv, "--worker-run", f"{strategy}:{num_buckets}"]
      if not run_worker_process(run, devices):
        return False
  return True


def read_budget(workdir: pathlib.Path) -> dict:
  return cli_errors.read_json_object(workdir / "budget.json")


def probe_runs(args: argparse.Namespace) -> list[tuple[str, int]]:
  """(strategy, K) of the probe's runs: the baseline and `optimal` at the largest K."""
  return sorted({("none", 1), ("optimal", max(args.buckets))})


def probe_run_dir(workdir: pathlib.Path, strategy: str, num_buckets: int) -> pathlib.Path:
  """Where a probe run trains; its times go beside it, in the same name with `.json`."""
  return workdir / "probe" / f"{strategy}_k{num_buckets}"


def probe(
  args: argparse.Namespace, devices: int, workdir: pathlib.Path, strategy: str, num_buckets: int
) -> int:
  """Trains one of the probe's runs for `PROBE_EPOCHS` epochs and writes its times and plan next
  to it (`probe/<run>.json`); the last one's worker also writes `probe/planned.json`, the plan
  (K, padded timesteps) of every planned run, `auto`'s measured as its run will measure it. The
  worker's exit code (`signal_exit_code`)."""
  import train

  config = run_config(args, strategy, num_buckets)
  config.num_epochs = config.patience = PROBE_EPOCHS
  run_dir = probe_run_dir(workdir, strategy, num_buckets)
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, run_dir)
  wall = time.perf_counter() - start
  if code := signal_exit_code(f"the probe's {strategy}:{num_buckets}", summary):
    return code  # the parent reports the interruption
  run = read_run(run_dir)
  last = run["history"][-1]
  times = {
    "strategy": strategy,
    "requested_buckets": num_buckets,
    "num_buckets": run["plan"]["num_buckets"],
    "padded": int(run["plan"]["padded_timesteps_with_filler"]),
    "measure_s": 0.0,
    "wall_s": wall,
    "time_to_first_step_s": summary["time_to_first_step_s"],
    "compile_wall_s": summary["compile_wall_s"],
    "epoch_s": last["epoch_time_s"] + last["eval_time_s"],
  }
  run_dir.with_suffix(".json").write_text(json.dumps(times, indent=2))
  if (strategy, num_buckets) != probe_runs(args)[-1]:
    return 0
  planning_start = time.perf_counter()
  train_set = train.load_data(args_config(args))[0]
  cost = None
  if "auto" in args.strategies:  # measured once, as its run will measure it
    auto = run_config(args, "auto", max(args.buckets))
    cost = train.auto_cost_model(auto, train_set, train.make_data_mesh(), workdir / "probe")

  def plan_of(strategy, num_buckets):
    config = run_config(args, strategy, num_buckets)
    measured = cost if strategy == "auto" else None
    plan = train.make_train_plan(config, train_set, devices, measured.model if measured else None)
    return {
      "strategy": strategy,
      "requested_buckets": num_buckets,
      "num_buckets": plan.num_buckets,
      "padded": int(plan.summary()["padded_timesteps_with_filler"]),
      "measure_s": measured.report["measure_s"] if measured else 0.0,
    }

  planned = [plan_of(*run) for run in planned_runs(args.buckets, args.strategies)]
  planning_s = time.perf_counter() - planning_start
  (workdir / "probe" / "planned.json").write_text(
    json.dumps({"planned": planned, "planning_s": planning_s}, indent=2)
  )
  return 0


def check_probe_settings(args: argparse.Namespace, devices: int, workdir: pathlib.Path) -> None:
  """Refuses a workdir whose probe was measured with other settings, or with none on record
  (`probe/settings.json`), and records this command's before it probes or reuses the probe:
  the runs it times, the planned runs' K and padding (`auto`'s with its cost model) and the
  device count it ran on."""
  planner = run_config(args, "auto", max(args.buckets)) if "auto" in args.strategies else None
  settings = run_settings(planner or args_config(args)) | {
    "buckets": args.buckets,
    "strategies": args.strategies,
    "devices": devices,
  }
  path = workdir / "probe" / SETTINGS_FILE
  if (workdir / "probe.json").is_file() and not path.is_file():
    raise cli_errors.UsageError(
      f"{workdir} holds a probe (probe.json) with no record of its settings ({path}); use a new "
      "--workdir, or give it as --estimates if it was measured with this command's settings"
    )
  cli.check_settings(path, settings, "a probe")
  cli.record_settings(path, settings)


def read_probe(path: pathlib.Path) -> dict:
  """A probe's estimates (`probe.json`, or `--estimates`); a file that cannot be read, or holds
  no probe, is a one-line error naming it."""
  try:
    return cli_errors.read_json_object(path, ("probes", "planned"), "a probe of experiments.paper")
  except ValueError as error:
    raise cli_errors.UsageError(str(error)) from None


def plan_sweep(args, argv, device_counts, start: float) -> dict:
  """Probes (or reads `--estimates`) and plans within `--budget-minutes`; a sweep started again
  plans the runs it has not finished, at the epoch count of its workdir's earlier plan
  (`budget.json`), so that its runs compare."""
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not args.estimates:  # the workdir's own probe: measured with this command's settings
    check_probe_settings(args, device_counts[0], workdir)
  earlier = args.estimates or (
    workdir / "probe.json" if (workdir / "probe.json").is_file() else None
  )
  if earlier:  # a sweep started again continues with its own probe's estimates
    probed = read_probe(pathlib.Path(earlier))
  else:
    probe_start = time.perf_counter()
    for strategy, num_buckets in probe_runs(args):
      run = [*argv, "--probe", "--worker-run", f"{strategy}:{num_buckets}"]
      if not run_worker_process(run, device_counts[0]):
        raise cli_errors.Interrupted("interrupted while probing: no run to report")
    planned = cli_errors.read_json_object(workdir / "probe" / "planned.json")
    times = [probe_run_dir(workdir, *run).with_suffix(".json") for run in probe_runs(args)]
    probed = {
      "devices": device_counts[0],
      "probes": [cli_errors.read_json_object(path) for path in times],
      "planned": planned["planned"],
    }
    # What the probe's workers spent outside their runs and the planning: starting Python and
    # JAX, which every run's worker will spend again.
    probing_s = time.perf_counter() - probe_start - planned["planning_s"]
    unaccounted = probing_s - sum(p["wall_s"] for p in probed["probes"])
    probed["worker_start_s"] = max(0.0, unaccounted / len(probe_runs(args)))
    probed["probe_s"] = time.perf_counter() - start
    (workdir / "probe.json").write_text(json.dumps(probed, indent=2))
  estimates, reused = [], []
  for devices in device_counts:
    per_device = estimate_runs(probed["probes"], probed["planned"], devices)
    for estimate in per_device:
      name = run_name(devices, estimate.strategy, estimate.num_buckets)
      if finished_run(workdir / name):  # an earlier start trained it: it costs nothing now
        estimates.append(dataclasses.replace(estimate, fixed_s=0.0, epoch_s=0.0))
        reused.append(name)
      else:  # its worker process starts first
        start_s = estimate.fixed_s + probed.get("worker_start_s", 0.0)
        estimates.append(dataclasses.replace(estimate, fixed_s=start_s))
  by_key = {(e.devices, e.strategy, e.num_buckets): e for e in estimates}
  ordered = [by_key[key] for key in budget_priority(list(by_key))]
  spent = time.perf_counter() - start
  budget_s = args.budget_minutes * 60 - spent - REPORT_RESERVE_S
  max_epochs = args_config(args).num_epochs
  min_epochs = min(args.min_epochs or max_epochs, max_epochs)
  if (workdir / "budget.json").is_file():  # its runs trained this many: the rest must too
    max_epochs = min_epochs = read_budget(workdir)["epochs"]
  kept, epochs = plan_budget(ordered, budget_s, max_epochs, min_epochs)
  if not kept:
    first = ordered[0].seconds(min_epochs) / 60
    raise cli_errors.UsageError(
      f"--budget-minutes {args.budget_minutes:g} leaves {budget_s / 60:.1f} min after the probe; "
      f"the baseline alone needs {first:.1f} min for {min_epochs} epoch(s)"
    )
  budget = {
    "budget_minutes": args.budget_minutes,
    "probe_s": spent,
    "estimates_from": str(earlier) if earlier else None,
    "probed_by_earlier_start_s": probed.get("probe_s") if earlier and not args.estimates else None,
    "reused": reused,
    "epochs": epochs,
    "deadline": time.time() + budget_s,
    "runs": [(e.devices, e.strategy, e.num_buckets) for e in kept],
    "left_out": [run_name(e.devices, e.strategy, e.num_buckets) for e in ordered[len(kept) :]],
    "estimates": {
      run_name(e.devices, e.strategy, e.num_buckets): e.seconds(epochs) for e in ordered
    },
  }
  print(
    f"budget {args.budget_minutes:g} min: {len(kept)} run(s) of {epochs} epoch(s), estimated "
    f"{sum(e.seconds(epochs) for e in kept) / 60:.1f} min after {spent / 60:.1f} min of probing; "
    f"left out: {', '.join(budget['left_out']) or 'none'}",
    flush=True,
  )
  return budget


def run_worker_process(argv: list[str], devices: int) -> bool:
  """Runs the worker for `devices` devices to its end; False when it was interrupted."""
  return run_worker_command(
    [sys.executable, "-m", "experiments.paper", *argv, "--worker-devices", str(devices)],
    worker_env(devices),
    f"the worker for {devices} device(s)",
  )


def run_worker_command(command: list[str], env: dict[str, str], what: str, **popen_args) -> bool:
  """Runs a worker process to its end; returns False when SIGINT or SIGTERM interrupted it.

  SIGINT (Ctrl-C, or a deadline's `timeout --signal=INT`) reaches the worker as well, and its
  training stops at a step boundary with a checkpoint: this waits for that, where
  `subprocess.run` would kill the worker mid-write. SIGTERM may come to this process alone (a
  scheduler, `kill PID`), where it would end it and leave the worker training on: on the main
  thread it is passed on as SIGINT, which a worker that had SIGTERM too (sent to the whole group)
  takes as the same request, where a second SIGTERM would end it before its checkpoint. A worker
  that fails otherwise has printed its error: one line with exit code 2, which `cli_errors.run`
  then ends on (AlreadyReported), or a bug's traceback, followed by a line naming `what`.
  """
  worker, terminated = None, False

  def pass_on(*_):
    nonlocal terminated
    terminated = True
    if worker is not None:
      worker.send_signal(signal.SIGINT)  # nothing, once the worker has ended

  main_thread = threading.current_thread() is threading.main_thread()
  on_sigterm = signal.signal(signal.SIGTERM, pass_on) if main_thread else None
  try:
    worker = subprocess.Popen(command, env=env, **popen_args)
    if terminated:  # before the worker existed
      worker.send_signal(signal.SIGINT)
    returncode = worker.wait()
  except KeyboardInterrupt:
    if worker is not None:
      worker.wait()
    return False
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, on_sigterm)
  # A worker stops cleanly with 128 + the signal; one killed by a signal before it handles them
  # (while it starts) has the negative signal.
  stopped = {code for stop in (signal.SIGINT, signal.SIGTERM) for code in (128 + stop, -stop)}
  if terminated or returncode in stopped:
    return False
  if returncode == cli_errors.USAGE_EXIT_CODE:  # the worker printed its one line
    raise cli_errors.AlreadyReported(f"{what} failed with exit code {returncode}")
  if returncode:
    raise cli_errors.UsageError(f"{what} failed with exit code {returncode}")
  return True


def worker_env(devices: int) -> dict[str, str]:
  """The environment of a worker process that sees exactly `devices` devices."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  visible = env.get("CUDA_VISIBLE_DEVICES")
  gpu_ids = visible.split(",") if visible else [str(i) for i in range(devices)]
  env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids[:devices])
  return env


def available_devices() -> int:
  """The device count a fresh JAX process sees here (asked in a child, to keep this one free)."""
  probe = "import jax; print(jax.device_count())"
  output = subprocess.run(
    [sys.executable, "-c", probe], check=True, capture_output=True, text=True
  ).stdout
  return int(output.split()[-1])


# ---------------------------------------------------------------------------------------------
# Collecting the runs into the table and plots.


def read_run(
  run_dir: pathlib.Path,
  summary_keys: tuple[str, ...] = (),
  plan_keys: tuple[str, ...] = (),
  epoch_numbers: tuple[str, ...] = (),
) -> dict:
  """A finished run's summary, plan and per-epoch metrics, as the trainer wrote them, with the
  fields the caller reads (`epoch_numbers`: numbers in every epoch's row); a damaged or missing
  file, or one without them, is an error naming it, not a KeyError where they are used."""
  summary = cli_errors.read_json_object(run_dir / "summary.json", summary_keys)
  plan = cli_errors.read_json_object(run_dir / "plan.json", plan_keys)
  history = read_metrics(run_dir / "metrics.jsonl", epoch_numbers)
  return {"summary": summary, "plan": plan, "history": history}


def read_metrics(path: pathlib.Path, numbers: tuple[str, ...] = ()) -> list[dict]:
  """The rows of a run's `metrics.jsonl`, one per epoch; a row that is not a JSON object, or
  lacks one of the `numbers`, is an error naming the file and line."""
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    try:
      row = json.loads(line)
    except ValueError as error:
      raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}, line {number}: not a JSON object, so not an epoch's metrics")
    rows.append(check_numbers(f"{path}, line {number}", row, numbers))
  return rows


def is_number(value: object, kind: type | tuple[type, ...] = (int, float)) -> bool:
  """Whether `value`, read from JSON, is a `kind` of number (JSON's true and false are not)."""
  return isinstance(value, kind) and not isinstance(value, bool)


def check_numbers(
  where: str | pathlib.Path,
  record: dict,
  keys: tuple[str, ...],
  kind: type | tuple[type, ...] = (int, float),
) -> dict:
  """`record` if each of its `keys` holds a `kind` of number (`is_number`); else a ValueError
  naming `where` (its file) and the keys, not a TypeError where a number is computed with."""
  what = "an integer" if kind is int else "a number"
  wrong = [
    f"{key} is {json.dumps(record[key])}, not {what}" if key in record else f"no {key}"
    for key in keys
    if not is_number(record.get(key), kind)
  ]
  if wrong:
    raise ValueError(f"{where}: {'; '.join(wrong)}")
  return record


# What the table reads of a finished run: numbers it computes with, and fields it shows as they
# are (train.py writes them all).
SUMMARY_NUMBERS = (
  "best_val_loss",
  "best_val_cer",
  "compile_wall_s",
  "efficiency",
  "time_to_first_step_s",
)
SUMMARY_KEYS = ("best_epoch", *SUMMARY_NUMBERS, "num_buckets", "upper_bounds", "epochs")
PLAN_NUMBERS = ("num_examples", "padded_timesteps_with_filler")
EPOCH_NUMBERS = ("epoch", "epoch_time_s", "val_loss")


def read_table_run(run_dir: pathlib.Path, strategy: str) -> dict:
  """A finished run (`read_run`) with what its row, the plots and the report read, numbers where
  they compute, and a `best_epoch` that is one of its epochs (its row sums the epochs up to it);
  else a one-line error naming the file."""
  plan_keys = (*PLAN_NUMBERS, "cost_model") if strategy == "auto" else PLAN_NUMBERS
  run = read_run(run_dir, SUMMARY_KEYS, plan_keys, EPOCH_NUMBERS)
  summary_path = run_dir / "summary.json"
  check_numbers(summary_path, run["summary"], SUMMARY_NUMBERS)
  check_numbers(run_dir / "plan.json", run["plan"], PLAN_NUMBERS)
  best, epochs = run["summary"]["best_epoch"], len(run["history"])
  if not (is_number(best, int) and 0 <= best < epochs):
    raise ValueError(
      f"{summary_path}: best_epoch {json.dumps(best)} is not one of the {epochs} epoch(s) of "
      "metrics.jsonl"
    )
  return run


def auto_cost_text(runs: dict) -> str:
  """The cost model the first `auto` run planned with, as a sentence ('' without one)."""
  plans = [run["plan"] for (_, strategy, _), run in runs.items() if strategy == "auto"]
  if not plans:
    return ""
  cost = plans[0]["cost_model"]
  if "measured_cost" in plans[0]:
    how = "measured before planning"
  elif cost is None:
    return " `auto` needed no cost model: the corpus has one padded length."
  elif "gamma" not in cost:  # runs from before auto measured its cost model
    return " `auto` planned with the placeholder cost model (alpha 5 ms, beta 0.5 us, kappa 10 s)."
  else:
    how = "given by --cost"
  return (
    f" `auto` cost model ({how}): alpha {cost['alpha']:.3g} s per step, gamma "
    f"{cost['gamma']:.3g} s per padded timestep, beta {cost['beta']:.3g} s per padded token, "
    f"kappa {cost['kappa']:.3g} s per bucket."
  )


def startup_seconds(summary: dict) -> float:
  """Seconds before training: measuring `auto`'s cost model, if it did, and compiling up to the
  first train step."""
  return summary.get("cost_model_measure_s", 0.0) + summary["time_to_first_step_s"]


def training_seconds(row: dict) -> float:
  """An epoch's wall time in training: its steps and its waits for compiles (rows written before
  `compile_wait_s` existed counted the waits in `epoch_time_s`)."""
  return row["epoch_time_s"] + row.get("compile_wait_s", 0.0)


def run_row(run: dict, baseline: dict, devices: int, strategy: str) -> dict:
  """One table row, from a run's files and its baseline's (`none` at the same device count)."""
  summary, history = run["summary"], run["history"]
  median_epoch = statistics.median(row["epoch_time_s"] for row in history)
  baseline_epoch = statistics.median(row["epoch_time_s"] for row in baseline["history"])
  best = summary["best_epoch"]
  start = startup_seconds(summary)
  wall_to_best = start + sum(training_seconds(row) for row in history[: best + 1])
  target = baseline["summary"]["best_val_loss"]
  reached = next((row["epoch"] for row in history if row["val_loss"] <= target), None)
  wall_to_target = (
    "-"
    if reached is None
    else f"{start + sum(training_seconds(r) for r in history[: reached + 1]):.1f}"
  )
  ideal = (
    baseline["plan"]["padded_timesteps_with_filler"] / run["plan"]["padded_timesteps_with_filler"]
  )
  return {
    "devices": str(devices),
    "strategy": strategy,
    "buckets": str(summary["num_buckets"]),
    "upper bounds": " ".join(str(bound) for bound in summary["upper_bounds"]),
    "median epoch (s)": f"{median_epoch:.2f}",
    "epochs to best": str(best + 1),
    "epochs run": str(summary["epochs"]),
    "wall to best (s)": f"{wall_to_best:.1f}",
    "epochs to baseline loss": "-" if reached is None else str(reached + 1),
    "wall to baseline loss (s)": wall_to_target,
    "best val loss": f"{summary['best_val_loss']:.3f}",
    "best val CER": f"{summary['best_val_cer']:.4f}",
    "compile (s)": f"{summary['compile_wall_s']:.1f}",
    "padding efficiency": f"{summary['efficiency']:.4f}",
    "speed-up": f"{baseline_epoch / median_epoch:.3f}",
    "ideal speed-up": f"{ideal:.3f}",
  }


def collect(
  args: argparse.Namespace, device_counts: list[int], budget: dict | None = None
) -> tuple[list[dict], dict, list[str]]:
  """Table rows, each finished run's files keyed by (devices, strategy, requested K), and the
  names of the runs that did not finish (a budget's runs that ran out of time)."""
  workdir = pathlib.Path(args.workdir)
  rows, runs, unfinished = [], {}, []
  for devices in device_counts:
    wanted = worker_runs(args, devices, budget)
    for strategy, num_buckets in wanted:
      run_dir = workdir / run_name(devices, strategy, num_buckets)
      if finished_run(run_dir):
        runs[devices, strategy, num_buckets] = read_table_run(run_dir, strategy)
      else:
        unfinished.append(run_name(devices, strategy, num_buckets))
    if (devices, "none", 1) not in runs:
      raise cli_errors.UsageError(f"the baseline {run_name(devices, 'none', 1)} did not finish")
    baseline = runs[devices, "none", 1]
    for strategy, num_buckets in wanted:
      if (devices, strategy, num_buckets) in runs:
        run = runs[devices, strategy, num_buckets]
        rows.append(run_row(run, baseline, devices, strategy))
  return rows, runs, unfinished


def speedup_curves(rows: list[dict]) -> list[dict]:
  """The speed-up figure's lines, one per strategy and device count, from the table's rows.

  `quantile` and `optimal` curves start at K = 1 with the `none` run of their device count,
  which both strategies reduce to; `auto` chooses its own K and is one point.
  """
  groups = {}
  for row in rows:
    groups.setdefault((row["strategy"], row["devices"]), []).append(row)
  baselines = {
    devices: group[0] for (strategy, devices), group in groups.items() if strategy == "none"
  }
  curves = []
  for (strategy, devices), group in groups.items():
    if strategy in ("quantile", "optimal"):
      group = [baselines[devices], *group]
    curves.append(
      {
        "strategy": strategy,
        "label": f"{strategy}, {devices} device(s)",
        "buckets": [int(row["buckets"]) for row in group],
        "epoch_times": [float(row["median epoch (s)"]) for row in group],
        "speedups": [float(row["speed-up"]) for row in group],
        "ideal_speedups": [float(row["ideal speed-up"]) for row in group],
      }
    )
  return curves


def plot(runs: dict, rows: list[dict], prefix: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(8, 5))
  for (devices, strategy, _), run in runs.items():
    start = startup_seconds(run["summary"])
    wall = start + np.cumsum([training_seconds(row) for row in run["history"]])
    label = f"{strategy} K={run['summary']['num_buckets']}, {devices} device(s)"
    style = "k-" if strategy == "none" else "-"
    axes.plot(wall, [row["val_loss"] for row in run["history"]], style, marker="o", label=label)
  axes.set_xlabel("wall time: start-up compile + training (s)")
  axes.set_ylabel("validation loss (CTC)")
  axes.set_title("Validation loss against wall time")
  axes.legend(fontsize="small")
  figure.tight_layout()
  figure.savefig(f"{prefix}_val_loss.png", dpi=120)
  plt.close(figure)

  figure, (time_axes, speed_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
  for curve in speedup_curves(rows):
    marker = "*" if curve["strategy"] == "auto" else "o"
    time_axes.plot(curve["buckets"], curve["epoch_times"], marker=marker, label=curve["label"])
    line = speed_axes.plot(
      curve["buckets"], curve["speedups"], marker=marker, label=curve["label"]
    )[0]
    speed_axes.plot(
      curve["buckets"],
      curve["ideal_speedups"],
      "--",
      color=line.get_color(),
      label=f"ideal (padded timesteps), {curve['label']}",
    )
  time_axes.set_xlabel("buckets K")
  time_axes.set_ylabel("median epoch time (s)")
  speed_axes.set_xlabel("buckets K")
  speed_axes.set_ylabel("speed-up against no bucketing")
  time_axes.legend(fontsize="small")
  speed_axes.legend(fontsize="x-small")
  figure.tight_layout()
  figure.savefig(f"{prefix}_speedup.png", dpi=120)
  plt.close(figure)


def write_report(
  args: argparse.Namespace,
  argv: list[str],
  device_counts: list[int],
  loads: tuple[float, float],
  seconds: float,
  budget: dict | None = None,
) -> pathlib.Path:
  """Writes the `.md`, `.csv` and PNGs next to `args.out`, once every file they come from has
  been read: a damaged one leaves no report half written; returns the Markdown path."""
  rows, runs, unfinished = collect(args, device_counts, budget)
  prefix = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "paper_table"
  config = args_config(args)
  machine = cli_errors.read_json_object(
    pathlib.Path(args.workdir) / f"devices{device_counts[0]}" / "machine.json",
    ("machine", "jax"),
    "the record a worker of experiments.paper writes there",
  )
  baseline = runs[device_counts[0], "none", 1]
  model = config.model
  command = reporting.command_line("experiments.paper", argv)
  report = [
    "# The paper table: no bucketing against K buckets",
    "",
    f"Machine: {machine['machine']}; jax {machine['jax']}.",
    f"Date: {datetime.date.today().isoformat()}. Command: `{command}`.",
    f"1-minute load average {loads[0]:.2f} before and {loads[1]:.2f} after the sweep, on "
    f"{os.cpu_count()} cores (a load above the core count means other processes shared the CPU); "
    f"this invocation took {seconds / 60:.1f} min (runs finished by an earlier one are reused).",
    f"Data: `{config.data.dataset}`, {baseline['plan']['num_examples']} training sequences "
    f"(limit {config.data.train_limit or 'none'}), validation on `{config.data.eval_split}` "
    f"(limit {config.data.eval_limit or 'none'}), resample spacing "
    f"{config.data.features.resample_spacing}. Model: {model.num_layers} x {model.hidden_size} "
    f"{'B' if model.bidirectional else ''}LSTM-CTC, batch {config.bucketing.batch_size} "
    f"sequences, lr {config.optimizer.learning_rate}, seed {config.seed}; "
    f"{config.num_epochs} epochs at most, patience {config.patience}.{auto_cost_text(runs)}",
    "",
    "Speed-up: the `none` run's median epoch time over the run's (same device count). Ideal "
    "speed-up: its padded timesteps (filler rows included) over the run's. Wall to best: "
    "`auto`'s measuring of its cost model, time to the first train step, then training time "
    "(waits for later compiles included) up to the best validation loss (evaluation "
    "excluded). Median epoch: training only. Compile: wall time from the first step compile's "
    "start to the last one's end, overlapping the first epoch. "
    "To baseline loss: the same up to the first epoch whose validation loss is at or below the "
    "`none` run's best, the paper's comparison at equal loss ('-': never reached). "
    "Upper bounds: the buckets' length bounds (feature frames).",
    *budget_lines(budget, unfinished),
    "",
    *reporting.markdown_table(rows, COLUMNS),
    "",
    f"![validation loss against wall time]({prefix.name}_val_loss.png)",
    f"![epoch time and speed-up against K]({prefix.name}_speedup.png)",
    "",
  ]
  reporting.write_csv(f"{prefix}.csv", rows, COLUMNS)
  plot(runs, rows, prefix)
  path = pathlib.Path(f"{prefix}.md")
  path.write_text("\n".join(report))
  return path


def budget_lines(budget: dict | None, unfinished: list[str]) -> list[str]:
  """The report's paragraph on the time budget: what was planned, and what was left out."""
  if budget is None:
    return []
  planned = sum(budget["estimates"][run_name(*run)] for run in budget["runs"])
  probing = f"Probing the baseline and the largest K for {PROBE_EPOCHS} epochs each took"
  if budget.get("probed_by_earlier_start_s") is not None:
    measured = f"{probing} {budget['probed_by_earlier_start_s'] / 60:.1f} min (an earlier start)"
  elif budget.get("estimates_from"):
    measured = f"Estimates from an earlier probe (`{budget['estimates_from']}`)"
  else:
    measured = f"{probing} {budget['probe_s'] / 60:.1f} min"
  reused = budget.get("reused") or []
  still = f" for the {len(budget['runs']) - len(reused)} still to train" if reused else ""
  earlier = f" Finished by an earlier start and reused: {', '.join(reused)}." if reused else ""
  return [
    "",
    f"Time budget: {budget['budget_minutes']:g} min (`--budget-minutes`). {measured}; "
    f"the plan kept {len(budget['runs'])} run(s) of {budget['epochs']} epochs each, estimated at "
    f"{planned / 60:.1f} min{still}.{earlier} Left out by the plan (priority order: baseline, "
    f"`optimal` by K, `auto`, `quantile` by K): {', '.join(budget['left_out']) or 'none'}. Left "
    f"out when the time ran short: {', '.join(unfinished) or 'none'}.",
  ]


def strategy_and_buckets(text: str) -> tuple[str, int]:
  """A worker's run, `STRATEGY:K`."""
  strategy, num_buckets = text.split(":")
  return strategy, int(num_buckets)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = cli_errors.ArgumentParser(description=__doc__)
  preset = parser.add_mutually_exclusive_group()
  preset.add_argument("--gpu", action="store_true", help="IAM-OnDB in one 10-minute GPU call")
  preset.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
  preset.add_argument("--tiny", action="store_true", help="seconds; the tests' preset")
  parser.add_argument("--workdir", default="/tmp/paper")
  parser.add_argument("--out", default=None, help="path prefix of the table and plots")
  parser.add_argument("--dataset", choices=("auto", "iam_ondb", "synthetic"), default="auto")
  parser.add_argument("--data-dir", default=None, help="holds iam_ondb.npz or the TFDS build")
  parser.add_argument("--buckets", type=cli_errors.positive_int_list, help="comma-separated K list")
  parser.add_argument("--strategies", default=",".join(STRATEGIES))
  parser.add_argument(
    "--devices", type=cli_errors.positive_int_list, help="comma-separated device counts"
  )
  parser.add_argument(
    "--epochs", type=cli_errors.non_negative_int, default=0, help="override config.num_epochs"
  )
  parser.add_argument(
    "--cost",
    default=None,
    help="alpha,beta,kappa[,gamma] for auto, in seconds (gamma 0 when left out; default: measured)",
  )
  parser.add_argument(
    "--budget-minutes",
    type=cli_errors.non_negative_float,
    default=0,
    help="plan the sweep to fit this wall time (0: no budget)",
  )
  parser.add_argument(
    "--min-epochs",
    type=cli_errors.non_negative_int,
    default=0,
    help="with a budget: fewest epochs (default: all)",
  )
  parser.add_argument("--estimates", default=None, help="with a budget: an earlier probe.json")
  parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--worker-run", type=strategy_and_buckets, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.preset = next(
    (preset for preset in ("gpu", "quick", "tiny") if getattr(args, preset)), "full"
  )
  if not args.budget_minutes and (args.min_epochs or args.estimates):
    parser.error("--min-epochs and --estimates plan a budget: give --budget-minutes too")
  default_buckets = PRESET_BUCKETS[args.preset]
  args.buckets = args.buckets or default_buckets
  args.strategies = args.strategies.split(",")
  unknown = set(args.strategies) - set(STRATEGIES)
  if unknown:
    parser.error(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES}")
  if args.cost is not None:
    try:
      cost = [float(value) for value in args.cost.split(",")]
    except ValueError:
      cost = []
    if len(cost) not in (3, 4):
      parser.error(f"--cost {args.cost!r} is not three or four numbers alpha,beta,kappa[,gamma]")
    try:
      bucketing.CostModel(*cost)
    except ValueError as error:
      parser.error(f"--cost {args.cost!r}: {error}")
  return args


def main(argv: list[str] | None = None) -> pathlib.Path | int | None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker_devices:
    return run_worker(args, args.worker_devices)
  config = args_config(args)  # a --data-dir without IAM-OnDB ends the command before anything runs
  if args.devices:
    device_counts = args.devices
    for devices in device_counts:
      if why := batch_mismatch(config, devices):
        raise cli_errors.UsageError(f"--devices {devices}: {why}")
  else:
    device_counts = default_device_counts(config, available_devices())
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  budget = plan_sweep(args, argv, device_counts, start) if args.budget_minutes else None
  worker_argv = argv
  if budget:
    worker_argv = [*argv, "--epochs", str(budget["epochs"])]
    args = parse_args(worker_argv)
    device_counts = sorted({devices for devices, _, _ in budget["runs"]})
  check_run_settings(args, device_counts, budget)  # finished runs are reused
  if budget:
    (pathlib.Path(args.workdir) / "budget.json").write_text(json.dumps(budget, indent=2))
  interrupted = not train_runs(args, worker_argv, device_counts, budget)
  if interrupted:
    workdir = pathlib.Path(args.workdir)
    if not all(finished_run(workdir / run_name(devices, "none", 1)) for devices in device_counts):
      raise cli_errors.Interrupted(
        "interrupted before the baseline (no bucketing) finished: no report; the same command "
        "resumes the sweep"
      )
    print("interrupted: the report covers the runs that finished", flush=True)
  loads = (load_before, os.getloadavg()[0])
  path = write_report(args, argv, device_counts, loads, time.perf_counter() - start, budget)
  print(f"wrote {path}")
  return 128 + signal.SIGINT if interrupted else path  # a scheduler sees the sweep unfinished


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
