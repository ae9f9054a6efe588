"""The paper-table sweep: every run has a complete row, and the table agrees with the run files.

One test (one sweep, ~40 s on 2 cores), so that pytest-xdist workers do not each run it.
"""

import contextlib
import csv
import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import hypothesis
import pytest
from hypothesis import strategies as st

import cli_errors
import train
from experiments import iam, paper

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_writes_a_complete_table_that_agrees_with_its_runs(tmp_path, monkeypatch):
  workers = []  # the runs of each worker process started

  def spy(argv, devices):
    workers.append((devices, [argv[i + 1] for i, arg in enumerate(argv) if arg == "--worker-run"]))
    return run_worker_process(argv, devices)

  run_worker_process = paper.run_worker_process
  monkeypatch.setattr(paper, "run_worker_process", spy)
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--buckets", "2", "--strategies", "none,optimal,auto", "--devices", "2"]
  markdown_path = paper.main(argv)
  # One fresh process per run (on 2 simulated devices), lest a run compile what an earlier one
  # left in the process faster.
  assert workers == [(2, ["none:1"]), (2, ["optimal:2"]), (2, ["auto:2"])]
  with open(tmp_path / "paper_table.csv", newline="") as file:
    rows = list(csv.DictReader(file))

  # Every run has a row with every column filled.
  assert [(row["devices"], row["strategy"]) for row in rows] == [
    ("2", "none"),
    ("2", "optimal"),
    ("2", "auto"),
  ]
  for row in rows:
    assert list(row) == list(paper.COLUMNS)
    assert all(value.strip() for value in row.values()), row
  assert rows[1]["buckets"] == "2"

  # The baseline's speed-ups are 1; efficiency and the ideal speed-up are the plans'.
  assert rows[0]["speed-up"] == rows[0]["ideal speed-up"] == "1.000"
  # The baseline reaches its own best loss at its best epoch.
  assert rows[0]["wall to baseline loss (s)"] == rows[0]["wall to best (s)"]
  assert rows[0]["epochs to baseline loss"] == rows[0]["epochs to best"]
  baseline_plan = json.loads((tmp_path / "devices2/none_k1/plan.json").read_text())
  for row, (strategy, k) in zip(rows, paper.planned_runs([2], ["optimal", "auto"]), strict=True):
    run_dir = tmp_path / paper.run_name(2, strategy, k)
    plan = json.loads((run_dir / "plan.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_devices"] == 2  # the worker really ran on 2 devices
    # compiled cold, not loaded from the steps of the same shapes that the baseline compiled
    assert summary["compilation_cache_hits"] == 0
    assert row["padding efficiency"] == f"{plan['efficiency_with_filler']:.4f}"
    ideal = baseline_plan["padded_timesteps_with_filler"] / plan["padded_timesteps_with_filler"]
    assert row["ideal speed-up"] == f"{ideal:.3f}"
    # Wall to best: start-up (auto's measuring, compiling up to the first step), then every epoch
    # through the best one, its waits for compiles included. Not bounded by the compile wall
    # time: that ends with the last eval step's compile, which may outlast the first epoch.
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = summary.get("cost_model_measure_s", 0.0) + summary["time_to_first_step_s"]
    trained = sum(
      epoch["epoch_time_s"] + epoch["compile_wait_s"]
      for epoch in epochs[: summary["best_epoch"] + 1]
    )
    assert float(row["wall to best (s)"]) == pytest.approx(start + trained, abs=0.05)

  # The Markdown table is the CSV; the header names machine, load and command; the plots exist.
  text = markdown_path.read_text()
  assert "Machine:" in text and "load average" in text and "python -m experiments.paper" in text
  table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
  assert cells[0] == list(paper.COLUMNS)
  assert cells[1:] == [list(row.values()) for row in rows]
  for suffix in ("_val_loss.png", "_speedup.png"):
    assert (tmp_path / f"paper_table{suffix}").read_bytes()[:4] == b"\x89PNG"

  # Running the sweep again reuses the finished runs instead of training them again.
  summary_path = tmp_path / "devices2/none_k1/summary.json"
  before = summary_path.stat().st_mtime_ns
  paper.main(argv)
  assert summary_path.stat().st_mtime_ns == before
  assert len(workers) == 3  # no process started for a finished run
  # ...but only under the settings they were trained with: a run of 2 epochs is no run of 3, and
  # the refusal names the run and what differs, and records nothing (quantile_k2 is new).
  more = [*argv, "--strategies", "none,optimal,auto,quantile"]
  with pytest.raises(
    cli_errors.UsageError,
    match=r"devices2/none_k1 holds a run with other settings \(config.num_epochs=2 there, 3 here",
  ):
    paper.main([*more, "--epochs", "3"])
  assert not (tmp_path / "devices2/quantile_k2").exists()
  # A cost model changes only `auto`'s runs (the others' settings leave it out).
  with pytest.raises(cli_errors.UsageError, match=r"devices2/auto_k2 .*config.bucketing.gamma"):
    paper.main([*argv, "--strategies", "auto", "--cost", "0.01,2e-7,5,3e-5"])
  assert summary_path.stat().st_mtime_ns == before
  # A run from before settings.json is checked against the trainer's config.json instead...
  settings_path = tmp_path / "devices2/none_k1/settings.json"
  settings_path.unlink()
  changed = r"config.num_epochs=2 there, 3 here.*config.json"
  with pytest.raises(cli_errors.UsageError, match=changed):
    paper.main([*more, "--epochs", "3"])
  paper.main(argv)
  assert summary_path.stat().st_mtime_ns == before and settings_path.is_file()
  # ...and one with neither record is not reused unchecked.
  settings_path.unlink()
  (tmp_path / "devices2/none_k1/config.json").unlink()
  with pytest.raises(cli_errors.UsageError, match="none_k1 holds a run with no record of its"):
    paper.main(argv)


def test_a_data_dir_without_iam_ondb_is_an_error_not_the_synthetic_set(
  tmp_path, capsys, monkeypatch
):
  monkeypatch.delenv("IAM_ONDB_DIR", raising=False)
  empty = str(tmp_path / "empty")
  argv = ["--tiny", "--data-dir", empty, "--workdir", str(tmp_path / "sweep"), "--devices", "1"]
  assert cli_errors.run(lambda: paper.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: --data-dir {empty} holds no IAM-OnDB (neither iam_ondb.npz")
  assert error.count("\n") == 1 and not (tmp_path / "sweep").exists()
  with pytest.raises(cli_errors.UsageError, match="holds no IAM-OnDB"):
    paper.make_config("tiny", "iam_ondb", empty)
  # IAM-OnDB there (an export, or a TFDS build's folder), or a download to build it from.
  (tmp_path / "exported").mkdir()
  (tmp_path / "exported" / "iam_ondb.npz").touch()
  (tmp_path / "built" / "iam_ondb").mkdir(parents=True)
  for folder in ("exported", "built"):
    assert paper.make_config("tiny", "auto", str(tmp_path / folder)).data.dataset == "iam_ondb"
  with pytest.raises(cli_errors.UsageError, match="with --dataset synthetic: the synthetic set"):
    paper.make_config("tiny", "synthetic", empty)
  monkeypatch.setenv("IAM_ONDB_DIR", str(tmp_path / "download"))
  assert paper.make_config("tiny", "auto", empty).data.dataset == "iam_ondb"
  # Without --data-dir, `auto` takes IAM-OnDB only when IAM_ONDB_DIR is set.
  assert paper.make_config("tiny", "auto").data.dataset == "iam_ondb"
  monkeypatch.delenv("IAM_ONDB_DIR")
  assert paper.make_config("tiny", "auto").data.dataset == "synthetic"


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--devices", "0"], "--devices: counts must be >= 1, got '0'"),
    (["--devices", "1,0"], "--devices: counts must be >= 1, got '1,0'"),
    (["--buckets", "2,0"], "--buckets: counts must be >= 1, got '2,0'"),
    (["--budget-minutes", "-5"], "--budget-minutes: must be a finite number >= 0, got '-5'"),
    (["--budget-minutes", "nan"], "--budget-minutes: must be a finite number >= 0, got 'nan'"),
    (["--epochs", "-1"], "--epochs: must be >= 0, got -1"),
    (["--min-epochs", "-2"], "--min-epochs: must be >= 0, got -2"),
    (["--min-epochs", "4"], "give --budget-minutes too"),  # else silently ignored
    (["--estimates", "probe.json"], "give --budget-minutes too"),
    (["--strategies", "none,optimal,bucketed"], r"unknown strategies \['bucketed'\]"),
  ],
)
def test_impossible_counts_are_refused_before_anything_runs(argv, message):
  with pytest.raises(cli_errors.UsageError, match=message):
    paper.parse_args(["--tiny", *argv])


@pytest.mark.parametrize(
  ("text", "message"),
  [
    (None, "cannot be read"),
    ("{\n", "not valid JSON"),
    ("[1, 2]", "not a JSON object, so not a probe of experiments.paper"),
    ('{"probes": []}', "no planned, so not a probe of experiments.paper"),
  ],
)
def test_a_damaged_or_foreign_estimates_file_is_named(tmp_path, text, message):
  path = tmp_path / "probe.json"
  if text is not None:
    path.write_text(text)
  with pytest.raises(cli_errors.UsageError, match=rf"{re.escape(str(path))}: {message}"):
    paper.read_probe(path)


def test_cost_takes_gamma_as_a_fourth_number():
  three = paper.make_config("tiny", "synthetic", cost="0.01,2e-7,5").bucketing
  four = paper.make_config("tiny", "synthetic", cost="0.01,2e-7,5,3e-5").bucketing
  assert (three.alpha, three.beta, three.kappa, three.gamma) == (0.01, 2e-7, 5.0, 0.0)
  assert (four.alpha, four.beta, four.kappa, four.gamma) == (0.01, 2e-7, 5.0, 3e-5)
  with pytest.raises(cli_errors.UsageError, match="three or four numbers"):
    paper.parse_args(["--cost", "1,2"])


def test_a_cost_model_the_planner_would_refuse_is_refused_with_its_flag():
  with pytest.raises(cli_errors.UsageError, match="--cost '-1,0,0': cost model alpha must be"):
    paper.parse_args(["--cost=-1,0,0"])


def test_a_device_count_the_batch_does_not_divide_is_refused_before_any_worker(tmp_path):
  workdir = tmp_path / "sweep"
  with pytest.raises(cli_errors.UsageError, match=r"--devices 3: config\.bucketing\.batch_size=8"):
    paper.main(["--tiny", "--devices", "1,3", "--workdir", str(workdir)])
  assert not workdir.exists()  # the one-device worker never started
  config = paper.make_config("tiny", "synthetic")
  config.bucketing.batch_size, config.bucketing.max_tokens = 0, 4000
  for devices in (1, 2, 4, 8):  # a token budget's batch sizes follow the devices
    assert paper.batch_mismatch(config, devices) is None
  assert paper.batch_mismatch(config, 3) == "config.eval_batch_size=8 is not a multiple of 3"


def test_device_counts_left_to_the_sweep_are_those_the_batch_allows(capsys):
  config = paper.make_config("quick", "synthetic")  # 16 lines a step, 40 an evaluation step
  assert paper.default_device_counts(config, 1) == [1]
  assert paper.default_device_counts(config, 7) == [1, 2, 4]
  capsys.readouterr()
  assert paper.default_device_counts(config, 32) == [1, 2, 4, 8]
  assert capsys.readouterr().out.splitlines() == [
    "left out 16 devices: config.eval_batch_size=40 is not a multiple of 16",
    "left out 32 devices: config.bucketing.batch_size=16 is not a multiple of 32",
  ]


@pytest.mark.parametrize(
  ("code", "own_line"), [(2, []), (1, ["error: the worker failed with exit code 1"])]
)
def test_a_failed_worker_is_reported_once(capfd, monkeypatch, code, own_line):
  # An expected error is the worker's one line (exit code 2); after anything else, such as a
  # bug's traceback, the parent adds a line naming the worker.
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  child = f"import sys; print('worker', file=sys.stderr); sys.exit({code})"
  command = [sys.executable, "-c", child]
  run = functools.partial(paper.run_worker_command, command, dict(os.environ), "the worker")
  assert cli_errors.run(run) == 2
  assert capfd.readouterr().err.splitlines() == ["worker", *own_line]


def test_the_gpu_preset_compares_equal_epochs_of_iam_gpus_features_up_to_four_buckets():
  args = paper.parse_args(["--gpu", "--dataset", "iam_ondb", "--budget-minutes", "9"])
  config = paper.args_config(args)  # IAM-OnDB's config; no data is read
  full = paper.make_config("full", "iam_ondb")
  assert args.preset == "gpu" and args.buckets == (1, 2, 4)
  assert config.patience == config.num_epochs  # no early stopping: every run trains as many
  assert config.data.features == iam.get_config("gpu").data.features != full.data.features
  assert config.model == full.model and config.bucketing.batch_size == 32  # the paper's batch
  assert config.data.test_split is None and full.data.test_split  # no run scores the test split
  train.validate_config(config, num_devices=1)
  with pytest.raises(cli_errors.UsageError, match="not allowed with"):
    paper.parse_args(["--gpu", "--quick"])


def test_epochs_keep_a_fixed_epoch_preset_fixed_and_the_full_presets_early_stopping():
  shortened = paper.make_config("gpu", "synthetic", epochs=3)
  assert shortened.num_epochs == shortened.patience == 3
  full = paper.make_config("full", "synthetic", epochs=7)
  assert full.num_epochs == 7 and full.patience == paper.make_config("full", "synthetic").patience


# ---------------------------------------------------------------------------------------------
# The time budget.

estimate_lists = st.lists(
  st.tuples(st.floats(0, 100), st.floats(0.01, 50)), min_size=1, max_size=8
).map(
  lambda pairs: [
    paper.RunEstimate(1, "optimal", k + 1, fixed, epoch) for k, (fixed, epoch) in enumerate(pairs)
  ]
)


@hypothesis.given(
  estimates=estimate_lists,
  budget_s=st.floats(0, 2000),
  max_epochs=st.integers(1, 60),
  min_epochs=st.integers(1, 10),
)
def test_budget_plan_never_exceeds_the_budget_and_drops_runs_from_the_end(
  estimates, budget_s, max_epochs, min_epochs
):
  if min_epochs > max_epochs:
    with pytest.raises(ValueError, match="min_epochs"):
      paper.plan_budget(estimates, budget_s, max_epochs, min_epochs)
    return
  kept, epochs = paper.plan_budget(estimates, budget_s, max_epochs, min_epochs)
  if not kept:
    assert epochs == 0
    assert estimates[0].seconds(min_epochs) > budget_s  # not even the first run fits
    return
  assert min_epochs <= epochs <= max_epochs
  assert sum(run.seconds(epochs) for run in kept) <= budget_s  # one epoch count for every run
  assert kept == estimates[: len(kept)]  # a prefix: runs are dropped from the end of the order
  if len(kept) < len(estimates):  # the next run in the order would not have fitted
    assert sum(run.seconds(min_epochs) for run in estimates[: len(kept) + 1]) > budget_s
  if epochs < max_epochs:  # one more epoch would not have fitted
    assert sum(run.seconds(epochs + 1) for run in kept) > budget_s


def test_budget_priority_baseline_then_optimal_then_auto_then_quantile():
  runs = [(1, "quantile", 2), (1, "auto", 4), (1, "optimal", 4), (1, "none", 1), (1, "optimal", 2)]
  assert paper.budget_priority(runs) == [
    (1, "none", 1),
    (1, "optimal", 2),
    (1, "optimal", 4),
    (1, "auto", 4),
    (1, "quantile", 2),
  ]


def test_estimates_interpolate_between_the_probes():
  probes = [
    {"num_buckets": 1, "padded": 1000, "wall_s": 30.0, "compile_wall_s": 4.0, "epoch_s": 10.0},
    {"num_buckets": 5, "padded": 600, "wall_s": 32.0, "compile_wall_s": 20.0, "epoch_s": 6.0},
  ]
  planned = [{"strategy": "quantile", "requested_buckets": 3, "num_buckets": 3, "padded": 800}]
  (estimate,) = paper.estimate_runs(probes, planned, devices=2)
  # Set-up: the larger of 30 - 4 - 2 * 10 = 6 and 32 - 20 - 2 * 6 = 0; compile halfway 4..20.
  assert estimate.fixed_s == pytest.approx(6 + 12)
  assert estimate.epoch_s == pytest.approx(8.0)  # halfway in padded timesteps
  assert (estimate.devices, estimate.num_buckets) == (2, 3)


def test_speedup_curves_start_quantile_and_optimal_at_their_devices_baseline():
  def row(devices, strategy, buckets, epoch, ideal):
    # Speed-ups against the baseline's 12-second epoch, as run_row gives them.
    return {
      "devices": devices,
      "strategy": strategy,
      "buckets": str(buckets),
      "median epoch (s)": f"{epoch:.2f}",
      "speed-up": f"{12 / epoch:.3f}" if devices == "1" else f"{6 / epoch:.3f}",
      "ideal speed-up": f"{ideal:.3f}",
    }

  rows = [
    row("1", "none", 1, 12.0, 1.0),
    row("1", "optimal", 2, 8.0, 1.6),
    row("1", "optimal", 4, 6.0, 2.2),
    row("1", "auto", 3, 6.5, 2.0),
    row("2", "none", 1, 6.0, 1.0),
    row("2", "quantile", 2, 5.0, 1.3),
  ]
  curves = {curve["label"]: curve for curve in paper.speedup_curves(rows)}
  assert list(curves) == [
    "none, 1 device(s)",
    "optimal, 1 device(s)",
    "auto, 1 device(s)",
    "none, 2 device(s)",
    "quantile, 2 device(s)",
  ]
  optimal = curves["optimal, 1 device(s)"]
  assert optimal["buckets"] == [1, 2, 4]
  assert optimal["epoch_times"] == [12.0, 8.0, 6.0]
  assert optimal["speedups"] == [1.0, 1.5, 2.0]
  assert optimal["ideal_speedups"] == [1.0, 1.6, 2.2]
  # quantile on 2 devices starts at the 2-device baseline, not the 1-device one
  assert curves["quantile, 2 device(s)"]["buckets"] == [1, 2]
  assert curves["quantile, 2 device(s)"]["speedups"] == [1.0, 1.2]
  # auto chose its own K: one point, no baseline in front
  assert curves["auto, 1 device(s)"]["buckets"] == [3]
  assert curves["none, 2 device(s)"]["epoch_times"] == [6.0]


FINISHED_SUMMARY = {
  "best_epoch": 1,
  "best_val_loss": 2.0,
  "best_val_cer": 0.5,
  "compile_wall_s": 3.0,
  "efficiency": 0.9,
  "time_to_first_step_s": 2.0,
  "num_buckets": 1,
  "upper_bounds": [100],
  "epochs": 2,
  "stopped_by": None,
}


def write_finished_run(run_dir: pathlib.Path, epochs: int = 2, num_buckets: int = 1) -> None:
  """The files a worker leaves of a finished run, and its machine record beside them."""
  run_dir.mkdir(parents=True, exist_ok=True)
  summary = FINISHED_SUMMARY | {"epochs": epochs, "best_epoch": epochs - 1}
  (run_dir / "summary.json").write_text(json.dumps(summary | {"num_buckets": num_buckets}))
  plan = {"num_examples": 48, "padded_timesteps_with_filler": 4800}
  (run_dir / "plan.json").write_text(json.dumps(plan))
  rows = [
    {"epoch": i, "epoch_time_s": 1.0, "eval_time_s": 0.5, "val_loss": 3.0 - i}
    for i in range(epochs)
  ]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  (run_dir.parent / "machine.json").write_text(json.dumps({"machine": "a box", "jax": "0"}))


def train_at_once(monkeypatch) -> None:
  """The sweep's runs, trained by a stand-in for its worker processes that writes at once the files
  of a finished run of the epochs its config asks for: for what a sweep plans, trains and reuses,
  which `test_sweep_writes_a_complete_table_that_agrees_with_its_runs` checks on real runs."""

  def run_worker_process(argv, devices):
    args = paper.parse_args(argv)
    strategy, num_buckets = args.worker_run
    epochs = paper.run_config(args, strategy, num_buckets).num_epochs
    run_dir = pathlib.Path(args.workdir) / paper.run_name(devices, strategy, num_buckets)
    write_finished_run(run_dir, epochs, num_buckets)
    return True

  monkeypatch.setattr(paper, "run_worker_process", run_worker_process)


def test_budget_sweep_leaves_out_what_does_not_fit_and_runs_equal_epochs(tmp_path, monkeypatch):
  """With estimates given (no probe), a budget for two of three runs: the table has two rows,
  both of the planned epochs, and the report names the run left out."""
  train_at_once(monkeypatch)
  probe = {"none": (1, 1000), "optimal": (2, 800)}
  probed = {
    "devices": 1,
    "probes": [
      {
        "strategy": s,
        "requested_buckets": k,
        "num_buckets": k,
        "padded": padded,
        "wall_s": 20.0,
        "time_to_first_step_s": 5.0,
        "compile_wall_s": 10.0 * k,
        "epoch_s": 1.0,
      }
      for s, (k, padded) in probe.items()
    ],
    "planned": [
      {"strategy": "none", "requested_buckets": 1, "num_buckets": 1, "padded": 1000},
      {"strategy": "optimal", "requested_buckets": 2, "num_buckets": 2, "padded": 800},
      {"strategy": "quantile", "requested_buckets": 2, "num_buckets": 2, "padded": 900},
    ],
  }
  (tmp_path / "estimates.json").write_text(json.dumps(probed))
  # Estimates at 2 epochs: set-up 20 - 10 - 2 = 8 s, so none 8 + 10 + 2 = 20 s, optimal and
  # quantile 8 + 20 + 2 = 30 s each; 75 s less the 15 s reserve fits the first two (50 s).
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1"]
  argv += ["--buckets", "2", "--strategies", "none,optimal,quantile", "--estimates"]
  argv += [str(tmp_path / "estimates.json"), "--budget-minutes", "1.25"]
  text = paper.main(argv).read_text()
  with open(tmp_path / "paper_table.csv", newline="") as file:
    rows = list(csv.DictReader(file))
  assert [row["strategy"] for row in rows] == ["none", "optimal"]
  assert {row["epochs run"] for row in rows} == {"2"}
  assert "Left out by the plan" in text and "devices1/quantile_k2" in text
  assert "estimated at 0.8 min" in text  # the 50 s of the two runs kept, not the 80 s of all
  assert not (tmp_path / "devices1/quantile_k2").exists()


# A probe of the baseline and `optimal` K = 2, 40 s each on 1 device.
PROBED = {
  "devices": 1,
  "probes": [
    {"strategy": s, "requested_buckets": k, "num_buckets": k, "padded": padded, "wall_s": 40.0,
     "time_to_first_step_s": 5.0, "compile_wall_s": 10.0 * k, "epoch_s": 10.0}
    for s, k, padded in (("none", 1, 1000), ("optimal", 2, 800))
  ],
  "planned": [
    {"strategy": "none", "requested_buckets": 1, "num_buckets": 1, "padded": 1000},
    {"strategy": "optimal", "requested_buckets": 2, "num_buckets": 2, "padded": 800},
  ],
}  # fmt: skip


def test_a_budget_sweep_started_again_keeps_its_epochs_and_reuses_its_runs(tmp_path, monkeypatch):
  """Given more time, the same budget sweep would plan more epochs (at most --epochs 4); it keeps
  the 2 its finished runs trained, so that the table compares equal epochs and says so."""
  train_at_once(monkeypatch)
  (tmp_path / "estimates.json").write_text(json.dumps(PROBED))
  # Set-up 40 - 10 - 20 = 10 s: none 20 s and optimal 30 s, plus 10 s per epoch each; 115 s less
  # the 15 s reserve fits both at 2 epochs (90 s), not 3.
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1"]
  argv += ["--buckets", "2", "--strategies", "none,optimal", "--epochs", "4", "--min-epochs", "1"]
  argv += ["--estimates", str(tmp_path / "estimates.json")]
  paper.main([*argv, "--budget-minutes", str(115 / 60)])
  summary_path = tmp_path / "devices1/optimal_k2/summary.json"
  assert json.loads(summary_path.read_text())["epochs"] == 2
  before = summary_path.stat().st_mtime_ns
  text = paper.main([*argv, "--budget-minutes", "5"]).read_text()  # time for 4 epochs
  assert summary_path.stat().st_mtime_ns == before
  with open(tmp_path / "paper_table.csv", newline="") as file:
    assert [row["epochs run"] for row in csv.DictReader(file)] == ["2", "2"]
  assert "2 epochs at most" in text and "run(s) of 2 epochs each" in text


def test_the_probe_trains_each_run_in_a_worker_of_its_own_and_times_their_start(
  tmp_path, monkeypatch
):
  """Each probe run in a fresh process; the seconds outside the runs and the planning are the
  workers' start-up, which every run of the sweep pays once."""
  clock, started = [0.0], []
  monkeypatch.setattr(paper.time, "perf_counter", lambda: clock[0])

  def worker(argv, devices):  # 3 s to start, then the probe run (40 s), then the planning
    strategy, k = argv[argv.index("--worker-run") + 1].split(":")
    started.append(("--probe" in argv, devices, strategy, int(k)))
    times = next(p for p in PROBED["probes"] if p["strategy"] == strategy)
    (tmp_path / "probe" / f"{strategy}_k{k}.json").write_text(json.dumps(times))
    clock[0] += 3 + times["wall_s"]
    if strategy == "optimal":  # the last probe run's worker plans every run: 10 s
      planned = {"planned": PROBED["planned"], "planning_s": 10.0}
      (tmp_path / "probe" / "planned.json").write_text(json.dumps(planned))
      clock[0] += 10
    return True

  monkeypatch.setattr(paper, "run_worker_process", worker)
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1"]
  argv += ["--buckets", "2", "--strategies", "none,optimal", "--budget-minutes", "1"]
  with pytest.raises(cli_errors.UsageError, match="the baseline alone needs"):
    paper.main(argv)  # 60 s less 96 of probing leaves nothing to train
  assert started == [(True, 1, "none", 1), (True, 1, "optimal", 2)]
  probed = json.loads((tmp_path / "probe.json").read_text())
  assert probed["worker_start_s"] == pytest.approx(3.0)
  assert probed["probes"] == PROBED["probes"] and probed["planned"] == PROBED["planned"]


def test_a_sweep_started_again_reuses_its_probe_only_under_the_same_settings(tmp_path):
  # Budgets too small for the baseline: each command plans from the probe, then ends untrained.
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1"]
  argv += ["--buckets", "2", "--strategies", "none,optimal", "--budget-minutes", "0.3"]
  paper.check_probe_settings(paper.parse_args(argv), 1, tmp_path)  # as a probe of argv would
  (tmp_path / "probe.json").write_text(json.dumps(PROBED))
  with pytest.raises(cli_errors.UsageError, match="the baseline alone needs"):
    paper.main(argv)
  with pytest.raises(
    cli_errors.UsageError, match=r"holds a probe with other settings \(config.num_epochs=2 there"
  ):
    paper.main([*argv, "--epochs", "3"])
  with pytest.raises(cli_errors.UsageError, match=r"holds a probe with other settings \(devices"):
    paper.main([*argv[:-6], "--devices", "2", *argv[-6:]])
  # A probe with no record of its settings (an older workdir) is not reused unchecked.
  (tmp_path / "probe" / "settings.json").unlink()
  with pytest.raises(cli_errors.UsageError, match=r"holds a probe .* with no record of its"):
    paper.main(argv)
  # --estimates is the user's to vouch for: the workdir's own probe is then not checked.
  with pytest.raises(cli_errors.UsageError, match="the baseline alone needs"):
    paper.main([*argv, "--estimates", str(tmp_path / "probe.json")])


def test_a_run_the_deadline_cut_short_is_not_taken_as_finished(tmp_path):
  for name, stopped_by in (("done", None), ("cut", "max_minutes")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(json.dumps({"stopped_by": stopped_by}))
  assert paper.finished_run(tmp_path / "done")
  assert not paper.finished_run(tmp_path / "cut")
  assert not paper.finished_run(tmp_path / "never started")


@pytest.mark.parametrize(
  "name, text, message",
  [
    ("summary.json", '{"stopped_by": nu', r"summary.json: not valid JSON"),
    ("plan.json", "[]", r"plan.json: not a JSON object"),
    ("metrics.jsonl", '{"epoch": 1}\n{"epoch": 2', r"metrics.jsonl, line 2: not valid JSON"),
    ("metrics.jsonl", '{"epoch": 1}\n3\n', r"metrics.jsonl, line 2: not a JSON object"),
  ],
)
def test_a_damaged_run_file_is_named(tmp_path, name, text, message):
  files = {"summary.json": "{}", "plan.json": "{}", "metrics.jsonl": '{"epoch": 1}\n'}
  for file_name, file_text in (files | {name: text}).items():
    (tmp_path / file_name).write_text(file_text)
  with pytest.raises(ValueError, match=message):
    paper.finished_run(tmp_path)
    paper.read_run(tmp_path)


def finished_sweep(workdir) -> list[str]:
  """The argv of a one-run sweep whose run, settings and machine record are on file: the same
  command only writes the report."""
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(workdir)]
  argv += ["--strategies", "none", "--devices", "1"]
  paper.check_run_settings(paper.parse_args(argv), [1], None)  # as the sweep's first start did
  write_finished_run(workdir / "devices1" / "none_k1")
  return argv


@pytest.mark.parametrize(
  ("name", "text", "message"),
  [
    ("none_k1/summary.json", {}, "summary.json: no best_epoch, best_val_loss, best_val_cer"),
    (
      "none_k1/summary.json",
      FINISHED_SUMMARY | {"best_epoch": "1"},
      'summary.json: best_epoch "1" is not one of the 2 epoch(s) of metrics.jsonl',
    ),
    (
      "none_k1/summary.json",
      FINISHED_SUMMARY | {"best_epoch": 2},
      "summary.json: best_epoch 2 is not one of the 2 epoch(s) of metrics.jsonl",
    ),
    (
      "none_k1/summary.json",
      FINISHED_SUMMARY | {"best_val_loss": None},
      "summary.json: best_val_loss is null, not a number",
    ),
    ("none_k1/plan.json", {}, "plan.json: no num_examples, padded_timesteps_with_filler"),
    ("none_k1/metrics.jsonl", '{"epoch": 0}\n', "metrics.jsonl, line 1: no epoch_time_s; no"),
    ("machine.json", {}, "machine.json: no machine, jax, so not the record a worker"),
    ("machine.json", "[1", "machine.json: not valid JSON (Expecting ',' delimiter"),
  ],
)
def test_a_damaged_file_of_a_finished_sweep_is_named_and_no_report_is_written(
  tmp_path, capsys, name, text, message
):
  """Were KeyErrors and TypeErrors, or a JSON error naming no file after the CSV and plots."""
  argv = finished_sweep(tmp_path)
  (tmp_path / "devices1" / name).write_text(text if isinstance(text, str) else json.dumps(text))
  assert cli_errors.run(lambda: paper.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: {tmp_path / 'devices1'}/") and message in error, error
  assert error.count("\n") == 1
  assert not list(tmp_path.glob("paper_table*"))  # every file is read before any is written


def test_a_finished_sweeps_files_make_the_report(tmp_path):
  """The files `finished_sweep` fakes are whole: each damaged one above is the error."""
  markdown_path = paper.main(finished_sweep(tmp_path))
  assert "Machine: a box; jax 0." in markdown_path.read_text()
  assert sorted(path.name for path in tmp_path.glob("paper_table*")) == [
    "paper_table.csv",
    "paper_table.md",
    "paper_table_speedup.png",
    "paper_table_val_loss.png",
  ]


@pytest.mark.parametrize("baseline_finished", [True, False])
def test_an_interrupted_sweep_reports_the_finished_runs_and_exits_130(
  tmp_path, monkeypatch, capsys, baseline_finished
):
  reported = []
  monkeypatch.setattr(paper, "run_worker_process", lambda argv, devices: False)  # Ctrl-C
  monkeypatch.setattr(paper, "write_report", lambda *args: reported.append(args) or "report.md")
  monkeypatch.setattr(
    paper, "finished_run", lambda run_dir: baseline_finished and "none" in str(run_dir)
  )
  argv = ["--tiny", "--devices", "1", "--workdir", str(tmp_path / "sweep")]
  assert cli_errors.run(lambda: paper.main(argv)) == 128 + signal.SIGINT
  output = capsys.readouterr()
  # A report of the runs that finished, which must include the baseline every row compares to.
  assert len(reported) == int(baseline_finished)
  if not baseline_finished:
    assert output.err == (
      "interrupted before the baseline (no bucketing) finished: no report; the same command "
      "resumes the sweep\n"
    )
  assert "error" not in output.err


def test_an_interrupted_worker_is_waited_for_while_it_stops_cleanly(tmp_path):
  # SIGINT to the whole process group, as Ctrl-C or `timeout --signal=INT` sends it: the parent
  # must let the worker finish its clean stop (train.py's checkpoint) instead of killing it.
  worker = (
    "import pathlib, signal, sys, time\n"
    "folder = pathlib.Path(sys.argv[1])\n"
    "def stop(*_):\n"
    "  time.sleep(1)\n"
    "  (folder / 'stopped cleanly').touch()\n"
    "  sys.exit(3)\n"
    "signal.signal(signal.SIGINT, stop)\n"
    "(folder / 'started').touch()\n"
    "time.sleep(60)\n"
  )
  # SIGINT as a terminal leaves it: a pytest started as a background job of a non-interactive
  # shell passes it on ignored, and the parent would never see the interruption.
  restore_sigint = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
  _, output = signal_a_working_worker(
    tmp_path, worker, lambda pid: os.killpg(pid, signal.SIGINT), restore_sigint
  )
  assert output == "False"
  assert (tmp_path / "stopped cleanly").exists()


def signal_a_working_worker(tmp_path, worker: str, send, parent_setup: str = "") -> tuple[int, str]:
  """Runs `worker` (Python source, given `tmp_path`) through `paper.run_worker_command` in a
  parent in a session of its own, calls `send(parent's pid)` once the worker has touched
  `tmp_path / "started"`, and returns the parent's exit code and what it printed."""
  parent = (
    f"{parent_setup}import sys\n"
    "from experiments import paper\n"
    f"command = [sys.executable, '-c', {worker!r}, sys.argv[1]]\n"
    "print(paper.run_worker_command(command, None, 'the worker'))\n"
  )
  process = subprocess.Popen(
    [sys.executable, "-c", parent, str(tmp_path)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.monotonic() + 60
  while not (tmp_path / "started").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  send(process.pid)
  try:
    output, _ = process.communicate(timeout=60)
  finally:
    with contextlib.suppress(ProcessLookupError):  # a worker left training must not outlive us
      os.killpg(process.pid, signal.SIGKILL)
  return process.returncode, output.strip()


@pytest.mark.parametrize(
  "to_the_group, handled",
  [(False, True), (True, True), (True, False)],
  ids=["alone", "group", "starting"],
)
def test_a_sigterm_stops_the_worker_cleanly_whether_or_not_it_had_one_too(
  tmp_path, to_the_group, handled
):
  # SIGTERM to the parent alone (a scheduler, `kill PID`) ended it at once and left the worker
  # training; to the whole group, a forwarded second SIGTERM would end the worker mid-checkpoint,
  # and a worker still starting (no handler yet) ends by the signal, not as a failed worker.
  worker = (
    "import pathlib, signal, sys, time\n"
    "folder = pathlib.Path(sys.argv[1])\n"
    "stop = []\n"
    "def request(signum, _):\n"  # as training/stop.py: once per signal, then its default
    "  stop.append(signum)\n"
    "  signal.signal(signum, signal.SIG_DFL)\n"
    f"if {handled}:\n"
    "  signal.signal(signal.SIGINT, request)\n"
    "  signal.signal(signal.SIGTERM, request)\n"
    "(folder / 'started').touch()\n"
    "while not stop:\n"
    "  time.sleep(0.05)\n"
    "time.sleep(1)\n"  # the checkpoint, during which a second SIGTERM would kill it
    "(folder / 'stopped cleanly').touch()\n"
    "sys.exit(128 + stop[0])\n"
  )
  send = os.killpg if to_the_group else os.kill
  done = signal_a_working_worker(tmp_path, worker, lambda pid: send(pid, signal.SIGTERM))
  assert done == (0, "False")  # the parent's exit code and what it printed
  assert (tmp_path / "stopped cleanly").exists() == handled


def test_a_budget_sweep_started_again_plans_only_what_is_left_at_its_first_epochs(
  tmp_path, monkeypatch
):
  """A second GPU call finishes a sweep: runs the first start finished cost nothing in the new
  plan, and the rest train the first plan's epochs or not at all, so that the table compares."""
  train_at_once(monkeypatch)
  probed = json.loads(json.dumps(PROBED))
  probed["planned"].append(
    {"strategy": "quantile", "requested_buckets": 2, "num_buckets": 2, "padded": 900}
  )
  (tmp_path / "estimates.json").write_text(json.dumps(probed))
  # At 2 epochs: none 20 + 20 = 40 s, optimal and quantile 30 + 20 = 50 s each.
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1"]
  argv += ["--buckets", "2", "--strategies", "none,optimal,quantile", "--epochs", "2"]
  argv += ["--min-epochs", "1", "--estimates", str(tmp_path / "estimates.json")]
  paper.main([*argv, "--budget-minutes", str(110 / 60)])  # 95 s: none and optimal
  finished = [tmp_path / f"devices1/{run}/summary.json" for run in ("none_k1", "optimal_k2")]
  before = [path.stat().st_mtime_ns for path in finished]
  quantile = tmp_path / "devices1/quantile_k2"
  assert not quantile.exists()
  # 45 s: quantile alone fits 1 epoch, not the 2 the others trained: it stays out.
  text = paper.main([*argv, "--budget-minutes", str(60 / 60)]).read_text()
  assert not quantile.exists()
  assert "run(s) of 2 epochs each" in text and "Left out by the plan" in text
  # 60 s: the whole sweep (140 s) would not fit, what is left of it does.
  text = paper.main([*argv, "--budget-minutes", str(75 / 60)]).read_text()
  assert [path.stat().st_mtime_ns for path in finished] == before
  assert json.loads((quantile / "summary.json").read_text())["epochs"] == 2
  with open(tmp_path / "paper_table.csv", newline="") as file:
    rows = list(csv.DictReader(file))
  assert [(row["strategy"], row["epochs run"]) for row in rows] == [
    ("none", "2"),
    ("optimal", "2"),
    ("quantile", "2"),
  ]
  assert "estimated at 0.8 min for the 1 still to train" in text
  assert "reused: devices1/none_k1, devices1/optimal_k2" in text


def table_run(epoch_seconds, val_losses, best_epoch, padded, startup=(0.0, 0.0), wait=0.0):
  """A finished run's files as `read_table_run` gives them, made by hand."""
  history = [
    {"epoch": epoch, "epoch_time_s": seconds, "compile_wait_s": wait, "val_loss": loss}
    for epoch, (seconds, loss) in enumerate(zip(epoch_seconds, val_losses, strict=True))
  ]
  measure, first_step = startup
  summary = {
    "best_epoch": best_epoch,
    "best_val_loss": val_losses[best_epoch],
    "best_val_cer": 0.25,
    "epochs": len(history),
    "num_buckets": 2,
    "upper_bounds": [40, 90],
    "compile_wall_s": 7.0,
    "efficiency": 0.8,
    "time_to_first_step_s": first_step,
  }
  if measure:
    summary["cost_model_measure_s"] = measure
  return {"summary": summary, "history": history, "plan": {"padded_timesteps_with_filler": padded}}


def test_a_row_reads_medians_the_baselines_loss_and_the_best_epoch_counted_from_one():
  # The baseline's best loss is 20.0, at its second epoch.
  baseline = table_run([4.0, 4.0, 4.0], [30.0, 20.0, 25.0], best_epoch=1, padded=1000)
  # A slow first epoch (the median is 2, the mean 4); the baseline's loss first reached at the
  # second epoch, the run's own best at the third, and the last epoch not its best.
  run = table_run(
    [10.0, 2.0, 2.0, 2.0],
    [40.0, 19.5, 18.0, 21.0],
    best_epoch=2,
    padded=400,
    startup=(2.0, 3.0),
    wait=0.5,
  )
  row = paper.run_row(run, baseline, devices=2, strategy="optimal")
  assert list(row) == list(paper.COLUMNS)
  assert row["median epoch (s)"] == "2.00"
  assert row["speed-up"] == "2.000"  # the baseline's median epoch over the run's
  assert row["ideal speed-up"] == "2.500"
  assert row["epochs to best"] == "3" and row["epochs run"] == "4"
  assert row["best val loss"] == "18.000"
  # start-up (2 s measuring the cost model, 3 s to the first step), then epochs and their waits
  assert row["wall to best (s)"] == f"{5.0 + 10.5 + 2.5 + 2.5:.1f}"
  assert row["epochs to baseline loss"] == "2"
  assert row["wall to baseline loss (s)"] == f"{5.0 + 10.5 + 2.5:.1f}"
  assert (row["buckets"], row["upper bounds"], row["compile (s)"]) == ("2", "40 90", "7.0")

  # A run that never reaches the baseline's loss says so.
  worse = table_run([1.0, 1.0], [22.0, 21.0], best_epoch=1, padded=500)
  row = paper.run_row(worse, baseline, devices=2, strategy="quantile")
  assert row["epochs to baseline loss"] == row["wall to baseline loss (s)"] == "-"
  assert row["speed-up"] == "4.000"


# ---------------------------------------------------------------------------------------------
# What a sweep runs, and on how many devices.


def test_a_budget_or_a_fixed_epoch_preset_trains_every_epoch_and_every_run_compiles_cold():
  full = paper.parse_args(["--dataset", "synthetic"])
  budget = paper.parse_args(["--dataset", "synthetic", "--budget-minutes", "5"])
  assert paper.args_config(full).patience == 3 < paper.args_config(full).num_epochs == 15
  assert paper.args_config(budget).patience == paper.args_config(budget).num_epochs == 15
  assert paper.make_config("tiny", "synthetic", epochs=10).patience == 10  # synthetic's is 3
  assert paper.args_config(full).compilation_cache_dir == ""  # no steps of an earlier run


def test_planned_runs_take_the_baseline_once_and_auto_at_the_largest_k_however_listed():
  strategies = ["none", "quantile", "optimal", "auto"]
  assert paper.planned_runs([1, 2, 4], strategies) == [
    ("none", 1),
    ("quantile", 2),
    ("quantile", 4),
    ("optimal", 2),
    ("optimal", 4),
    ("auto", 4),
  ]
  assert paper.planned_runs([4, 2], ["optimal", "auto"]) == [
    ("none", 1),
    ("optimal", 4),
    ("optimal", 2),
    ("auto", 4),
  ]
  # The probe times the baseline and the largest K, between which the others are interpolated.
  for buckets in ([1, 2, 4], [4, 2]):
    args = paper.parse_args(["--buckets", ",".join(map(str, buckets))])
    assert paper.probe_runs(args) == [("none", 1), ("optimal", 4)]


def test_budget_priority_keeps_every_run_of_fewer_devices_first():
  runs = [(2, "none", 1), (1, "quantile", 2), (2, "optimal", 2), (1, "none", 1)]
  assert paper.budget_priority(runs) == [
    (1, "none", 1),
    (1, "quantile", 2),
    (2, "none", 1),
    (2, "optimal", 2),
  ]


def test_a_budget_gives_each_device_count_its_own_runs():
  args = paper.parse_args(["--tiny", "--buckets", "2"])
  budget = {"runs": [(1, "none", 1), (1, "optimal", 2), (2, "none", 1)]}
  assert paper.worker_runs(args, 1, budget) == [("none", 1), ("optimal", 2)]
  assert paper.worker_runs(args, 2, budget) == [("none", 1)]
  assert paper.worker_runs(args, 4, budget) == []


def test_a_worker_sees_the_first_n_devices_and_only_them(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
  env = paper.worker_env(2)
  assert env["CUDA_VISIBLE_DEVICES"] == "3,5"
  assert env["XLA_FLAGS"].split() == [
    "--xla_dump_to=/tmp/x",
    "--xla_force_host_platform_device_count=2",
  ]
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
  assert paper.worker_env(2)["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_signal_stops_a_worker_with_128_plus_the_signal_and_the_deadline_does_not():
  said = []
  assert paper.signal_exit_code("run", {"stopped_by": "SIGTERM"}, said.append) == 143
  assert paper.signal_exit_code("run", {"stopped_by": "SIGINT"}, said.append) == 130
  assert said == ["run: stopped by SIGTERM", "run: stopped by SIGINT"]
  assert paper.signal_exit_code("run", {"stopped_by": "max_minutes"}, said.append) is None
  assert paper.signal_exit_code("run", {"stopped_by": None}, said.append) is None
  assert len(said) == 2


def test_a_budget_worker_stops_its_run_at_the_deadline_on_the_devices_it_was_started_for(
  tmp_path, monkeypatch, capsys
):
  import jax

  trained = []

  def train_and_evaluate(config, run_dir):
    trained.append((config.max_minutes, config.bucketing.strategy, run_dir))
    summary = {"num_buckets": 2, "epochs": 2, "best_val_loss": 1.0, "train_time_s": 1.0}
    return summary | {"compile_wall_s": 1.0, "stopped_by": None}

  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  monkeypatch.setattr(paper.time, "time", lambda: 1000.0)
  (tmp_path / "budget.json").write_text(json.dumps({"deadline": 1090.0}))
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--budget-minutes", "3"]
  args = paper.parse_args([*argv, "--worker-run", "optimal:2"])
  devices = jax.device_count()
  assert paper.run_worker(args, devices) == 0
  assert trained == [(1.5, "optimal", tmp_path / f"devices{devices}" / "optimal_k2")]
  with pytest.raises(RuntimeError, match=f"the worker for {devices + 1} devices sees {devices}"):
    paper.run_worker(args, devices + 1)
  assert len(trained) == 1
  # Started past the deadline (its start took longer than estimated), it trains nothing: a cap of
  # 0 minutes would be none, and a negative one failed the worker, and with it the sweep.
  for now in (1090.0, 1100.0):
    monkeypatch.setattr(paper.time, "time", lambda now=now: now)
    assert paper.run_worker(args, devices) == 0
  assert len(trained) == 1
  assert capsys.readouterr().out.endswith(f"devices{devices}/optimal_k2: left out, out of time\n")


# ---------------------------------------------------------------------------------------------
# Which runs are reused: only under the settings they were trained with.


def test_run_settings_leave_out_what_does_not_change_results_and_the_cost_model_but_for_auto():
  def settings(strategy, cost, data_dir=None, max_minutes=0.0):
    args = paper.parse_args(["--tiny", "--dataset", "synthetic", "--cost", cost])
    config = paper.run_config(args, strategy, 2)
    config.data.data_dir, config.max_minutes = data_dir, max_minutes
    return paper.run_settings(config)

  # the data moved, a time cap: the same run
  assert settings("optimal", "0.01,2e-7,5") == settings("optimal", "0.01,2e-7,5", "/data", 3.0)
  assert settings("optimal", "0.01,2e-7,5") == settings("optimal", "0.02,2e-7,5")
  assert settings("auto", "0.01,2e-7,5") != settings("auto", "0.02,2e-7,5")  # it plans with it
  assert settings("auto", "0.01,2e-7,5") == settings("auto", "0.01,2e-7,5", "/data", 3.0)


def test_a_run_is_refused_at_any_device_count_before_any_is_recorded(tmp_path):
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--strategies", "none"]
  paper.check_run_settings(paper.parse_args(argv), [2], None)  # a sweep of 2 epochs on 2
  more = paper.parse_args([*argv, "--epochs", "3"])
  with pytest.raises(cli_errors.UsageError, match=r"devices2/none_k1 holds a run with other"):
    paper.check_run_settings(more, [1, 2], None)
  assert not (tmp_path / "devices1").exists()  # devices1/none_k1 is new, yet not recorded


def test_a_run_from_before_settings_json_is_checked_against_the_trainers_config_json(tmp_path):
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--strategies", "none"]
  args = paper.parse_args(argv)
  run_dir = tmp_path / "devices1" / "none_k1"
  write_finished_run(run_dir)
  config_json = train.flat_config(paper.run_config(args, "none", 1))
  (run_dir / "config.json").write_text(json.dumps(config_json))
  with pytest.raises(cli_errors.UsageError, match=r"num_epochs=2 there, 3 here.*config\.json"):
    paper.check_run_settings(paper.parse_args([*argv, "--epochs", "3"]), [1], None)
  assert not (run_dir / "settings.json").exists()
  paper.check_run_settings(args, [1], None)
  assert (run_dir / "settings.json").is_file()


def test_an_auto_run_whose_bounds_minimised_padding_is_not_reused(tmp_path):
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--strategies", "auto"]
  args = paper.parse_args([*argv, "--buckets", "2"])
  settings = paper.run_settings(paper.run_config(args, "auto", 2))
  del settings["auto_bounds_minimise"]  # as auto recorded them before it minimised run time
  path = tmp_path / "devices1" / "auto_k2" / "settings.json"
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps(settings))
  with pytest.raises(cli_errors.UsageError, match="auto_bounds_minimise=None there, 'run time'"):
    paper.check_run_settings(args, [1], None)


def test_a_probe_is_reused_only_for_the_same_runs_and_autos_cost_model(tmp_path):
  argv = ["--tiny", "--dataset", "synthetic", "--buckets", "2", "--cost", "0.01,2e-7,5"]
  paper.check_probe_settings(paper.parse_args([*argv, "--strategies", "none,auto"]), 1, tmp_path)
  # planned.json has no plan of quantile's runs, and auto's K came from its cost model
  with pytest.raises(cli_errors.UsageError, match=r"other settings \(strategies"):
    paper.check_probe_settings(
      paper.parse_args([*argv, "--strategies", "none,auto,quantile"]), 1, tmp_path
    )
  with pytest.raises(cli_errors.UsageError, match=r"other settings \(buckets"):
    paper.check_probe_settings(
      paper.parse_args([*argv, "--strategies", "none,auto", "--buckets", "1,2"]), 1, tmp_path
    )
  with pytest.raises(cli_errors.UsageError, match=r"other settings \(config.bucketing.alpha"):
    paper.check_probe_settings(
      paper.parse_args([*argv, "--strategies", "none,auto", "--cost", "0.02,2e-7,5"]), 1, tmp_path
    )


# ---------------------------------------------------------------------------------------------
# The budget's estimates, plan and deadline.


def test_autos_estimate_counts_its_measuring_and_is_named_by_the_k_it_was_asked_for():
  probes = [
    {"num_buckets": 1, "padded": 1000, "wall_s": 30.0, "compile_wall_s": 4.0, "epoch_s": 10.0},
    {"num_buckets": 5, "padded": 600, "wall_s": 32.0, "compile_wall_s": 20.0, "epoch_s": 6.0},
  ]
  # auto asked for K = 8 planned 3 buckets, after measuring its cost model for 7 s
  auto = {"strategy": "auto", "requested_buckets": 8, "num_buckets": 3, "padded": 800}
  (estimate,) = paper.estimate_runs(probes, [auto | {"measure_s": 7.0}], devices=1)
  assert (estimate.strategy, estimate.num_buckets) == ("auto", 8)  # its run is auto_k8
  assert estimate.fixed_s == pytest.approx(6 + 7 + 12)  # set-up, measuring, compiling 3
  assert estimate.epoch_s == pytest.approx(8.0)


def test_a_budget_counts_worker_start_up_and_its_deadline_leaves_the_reserve(tmp_path, monkeypatch):
  """With no --min-epochs, every run kept trains the preset's (here --epochs') epochs."""
  train_at_once(monkeypatch)
  monkeypatch.setattr(paper.time, "time", lambda: 1000.0)
  # An earlier probe's, given as --estimates: measured elsewhere, so not "an earlier start".
  probed = PROBED | {"worker_start_s": 5.0, "probe_s": 120.0}
  (tmp_path / "estimates.json").write_text(json.dumps(probed))
  # Set-up 10 s (as above) and 5 s to start each worker: none 25 s and optimal 35 s, plus 10 s
  # per epoch each. 145 s less the 15 s reserve: 130 s, 3 epochs (120 s), not 4 (140 s).
  argv = ["--tiny", "--dataset", "synthetic", "--devices", "1", "--epochs", "4"]
  argv += ["--buckets", "2", "--strategies", "none,optimal", "--budget-minutes", str(145 / 60)]
  argv += ["--estimates", str(tmp_path / "estimates.json")]
  text = paper.main([*argv, "--workdir", str(tmp_path / "a"), "--min-epochs", "1"]).read_text()
  budget = json.loads((tmp_path / "a" / "budget.json").read_text())
  assert budget["epochs"] == 3
  assert budget["estimates"] == pytest.approx(
    {"devices1/none_k1": 25 + 30, "devices1/optimal_k2": 35 + 30}
  )
  assert budget["deadline"] == pytest.approx(1000 + 130, abs=1)  # less the time spent planning
  assert f"Estimates from an earlier probe (`{tmp_path / 'estimates.json'}`)" in text
  # At the 4 epochs of --epochs, the baseline alone fits (65 s).
  paper.main([*argv, "--workdir", str(tmp_path / "b")])
  budget = json.loads((tmp_path / "b" / "budget.json").read_text())
  assert (budget["epochs"], budget["runs"]) == (4, [[1, "none", 1]])
  assert budget["left_out"] == ["devices1/optimal_k2"]
  # --min-epochs beyond the epochs there are is those epochs (was a ValueError's traceback)
  paper.main([*argv, "--workdir", str(tmp_path / "c"), "--min-epochs", "9"])
  assert json.loads((tmp_path / "c" / "budget.json").read_text())["runs"] == [[1, "none", 1]]


def test_a_budget_that_keeps_no_run_at_a_device_count_reports_the_others(tmp_path, monkeypatch):
  train_at_once(monkeypatch)
  (tmp_path / "estimates.json").write_text(json.dumps(PROBED))
  # At 2 epochs: none 40 s and optimal 50 s per device count; 110 s less the reserve: 95 s.
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1,2"]
  argv += ["--buckets", "2", "--strategies", "none,optimal", "--budget-minutes", str(110 / 60)]
  text = paper.main([*argv, "--estimates", str(tmp_path / "estimates.json")]).read_text()
  assert "devices2/none_k1, devices2/optimal_k2" in text  # left out by the plan
  with open(tmp_path / "paper_table.csv", newline="") as file:
    assert [(row["devices"], row["strategy"]) for row in csv.DictReader(file)] == [
      ("1", "none"),
      ("1", "optimal"),
    ]


def test_a_run_its_estimate_would_end_past_the_deadline_is_left_out_and_named(
  tmp_path, monkeypatch, capsys
):
  clock, started = [1000.0], []
  monkeypatch.setattr(paper.time, "time", lambda: clock[0])

  def worker(argv, devices):  # every run takes 40 s
    strategy, k = paper.strategy_and_buckets(argv[argv.index("--worker-run") + 1])
    started.append((strategy, k))
    write_finished_run(tmp_path / paper.run_name(devices, strategy, k), num_buckets=k)
    clock[0] += 40
    return True

  monkeypatch.setattr(paper, "run_worker_process", worker)
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1"]
  args = paper.parse_args(argv)
  paper.check_run_settings(args, [1], None)
  runs = [(1, "none", 1), (1, "optimal", 2), (1, "quantile", 2)]
  estimates = dict(zip((paper.run_name(*run) for run in runs), (30.0, 70.0, 10.0), strict=True))
  budget = {"runs": runs, "estimates": estimates, "deadline": 1100.0}
  # none ends at 1030, then optimal would at 1110, past the deadline; quantile at 1050 fits.
  assert paper.train_runs(args, argv, [1], budget)
  assert started == [("none", 1), ("quantile", 2)]
  assert "devices1/optimal_k2: left out, out of time" in capsys.readouterr().out
  rows, _, unfinished = paper.collect(args, [1], budget)
  assert [row["strategy"] for row in rows] == ["none", "quantile"]
  assert unfinished == ["devices1/optimal_k2"]
  budget |= {"budget_minutes": 2, "probe_s": 30.0, "epochs": 2, "left_out": ["devices1/auto_k2"]}
  (text,) = paper.budget_lines(budget, unfinished)[1:]
  assert "Probing the baseline and the largest K for 2 epochs each took 0.5 min;" in text
  assert text.endswith(
    "`quantile` by K): devices1/auto_k2. Left out when the time ran short: devices1/optimal_k2."
  )


def test_a_report_needs_the_baseline_to_have_finished(tmp_path):
  argv = finished_sweep(tmp_path)
  summary = tmp_path / "devices1" / "none_k1" / "summary.json"
  summary.write_text(json.dumps(FINISHED_SUMMARY | {"stopped_by": "max_minutes"}))
  with pytest.raises(cli_errors.UsageError, match="the baseline devices1/none_k1 did not finish"):
    paper.collect(paper.parse_args(argv), [1])  # every row compares with it


def test_an_interrupted_sweep_reports_only_once_every_device_counts_baseline_finished(
  tmp_path, monkeypatch
):
  reported = []
  monkeypatch.setattr(paper, "run_worker_process", lambda argv, devices: False)  # Ctrl-C
  monkeypatch.setattr(paper, "write_report", lambda *args: reported.append(args) or "report.md")
  monkeypatch.setattr(paper, "finished_run", lambda run_dir: "devices1/none" in str(run_dir))
  argv = ["--tiny", "--devices", "1,2", "--workdir", str(tmp_path / "sweep")]
  with pytest.raises(cli_errors.Interrupted, match="before the baseline"):
    paper.main(argv)
  assert not reported


def test_autos_cost_model_is_reported_with_each_figures_unit():
  cost = {"alpha": 0.005, "beta": 5e-07, "kappa": 10.0, "gamma": 2e-05}
  runs = {(1, "none", 1): {"plan": {}}, (1, "auto", 4): {"plan": {"cost_model": cost}}}
  assert paper.auto_cost_text(runs) == (
    " `auto` cost model (given by --cost): alpha 0.005 s per step, gamma 2e-05 s per padded "
    "timestep, beta 5e-07 s per padded token, kappa 10 s per bucket."
  )


# ---------------------------------------------------------------------------------------------
# The probe's worker, with a stand-in for the trainer.


def test_a_probe_run_times_two_epochs_with_evaluation_and_the_last_plans_every_run(
  tmp_path, monkeypatch
):
  clock, trained, plans = [0.0], [], []
  monkeypatch.setattr(paper.time, "perf_counter", lambda: clock[0])

  def train_and_evaluate(config, run_dir):  # 40 s; epochs of 5 + 1 s, then 3 + 1 s
    trained.append((config.bucketing.strategy, config.num_epochs, config.patience))
    write_finished_run(run_dir, epochs=config.num_epochs)
    rows = [{"epoch": i, "epoch_time_s": 5.0 - 2 * i, "eval_time_s": 1.0} for i in range(2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plan = {"num_buckets": config.bucketing.num_buckets, "padded_timesteps_with_filler": 4800}
    (run_dir / "plan.json").write_text(json.dumps(plan))
    clock[0] += 40
    return json.loads((run_dir / "summary.json").read_text())

  class Plan:
    def __init__(self, config, train_set, devices, cost_model):
      plans.append((config.bucketing.strategy, devices, cost_model))
      self.num_buckets = config.bucketing.num_buckets

    def summary(self):
      return {"padded_timesteps_with_filler": 1200 // self.num_buckets}

  measured = type("Measured", (), {"model": "measured model", "report": {"measure_s": 7.0}})
  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  monkeypatch.setattr(train, "load_data", lambda config: ("train set", {}, []))
  monkeypatch.setattr(train, "make_data_mesh", lambda: None)
  monkeypatch.setattr(train, "auto_cost_model", lambda *args: measured)
  monkeypatch.setattr(train, "make_train_plan", Plan)
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--buckets", "2"]
  args = paper.parse_args([*argv, "--strategies", "none,optimal,auto", "--epochs", "5"])
  assert paper.probe(args, 2, tmp_path, "none", 1) == 0
  assert not (tmp_path / "probe" / "planned.json").exists()  # the last probe run plans
  assert paper.probe(args, 2, tmp_path, "optimal", 2) == 0
  assert trained == [("none", 2, 2), ("optimal", 2, 2)]  # PROBE_EPOCHS, whatever the preset
  times = json.loads((tmp_path / "probe" / "none_k1.json").read_text())
  assert (times["wall_s"], times["epoch_s"]) == (40.0, 4.0)  # the second epoch, evaluated
  assert (times["num_buckets"], times["padded"], times["compile_wall_s"]) == (1, 4800, 3.0)
  planned = json.loads((tmp_path / "probe" / "planned.json").read_text())["planned"]
  assert planned == [
    {"strategy": s, "requested_buckets": k, "num_buckets": k, "padded": 1200 // k, "measure_s": m}
    for s, k, m in (("none", 1, 0.0), ("optimal", 2, 0.0), ("auto", 2, 7.0))
  ]
  # planned for the probe's device count, auto with the cost model its run will measure
  assert plans == [("none", 2, None), ("optimal", 2, None), ("auto", 2, "measured model")]


def test_each_device_counts_rows_compare_with_its_own_baseline(tmp_path):
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path), "--devices", "1,2"]
  args = paper.parse_args([*argv, "--buckets", "2", "--strategies", "none,optimal"])
  for run in ("devices1/none_k1", "devices2/none_k1", "devices2/optimal_k2"):
    write_finished_run(tmp_path / run)  # epochs of 1 s
  rows = [{"epoch": i, "epoch_time_s": 3.0, "val_loss": 3.0 - i} for i in range(2)]
  metrics = "".join(json.dumps(row) + "\n" for row in rows)
  (tmp_path / "devices2/none_k1/metrics.jsonl").write_text(metrics)
  rows, _, unfinished = paper.collect(args, [1, 2])
  assert [(row["devices"], row["strategy"], row["speed-up"]) for row in rows] == [
    ("1", "none", "1.000"),
    ("2", "none", "1.000"),
    ("2", "optimal", "3.000"),  # 3 s of the baseline on 2 devices over 1 s
  ]
  assert unfinished == ["devices1/optimal_k2"]


def test_an_auto_run_without_its_cost_model_on_record_is_named(tmp_path):
  write_finished_run(tmp_path)
  with pytest.raises(ValueError, match=r"plan.json: no cost_model"):
    paper.read_table_run(tmp_path, "auto")
  paper.read_table_run(tmp_path, "optimal")
