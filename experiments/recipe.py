"""The accuracy recipe: candidate settings compared by validation CER against wall time.

    python -m experiments.recipe --preset quick --data-dir /tmp/iamdata --minutes-per-run 3.5 \\
      --candidates base,raw_points,hidden_128,layers_3,dropout_0,constant_lr,tokens_8192 \\
      --set base_rerun:seed=0 --out experiments/results/recipe_quick_cpu    # 8 x 3.5 min
    python -m experiments.recipe --preset full --data-dir DIR --minutes-per-run 2.5 \\
      --base bucketing.num_buckets=2,data.features.resample_spacing=0.2 \\
      --candidates base,tokens_27648                                   # one 10-minute GPU call
    python -m experiments.recipe --preset tiny --dataset synthetic --candidates base,dropout_0 \\
      --minutes-per-run 0.5 --workdir /tmp/recipe-tiny                     # a minute; the tests'

Every candidate is the preset's config (`paper.make_config`: `full` is `experiments/iam.py`) with
a few fields changed, trained with the same seed for the same wall time, `--minutes-per-run`
(`config.max_minutes`, which counts from the run's start: loading data, compiling, training and
validating every epoch), with no early stopping: at equal minutes the lowest validation CER wins.
The candidates are named (`named_candidate`): `base`, `raw_points` (no resampling),
`constant_lr` (no cosine decay after the warm-up), and families `<name>_<value>`: `resample_0.1`,
`hidden_128`, `layers_3`, `dropout_0.3`, `lr_3e-3`, `batch_32`, `tokens_8192`
(`bucketing.max_tokens`, a padded-token budget per step, with `batch_size` 0). `--set
NAME:model.hidden_size=96,optimizer.learning_rate=3e-3` adds a candidate of any fields, and
`--base FIELD=VALUE,...` changes the preset for all of them (each value parses as train.py's
`--config.FIELD=VALUE` does, by the field's type: `experiments.cli.override`; a misspelt or mistyped
field is a one-line error, exit code 2, before anything runs). `--dataset auto`, the default, is
`paper.make_config`'s: IAM-OnDB from `--data-dir` (a folder without it is such an error, unless
`IAM_ONDB_DIR` names the download to build it there from), without one only with `IAM_ONDB_DIR`,
else the synthetic set.

Learning-rate rule for `batch_<n>` and `tokens_<n>`: the learning-rate part of the square-root
rule for Adam (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms",
NeurIPS 2022, which also rescales Adam's betas and epsilon; these stay): the base learning rate
times sqrt(S / B), S the candidate's training sequences per step (its plan's sequences over steps
per epoch: a token budget puts many short lines or few long ones in a step), B the base's batch
size, so the base must have a fixed one. Other candidates keep their learning rate.

The cosine schedule decays over the run's epochs, so a candidate's epoch count must be the number
that fits its budget. A probe measures it: one epoch with every step compiled first
(`compile_mode="parallel"`), in `<workdir>/<name>/probe/`; its wall time less the epoch (training
and validation) is the fixed cost. The run then trains the epochs that fill `PLAN_SHARE` of the
budget; one slower than its probe stops at the budget with a checkpoint (`config.max_minutes`),
keeping its finished epochs. Every run compiles cold (persistent cache off), as on a fresh
machine, and runs on one device in a process of its own (`--worker`), which is also what keeps
this process free of JAX until the report. The test split (IAM-OnDB-t1 `testset_f`, all of it) is
scored after training, outside the budget, on the best checkpoint by validation CER (the runs
set `selection_metric="val_cer"`: the table ranks them by it, and a CTC model's validation loss
can rise for many epochs while its CER still falls): of the winner (`--test winner`, the default),
of every candidate (`all`) or of none.

Writes, next to `--out` (default `<workdir>/recipe`): `.md` and `.csv` (one row per candidate)
and `_val_cer.png` (validation CER against wall time). Wall time is the run's clock: from the start
of compiling to the end of each epoch's validation (data loading and checkpoint writes are left
out; they are in the run's total, its own column). A finished run is reused when the same command
is started again in the same workdir; one cut short (a kill, Ctrl-C) is trained again from the
start, since its budget cannot be split across starts. Interrupted, the study reports the
candidates that finished (none: one line) and exits with code 130. A workdir holding a finished
candidate of the same name with other settings is refused: use a new workdir after changing any
setting. An unfinished one (cut short, or refused because one epoch did not fit its budget) starts
over with the new settings, so a larger `--minutes-per-run` needs no new workdir.

Measured: the first command above on IAM-OnDB on a 2-core CPU with nothing else running
(`experiments/results/recipe_quick_cpu.md`): the same configuration twice (`base`,
`base_rerun`) ended 0.006 apart in validation CER (0.235, 0.229), so a constant learning rate after
the warm-up (0.231) and no dropout (0.242) were within a run's noise of the base; hidden 128
(0.264), a token budget of 8,192 with the square-root rule (0.269), 3 layers (0.312) and raw points
(0.541) learned less per CPU-minute. The winner's test CER on all 3,859 `testset_f` lines, greedy:
0.143. A 1,000-line study at 3.5 CPU-minutes per run says what learns fastest per CPU-minute at
small scale; its choices on all the training lines at width 128 for 90 minutes
(`experiments/results/recipe_full_cpu.md`, one candidate) reached a test CER of 0.074 with the
run's last state (0.083 with its epoch of lowest validation loss, which that run kept). What a
GPU's minutes buy (width, depth, token budgets) needs the full-size study on a GPU, where each
run pays its cold compile (101 s for K = 8 on an H200 host,
results/benchmark_step_gpu_defaults.md) twice: in its probe and in its budget, hence the
`--base bucketing.num_buckets=2` of the GPU command (an estimate, not yet run: per candidate
about a minute of start-up, compiling and probing plus its 2.5 minutes, then the winner's test
split: about 8 minutes).
"""

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np

import cli_errors
from experiments import cli, paper, reporting

PRESETS = ("full", "quick", "tiny")
TEST_SPLIT = "test"  # IAM-OnDB-t1's testset_f
MAX_EPOCHS = 10_000  # the budget ends a run, not an epoch count
PLAN_SHARE = 0.95  # of the budget the planned epochs fill: a run a little slower still ends in time
BUDGET_FRACTIONS = (0.25, 0.5)  # where the table compares runs at equal time (best: at 100%)
FIXED_CANDIDATES = {
  "base": {},
  "raw_points": {"data.features.resample_spacing": None},
  "constant_lr": {"optimizer.schedule": "constant"},
}
# `<family>_<value>`: the fields a value sets.
_integer, _number = cli_errors.integer, cli_errors.number
FAMILIES = {
  "resample": lambda value: {"data.features.resample_spacing": _number(value)},
  "hidden": lambda value: {"model.hidden_size": _integer(value)},
  "layers": lambda value: {"model.num_layers": _integer(value)},
  "dropout": lambda value: {"model.dropout_rate": _number(value)},
  "lr": lambda value: {"optimizer.learning_rate": _number(value)},
  "batch": lambda value: {"bucketing.batch_size": _integer(value), "bucketing.max_tokens": 0},
  "tokens": lambda value: {"bucketing.max_tokens": _integer(value), "bucketing.batch_size": 0},
}
LR_SCALED_FAMILIES = ("batch", "tokens")  # the square-root rule
COLUMNS = (
  "candidate",
  "changes",
  "learning rate",
  "sequences per step",
  "probe epoch (s)",
  "epochs (planned)",
  "ended by",
  "run wall (s)",
  "load",
  "best val CER",
  "at (s)",
  "best val loss",
  *(f"val CER at {fraction:.0%}" for fraction in BUDGET_FRACTIONS),
  "test CER",
)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A name and the config fields it changes on top of the preset's base: a built-in
  candidate's values by dotted path, a `--set` one's `field=value` text as the command gave it."""

  name: str
  overrides: dict
  assignments: tuple[str, ...] = ()
  scale_lr: bool = False  # the square-root rule, applied once the plan is known

  def changes(self) -> str:
    fields = [f"{field}={value}" for field, value in self.overrides.items()]
    text = ", ".join([*fields, *self.assignments])
    rule = "lr x sqrt(S / B)" if self.scale_lr else ""
    return "; ".join(part for part in (text, rule) if part) or "none (the preset)"


def check_folder_name(name: str, flag: str) -> None:
  """Refuses a candidate name that is not a plain folder name (letters, digits and `_.+-`, not
  `.` or `..`): its files go in `<workdir>/<name>/`, which must stay inside the workdir."""
  if name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
    raise cli_errors.UsageError(
      f"{flag}: candidate name {name!r} is not a folder name; use letters, digits and _.+- "
      "(not . or .. alone)"
    )


def named_candidate(name: str) -> Candidate:
  """A candidate by name: one of `FIXED_CANDIDATES`, or `<family>_<value>` of `FAMILIES`."""
  check_folder_name(name, "--candidates")
  if name in FIXED_CANDIDATES:
    return Candidate(name, FIXED_CANDIDATES[name])
  family, _, value = name.rpartition("_")
  if family not in FAMILIES:
    known = [*FIXED_CANDIDATES, *(f"{family}_<value>" for family in FAMILIES)]
    raise cli_errors.UsageError(
      f"unknown candidate {name!r}; known: {', '.join(known)}; or define one with --set"
    )
  try:
    overrides = FAMILIES[family](value)
  except argparse.ArgumentTypeError as error:
    raise cli_errors.UsageError(f"candidate {name!r}: {error}") from None
  return Candidate(name, overrides, scale_lr=family in LR_SCALED_FAMILIES)


def parse_assignments(text: str, where: str) -> tuple[str, ...]:
  """`field=value,field=value` as its assignments; the config parses their values."""
  assignments = []
  for assignment in text.split(","):
    field, equals, value = assignment.partition("=")
    if not equals or not field.strip():
      raise cli_errors.UsageError(f"{where}: {assignment!r} is not field=value")
    assignments.append(f"{field.strip()}={value.strip()}")
  return tuple(assignments)


def parse_set(text: str) -> Candidate:
  """`NAME:field=value,field=value` as a candidate."""
  name, colon, assignments = text.partition(":")
  if not colon or not name or not assignments:
    raise cli_errors.UsageError(f"--set {text!r}: expected NAME:field=value[,field=value...]")
  check_folder_name(name, f"--set {text!r}")
  return Candidate(name, {}, parse_assignments(assignments, f"--set {text!r}"))


def resolve_candidates(args: argparse.Namespace) -> list[Candidate]:
  """The `--candidates` by name, then the `--set` ones; names must be unique and file-safe."""
  named = [named_candidate(name) for name in args.candidates.split(",")] if args.candidates else []
  added = [parse_set(text) for text in args.set]
  for candidate in added:
    if candidate.name in FIXED_CANDIDATES or candidate.name.rpartition("_")[0] in FAMILIES:
      raise cli_errors.UsageError(
        f"--set {candidate.name}: the name of a built-in candidate; choose another name"
      )
  candidates = named + added
  if not candidates:
    raise cli_errors.UsageError("no candidates: pass --candidates NAME,... or --set NAME:...")
  names = [candidate.name for candidate in candidates]
  for name in names:
    if names.count(name) > 1:
      raise cli_errors.UsageError(f"candidate {name!r} is given twice")
  return candidates


# ---------------------------------------------------------------------------------------------
# Configs.


def base_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The preset's config with `--base` as every candidate starts from it (epochs and budget
  come later)."""
  config = paper.make_config(args.preset, args.dataset, args.data_dir)
  if args.preset == "quick":
    # K = 2 reached the 1-bucket baseline's best loss first; K = 4 spent 62 s compiling
    # (results/paper_quick_cpu.md), a quarter of a 4-minute budget.
    config.bucketing.num_buckets = 2
  config.data.test_split = None  # scored after training, outside the budget
  config.selection_metric = "val_cer"  # what the table ranks by picks the tested parameters
  config.compilation_cache_dir = ""  # cold, as on a fresh machine: times that repeat
  base = parse_assignments(args.base, "--base") if args.base else ()
  return cli.override(config, base, "--base")


def candidate_config(
  base: ml_collections.ConfigDict, candidate: Candidate
) -> ml_collections.ConfigDict:
  """The locked config of `candidate`: its built-in fields, then its `--set` assignments."""
  config = copy.deepcopy(base)  # keeps the field references, which `cli.override` needs
  config.update_from_flattened_dict(candidate.overrides)
  return cli.override(config, candidate.assignments, f"candidate {candidate.name!r}")


def sequences_per_step(plan_summary: dict) -> float:
  """Training sequences per global step over an epoch (filler rows not counted)."""
  return plan_summary["num_examples"] / sum(plan_summary["steps_per_epoch"])


def scaled_learning_rate(base: ml_collections.ConfigDict, plan_summary: dict) -> float:
  """The square-root rule: the base learning rate times sqrt(S / B) (see the docstring)."""
  ratio = sequences_per_step(plan_summary) / base.bucketing.batch_size
  return base.optimizer.learning_rate * math.sqrt(ratio)


def planned_epochs(fixed_s: float, epoch_s: float, budget_s: float) -> int:
  """The epochs that fill `PLAN_SHARE` of the budget after the fixed cost (0: not one fits)."""
  return max(0, min(MAX_EPOCHS, math.floor((PLAN_SHARE * budget_s - fixed_s) / epoch_s)))


# ---------------------------------------------------------------------------------------------
# The workers: a candidate's probe and run, or its test score, in a process of their own.


def run_worker(args: argparse.Namespace, phase: str, name: str) -> int:
  """Trains (`phase` "train": probe, then the run) or tests one candidate; the exit code, 130 or
  143 when SIGINT or SIGTERM stopped its training, for the parent to stop and report."""
  from absl import logging as absl_logging

  import train

  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's INFO lines
  base = base_config(args)
  candidate = next(c for c in resolve_candidates(args) if c.name == name)
  config = candidate_config(base, candidate)
  candidate_dir = pathlib.Path(args.workdir) / name
  if phase == "test":
    config.data.eval_limit = 0  # the whole split
    scores = train.evaluate_checkpoint(config, candidate_dir / "train", TEST_SPLIT)
    (candidate_dir / "test.json").write_text(json.dumps(scores, indent=2))
    log(f"{name}: test CER {scores['cer']:.4f} on {TEST_SPLIT}")
    return 0
  schedule_path = candidate_dir / "schedule.json"
  if not schedule_path.is_file():
    code = probe(args, base, candidate, config, candidate_dir / "probe", schedule_path)
    if code is not None:  # stopped by a signal
      return code
  schedule = read_schedule(schedule_path)
  config.num_epochs = config.patience = schedule["planned_epochs"]
  config.optimizer.learning_rate = schedule["learning_rate"]
  config.max_minutes = args.minutes_per_run
  run_dir = candidate_dir / "train"
  shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
  load_before, start = os.getloadavg()[0], time.perf_counter()
  summary = train.train_and_evaluate(config, run_dir)
  wall = time.perf_counter() - start
  if code := paper.signal_exit_code(name, summary, log):  # trained again from its start
    return code
  ended_by = "budget" if summary["stopped_by"] else "epochs"
  result = {"wall_s": wall, "ended_by": ended_by, "load": [load_before, os.getloadavg()[0]]}
  (candidate_dir / "result.json").write_text(json.dumps(result))
  log(
    f"{name}: {summary['epochs']} epochs in {wall:.0f} s (ended by {ended_by}), best val CER "
    f"{min((row['val_cer'] for row in read_run(run_dir)['history']), default=math.nan):.4f}"
  )
  return 0


def probe(
  args, base, candidate: Candidate, config, probe_dir: pathlib.Path, schedule_path: pathlib.Path
) -> int | None:
  """Trains one epoch of the candidate and writes to `schedule_path` the fixed cost and epoch
  time that plan its run; the exit code instead when a signal stopped it
  (`paper.signal_exit_code`)."""
  import train

  config = config.copy_and_resolve_references()
  config.num_epochs = config.patience = 1
  config.compile_mode = "parallel"  # everything compiled before the first step: a clean epoch
  config.max_minutes = args.minutes_per_run
  shutil.rmtree(probe_dir, ignore_errors=True)
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, probe_dir)
  wall = time.perf_counter() - start
  if code := paper.signal_exit_code(candidate.name, summary, log):
    return code
  run = read_run(probe_dir)
  if summary["stopped_by"] or not run["history"]:
    raise cli_errors.UsageError(
      f"{candidate.name}: one epoch does not fit in --minutes-per-run {args.minutes_per_run:g}"
    )
  epoch_s = run["history"][0]["epoch_time_s"] + run["history"][0]["eval_time_s"]
  fixed_s = wall - epoch_s  # loading, compiling and waiting for compiles
  epochs = planned_epochs(fixed_s, epoch_s, args.minutes_per_run * 60)
  if not epochs:
    raise cli_errors.UsageError(
      f"{candidate.name}: set-up {fixed_s:.0f} s and one epoch {epoch_s:.0f} s do not fit in "
      f"--minutes-per-run {args.minutes_per_run:g}"
    )
  learning_rate = config.optimizer.learning_rate
  if candidate.scale_lr:
    learning_rate = scaled_learning_rate(base, run["plan"])
  log(
    f"{candidate.name}: probe {wall:.0f} s: set-up {fixed_s:.0f} s, epoch {epoch_s:.1f} s; "
    f"{epochs} epochs planned, lr {learning_rate:.3g}"
  )
  schedule = {
    "probe_wall_s": wall,
    "fixed_s": fixed_s,
    "epoch_s": epoch_s,
    "planned_epochs": epochs,
    "sequences_per_step": sequences_per_step(run["plan"]),
    "learning_rate": learning_rate,
  }
  schedule_path.write_text(json.dumps(schedule, indent=2))
  return None


def log(line: str) -> None:
  """Progress on stderr: stdout carries only the result (JSON with `--json`)."""
  print(line, file=sys.stderr, flush=True)


def run_worker_process(argv: list[str], phase: str, name: str) -> bool:
  """Runs the candidate's `phase` worker to its end; False when it was interrupted."""
  return paper.run_worker_command(
    [sys.executable, "-m", "experiments.recipe", *argv, "--worker", f"{phase}:{name}"],
    paper.worker_env(1),
    f"the {phase} worker of candidate {name!r}",
    stdout=subprocess.DEVNULL,
  )


CANDIDATE_FILE = "candidate.json"  # a candidate's settings, in its folder
# What the recipe reads back of the files its workers wrote: a damaged or foreign one is a
# one-line error naming it, not a KeyError or TypeError where a field is used.
SCHEDULE_NUMBERS = ("planned_epochs", "learning_rate", "sequences_per_step", "epoch_s")
RESULT_KEYS = ("wall_s", "ended_by", "load")
RUN_SUMMARY_NUMBERS = ("time_to_first_step_s",)
RUN_PLAN_KEYS = ("num_examples", "steps_per_epoch")
EPOCH_NUMBERS = ("epoch_time_s", "eval_time_s", "val_loss", "val_cer")


def read_run(run_dir: pathlib.Path) -> dict:
  """A candidate's probe or run (`paper.read_run`) with what the recipe reads of it: its clock's
  start, its plan's size and every epoch's times and scores."""
  run = paper.read_run(run_dir, RUN_SUMMARY_NUMBERS, RUN_PLAN_KEYS, EPOCH_NUMBERS)
  paper.check_numbers(run_dir / "summary.json", run["summary"], RUN_SUMMARY_NUMBERS)
  return run


def read_schedule(path: pathlib.Path) -> dict:
  """A candidate's `schedule.json` (`probe` wrote it), whose numbers plan its run and fill its
  row; its epochs a whole number, as the config's `num_epochs` must be."""
  schedule = cli_errors.read_json_object(path, SCHEDULE_NUMBERS, "a recipe probe's schedule")
  paper.check_numbers(path, schedule, SCHEDULE_NUMBERS)
  return paper.check_numbers(path, schedule, ("planned_epochs",), int)


def read_result(path: pathlib.Path) -> dict:
  """A finished candidate's `result.json` (`run_worker` wrote it): its wall time, how it ended
  and the load averages at its start and end."""
  result = cli_errors.read_json_object(path, RESULT_KEYS, "a recipe run's result")
  paper.check_numbers(path, result, ("wall_s",))
  load = result["load"]
  if not (isinstance(load, list) and len(load) == 2 and all(map(paper.is_number, load))):
    raise ValueError(
      f"{path}: load is {json.dumps(load)}, not the load averages at the run's start and end"
    )
  return result


def read_test_cer(path: pathlib.Path) -> float:
  """A candidate's test CER, from the `test.json` its test worker wrote."""
  scores = cli_errors.read_json_object(path, ("cer",), "a recipe candidate's test scores")
  return paper.check_numbers(path, scores, ("cer",))["cer"]


# ---------------------------------------------------------------------------------------------
# The table and the plot.


def wall_clock(run: dict) -> np.ndarray:
  """Seconds from the start of compiling to the end of each epoch's validation."""
  history = run["history"]
  per_epoch = [paper.training_seconds(row) + row["eval_time_s"] for row in history]
  return run["summary"]["time_to_first_step_s"] + np.cumsum(per_epoch)


def candidate_row(candidate_dir: pathlib.Path, budget_s: float) -> dict:
  """One table row, every number read from the candidate's files."""
  settings = cli_errors.read_json_object(
    candidate_dir / CANDIDATE_FILE, ("changes",), "a recipe candidate's settings"
  )
  schedule = read_schedule(candidate_dir / "schedule.json")
  result = read_result(candidate_dir / "result.json")
  run = read_run(candidate_dir / "train")
  cer = np.array([row["val_cer"] for row in run["history"]], float)
  clock = wall_clock(run)
  test_path = candidate_dir / "test.json"
  row = {
    "candidate": candidate_dir.name,
    "changes": settings["changes"],
    "learning rate": f"{schedule['learning_rate']:.3g}",
    "sequences per step": f"{schedule['sequences_per_step']:.1f}",
    "probe epoch (s)": f"{schedule['epoch_s']:.1f}",
    "epochs (planned)": f"{len(cer)} ({schedule['planned_epochs']})",
    "ended by": result["ended_by"],
    "run wall (s)": f"{result['wall_s']:.0f}",
    "load": "{:.1f}-{:.1f}".format(*result["load"]),
    "best val CER": "-",
    "at (s)": "-",
    "best val loss": "-",
    "test CER": f"{read_test_cer(test_path):.4f}" if test_path.is_file() else "-",
  }
  for fraction in BUDGET_FRACTIONS:
    reached = cer[clock <= fraction * budget_s]
    row[f"val CER at {fraction:.0%}"] = f"{reached.min():.4f}" if reached.size else "-"
  if cer.size:
    best = int(np.argmin(cer))
    row["best val CER"], row["at (s)"] = f"{cer[best]:.4f}", f"{clock[best]:.0f}"
    row["best val loss"] = f"{min(r['val_loss'] for r in run['history']):.3f}"
  return row


def winner(rows: list[dict]) -> str | None:
  """The candidate with the lowest validation CER within the budget (None: no epoch ended)."""
  scored = [row for row in rows if row["best val CER"] != "-"]
  return min(scored, key=lambda row: float(row["best val CER"]))["candidate"] if scored else None


def plot(workdir: pathlib.Path, names: list[str], budget_s: float, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(8, 5))
  for name in names:
    run = read_run(workdir / name / "train")
    cer = [row["val_cer"] for row in run["history"]]
    axes.plot(wall_clock(run), cer, marker="o", markersize=3, label=name)
  axes.axvline(budget_s, color="gray", linestyle="--", label="budget")
  axes.set_xlim(0, 1.02 * budget_s)
  axes.set_ylim(0, 1.0)  # an untrained model's CER exceeds 1: it inserts characters
  axes.set_xlabel("wall time: compiling, training and validation (s)")
  axes.set_ylabel("validation CER (greedy)")
  axes.set_title("Validation CER against wall time, equal budgets")
  axes.legend(fontsize="small")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_report(
  args: argparse.Namespace,
  candidates: list[Candidate],
  record: reporting.RunRecord,
  best: str | None,
) -> tuple[pathlib.Path, list[dict]]:
  """Writes the `.md`, `.csv` and PNG next to `args.out`, once every file they come from has been
  read: a damaged one leaves no report half written; returns the Markdown path and rows."""
  workdir = pathlib.Path(args.workdir)
  budget_s = args.minutes_per_run * 60
  names = [candidate.name for candidate in candidates]
  rows = [candidate_row(workdir / name, budget_s) for name in names]
  prefix = pathlib.Path(args.out) if args.out else workdir / "recipe"
  config = base_config(args)
  model = config.model
  plan = read_run(workdir / names[0] / "train")["plan"]
  tested = [row["candidate"] for row in rows if row["test CER"] != "-"]
  report = [
    "# The accuracy recipe: candidates at equal wall time",
    "",
    *record.header(),
    f"Every run on one device, compiling cold (persistent cache off), {args.minutes_per_run:g} "
    f"min each (`--minutes-per-run`, counted from the run's start), no early stopping; runs "
    "finished by an earlier invocation are reused.",
    f"Base (`--preset {args.preset}`{f', `--base {args.base}`' if args.base else ''}): "
    f"`{config.data.dataset}`, {plan['num_examples']} training "
    f"lines (limit {config.data.train_limit or 'none'}), validation on `{config.data.eval_split}` "
    f"(limit {config.data.eval_limit or 'none'}), resample spacing "
    f"{config.data.features.resample_spacing}; {model.num_layers} x {model.hidden_size} "
    f"{'B' if model.bidirectional else ''}LSTM-CTC, dropout {model.dropout_rate}, "
    f"`{config.bucketing.strategy}` K = {config.bucketing.num_buckets}, batch "
    f"{config.bucketing.batch_size} sequences, Adam lr {config.optimizer.learning_rate:g} "
    f"({config.optimizer.warmup_steps} warm-up steps, then {config.optimizer.schedule} to the "
    f"planned last epoch), seed {config.seed}.",
    "",
    "Changes: the candidate's fields on top of the base. Learning rate: what the run used; "
    "`lr x sqrt(S / B)` is the square-root rule, S the sequences per step (the plan's "
    "training lines over its steps per epoch), B the base's batch size. Probe epoch: the "
    "one epoch of the candidate's probe, training and validation, all steps compiled first. "
    "Epochs (planned): "
    "validated epochs, and the epochs a one-epoch probe said fill "
    f"{PLAN_SHARE:.0%} of the budget (the cosine decays over them). Ended by: the planned "
    "epochs, or the budget (the unfinished epoch is lost). Wall time: the run's clock from the "
    "start of compiling to the end of an epoch's validation; run wall: the whole run, data "
    "loading and checkpoints included. Load: the 1-minute load average at the run's start and "
    f"end, on {os.cpu_count()} cores (above the core count, other processes shared the CPU and "
    "the run trained less than it would alone). Best val CER: the lowest measured, at that "
    "clock; val CER "
    "at x%: the lowest by x% of the budget ('-': no epoch had ended). Test CER: greedy, no "
    f"language model, on all of `{TEST_SPLIT}`, of the parameters with the best "
    f"`{config.selection_metric}` "
    f"(scored for: {', '.join(tested) or 'none'}; by this command, `--test {args.test}`, or an "
    "earlier one in the same workdir).",
    "",
    *reporting.markdown_table(rows, COLUMNS),
    "",
    f"Lowest validation CER within the budget: `{best}`.",
    "",
    f"![validation CER against wall time]({prefix.name}_val_cer.png)",
    "",
  ]
  reporting.write_csv(f"{prefix}.csv", rows, COLUMNS)
  plot(workdir, names, budget_s, f"{prefix}_val_cer.png")
  path = pathlib.Path(f"{prefix}.md")
  path.write_text("\n".join(report))
  return path, rows


# ---------------------------------------------------------------------------------------------
# The command line.


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--candidates", default="", help="comma-separated candidate names")
  parser.add_argument(
    "--set", action="append", default=[], metavar="NAME:FIELD=VALUE,...", help="a candidate"
  )
  parser.add_argument(
    "--minutes-per-run", type=cli_errors.positive_float, required=True, help="each run's budget"
  )
  parser.add_argument("--preset", choices=PRESETS, default="full")
  parser.add_argument(
    "--base", default="", metavar="FIELD=VALUE,...", help="change the preset for every candidate"
  )
  parser.add_argument("--dataset", choices=("auto", "iam_ondb", "synthetic"), default="auto")
  parser.add_argument("--data-dir", default=None, help="holds iam_ondb.npz or the TFDS build")
  parser.add_argument("--workdir", default="/tmp/recipe")
  parser.add_argument("--out", default=None, help="path prefix of the table and plot")
  parser.add_argument(
    "--test", choices=("winner", "all", "none"), default="winner", help="whose test CER to score"
  )
  parser.add_argument("--json", action="store_true", help="print only JSON on stdout")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  return args


def main(argv: list[str] | None = None) -> pathlib.Path | int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    phase, _, name = args.worker.partition(":")
    try:
      return run_worker(args, phase, name)
    except cli_errors.EXPECTED_ERRORS as error:  # its one line names the candidate
      raise cli_errors.UsageError(f"candidate {name!r}: {cli_errors.one_line(error)}") from error
  jax_version = importlib.metadata.version("jax")  # not importing JAX: the workers hold devices
  record = reporting.RunRecord("experiments.recipe", argv, f"jax {jax_version}")
  candidates = resolve_candidates(args)
  base = base_config(args)
  scaled = [c.name for c in candidates if c.scale_lr]
  if scaled and not base.bucketing.batch_size:
    raise cli_errors.UsageError(
      f"{', '.join(scaled)}: the learning-rate rule scales from the base's batch size, but the "
      "base has a token budget (bucketing.batch_size=0); use --set with a learning rate instead"
    )
  workdir = pathlib.Path(args.workdir)
  settings = {  # every candidate's config checked before any is written or trained
    candidate.name: {
      "changes": candidate.changes(),
      "minutes_per_run": args.minutes_per_run,
      "config": json.loads(candidate_config(base, candidate).to_json_best_effort()),
    }
    for candidate in candidates
  }
  # A finished run is reused, so its settings must be these; an unfinished one (a probe that
  # found its budget too short, a kill) starts over with them.
  restarted = []
  for name, candidate_settings in settings.items():
    try:
      cli.check_settings(workdir / name / CANDIDATE_FILE, candidate_settings, f"a run of {name!r}")
    except cli_errors.UsageError:
      if (workdir / name / "result.json").is_file():
        raise
      restarted.append(name)
  for name, candidate_settings in settings.items():  # all checked: a refusal records nothing
    if name in restarted:
      log(f"{name}: unfinished, with other settings before: starting it over with these")
      shutil.rmtree(workdir / name)
    cli.record_settings(workdir / name / CANDIDATE_FILE, candidate_settings)
  interrupted = False
  for candidate in candidates:
    done = (workdir / candidate.name / "result.json").is_file()
    if not done and not run_worker_process(argv, "train", candidate.name):
      interrupted = True
      break
  finished = [c for c in candidates if (workdir / c.name / "result.json").is_file()]
  if not finished:
    raise cli_errors.Interrupted("interrupted before any candidate finished: nothing to report")
  rows = [candidate_row(workdir / c.name, args.minutes_per_run * 60) for c in finished]
  best = winner(rows)
  tested = {"winner": [best] if best else [], "all": [c.name for c in finished], "none": []}
  for name in [] if interrupted else tested[args.test]:
    done = (workdir / name / "test.json").is_file()
    if not done and not run_worker_process(argv, "test", name):
      interrupted = True
      break
  if interrupted:
    log("interrupted: the report covers the candidates that finished")
  path, rows = write_report(args, finished, record, best)
  if args.json:
    print(json.dumps({"report": str(path), "winner": best, "rows": rows}, indent=2))
  else:
    print(f"wrote {path}; lowest validation CER: {best}")
  return 128 + signal.SIGINT if interrupted else path  # a scheduler sees the recipe unfinished


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
