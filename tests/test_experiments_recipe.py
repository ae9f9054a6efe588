"""The recipe study: candidates change exactly their fields, mistakes are one line, the table is
read from the runs' files, and a study started again reuses its runs."""

import csv
import json
import math
import pathlib
import types

import ml_collections
import pytest

import cli_errors
from experiments import paper, recipe


def tiny_args(tmp_path, *extra):
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  return recipe.parse_args([*argv, "--minutes-per-run", "0.75", *extra])


def flat(config, prefix: str = "") -> dict:
  """Every field's value by dotted path."""
  fields = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      fields |= flat(value, f"{prefix}{key}.")
    else:
      fields[f"{prefix}{key}"] = value
  return fields


def test_candidates_change_exactly_their_fields(tmp_path):
  args = tiny_args(tmp_path, "--candidates", "base,raw_points,hidden_32,tokens_4096,constant_lr")
  args.set = ["mine:model.num_layers=3,optimizer.learning_rate=5e-3,optimizer.schedule=constant"]
  base = recipe.base_config(args)
  assert base.data.test_split is None and base.compilation_cache_dir == ""
  expected = {
    "base": {},
    "raw_points": {"data.features.resample_spacing": None},
    "hidden_32": {"model.hidden_size": 32},
    "tokens_4096": {"bucketing.max_tokens": 4096, "bucketing.batch_size": 0},
    "constant_lr": {"optimizer.schedule": "constant"},
    "mine": {
      "model.num_layers": 3,
      "optimizer.learning_rate": 5e-3,
      "optimizer.schedule": "constant",
    },
  }
  candidates = recipe.resolve_candidates(args)
  assert [candidate.name for candidate in candidates] == list(expected)
  base_fields = flat(base)
  for candidate in candidates:
    fields = flat(recipe.candidate_config(base, candidate))
    changed = {field: value for field, value in fields.items() if value != base_fields[field]}
    assert changed == expected[candidate.name], candidate.name
    # Only the batch and token budgets take the square-root learning-rate rule.
    assert candidate.scale_lr == (candidate.name == "tokens_4096")

  # --base changes the preset under every candidate; a candidate's own field wins.
  args.base = "model.hidden_size=24,model.dropout_rate=0"
  changed_base = flat(recipe.base_config(args))
  assert {f: v for f, v in changed_base.items() if v != base_fields[f]} == {
    "model.hidden_size": 24,
    "model.dropout_rate": 0.0,
  }
  hidden_32 = recipe.candidate_config(recipe.base_config(args), candidates[2])
  assert (hidden_32.model.hidden_size, hidden_32.model.dropout_rate) == (32, 0.0)


def test_every_family_sets_its_field_and_a_batch_drops_the_token_budget(tmp_path):
  args = tiny_args(tmp_path, "--base", "bucketing.max_tokens=2048")  # tiny: batch 8, lr 3e-3
  base = recipe.base_config(args)
  base_fields = flat(base)
  expected = {
    "resample_0.5": {"data.features.resample_spacing": 0.5},  # tiny: 0.2
    "layers_3": {"model.num_layers": 3},
    "dropout_0.25": {"model.dropout_rate": 0.25},
    "lr_1e-3": {"optimizer.learning_rate": 1e-3},
    "batch_16": {"bucketing.batch_size": 16, "bucketing.max_tokens": 0},
  }
  for name, changes in expected.items():
    candidate = recipe.named_candidate(name)
    fields = flat(recipe.candidate_config(base, candidate))
    assert {f: v for f, v in fields.items() if v != base_fields[f]} == changes, name
    assert candidate.scale_lr == (name == "batch_16"), name


def test_the_base_ranks_by_cer_quick_takes_two_buckets_and_the_test_split_waits(tmp_path):
  """The test split is scored after training, outside the budget: IAM-OnDB's preset has one."""
  argv = ["--workdir", str(tmp_path), "--minutes-per-run", "1"]
  iam_full = recipe.base_config(recipe.parse_args([*argv, "--dataset", "iam_ondb"]))
  assert paper.make_config("full", "iam_ondb").data.test_split == "test"
  assert iam_full.data.test_split is None and iam_full.selection_metric == "val_cer"
  quick = recipe.base_config(
    recipe.parse_args([*argv, "--preset", "quick", "--dataset", "synthetic"])
  )
  assert paper.make_config("quick", "synthetic").bucketing.num_buckets == 4
  assert quick.bucketing.num_buckets == 2 and quick.selection_metric == "val_cer"


@pytest.mark.parametrize(
  ("extra", "message"),
  [
    (["--candidates", "base,hidden_32,base"], "candidate 'base' is given twice"),
    (
      ["--candidates", "base", "--set", "base_2:seed=2", "--set", "base_2:seed=3"],
      "'base_2' is given",
    ),
    (["--set", "hidden_32:seed=1"], "--set hidden_32: the name of a built-in candidate"),
  ],
)
def test_a_name_is_one_candidate(tmp_path, extra, message):
  """Two candidates of one name would share a folder; a family's name is its candidate's."""
  with pytest.raises(cli_errors.UsageError, match=message):
    recipe.resolve_candidates(tiny_args(tmp_path, *extra))


def test_the_square_root_rule_scales_by_sequences_per_step(tmp_path):
  base = recipe.base_config(tiny_args(tmp_path))  # batch 8, lr 3e-3
  plan = {"num_examples": 96, "steps_per_epoch": [4, 2]}  # 16 sequences per step
  assert recipe.sequences_per_step(plan) == 16
  assert recipe.scaled_learning_rate(base, plan) == pytest.approx(3e-3 * math.sqrt(2))


def test_changes_name_the_fields_and_the_learning_rate_rule(tmp_path):
  assert recipe.named_candidate("base").changes() == "none (the preset)"
  assert recipe.named_candidate("hidden_32").changes() == "model.hidden_size=32"
  assert recipe.named_candidate("tokens_4096").changes() == (
    "bucketing.max_tokens=4096, bucketing.batch_size=0; lr x sqrt(S / B)"
  )
  # A --set candidate's assignments as given, spaces around them dropped.
  args = tiny_args(tmp_path, "--set", "mine: model.hidden_size = 24, model.num_layers=3")
  (mine,) = recipe.resolve_candidates(args)
  assert mine.changes() == "model.hidden_size=24, model.num_layers=3"
  config = recipe.candidate_config(recipe.base_config(args), mine)
  assert (config.model.hidden_size, config.model.num_layers) == (24, 3)


def test_planned_epochs_fill_the_plan_share_of_the_budget_after_the_fixed_cost():
  # 95 s of a 100 s budget, 10 s fixed: 85 s hold 21 epochs of 4 s (all 100 s would hold 22).
  assert recipe.PLAN_SHARE == 0.95
  assert recipe.planned_epochs(10.0, 4.0, 100.0) == 21
  assert recipe.planned_epochs(100.0, 4.0, 100.0) == 0  # the fixed cost alone overruns the share
  assert recipe.planned_epochs(0.0, 1e-6, 1.0) == recipe.MAX_EPOCHS


@pytest.mark.parametrize(
  ("extra", "message"),
  [
    (
      ["--set", "typo:model.hiden_size=32"],
      "candidate 'typo': model.hiden_size=32: no config field 'hiden_size'; did you mean "
      "'hidden_size'?",
    ),
    (
      ["--set", "bad:model.hidden_size=wide"],
      "candidate 'bad': model.hidden_size=wide: invalid literal for int()",
    ),
    (["--set", "bad:model.hidden_size"], "--set 'bad:model.hidden_size': 'model.hidden_size' is"),
    (["--candidates", "base,widest_2"], "unknown candidate 'widest_2'; known: base, "),
    (["--candidates", "hidden_x"], "candidate 'hidden_x': 'x' is not an integer"),
    (["--candidates", "layers_1.5"], "candidate 'layers_1.5': '1.5' is not an integer"),
    (["--candidates", "lr_fast"], "candidate 'lr_fast': 'fast' is not a number"),
    (["--set", "base:seed=1"], "--set base: the name of a built-in"),
    (["--set", "nofields"], "--set 'nofields': expected NAME:field=value"),
    (["--set", "nofield:=3"], "--set 'nofield:=3': '=3' is not field=value"),
    (
      [
        "--candidates",
        "tokens_4096",
        "--base",
        "bucketing.batch_size=0,bucketing.max_tokens=2048",
      ],
      "tokens_4096: the learning-rate rule scales from the base's batch size",
    ),
    (
      ["--candidates", "base", "--base", "optimizer.lr=1"],
      "--base: optimizer.lr=1: no config field 'lr'",
    ),
  ],
)
def test_a_mistake_is_one_line_exit_2_before_anything_runs(tmp_path, capsys, extra, message):
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path / "study")]
  argv += ["--minutes-per-run", "0.75", *extra]
  assert cli_errors.run(lambda: recipe.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: {message}") and error.count("\n") == 1, error
  assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
  ("name", "message"),
  [
    ("..", "--set '..:model.hidden_size=8': candidate name '..' is not a folder name"),
    (".", "--set '.:model.hidden_size=8': candidate name '.' is not a folder name"),
    ("a/b", "--set 'a/b:model.hidden_size=8': candidate name 'a/b' is not a folder name"),
  ],
)
def test_a_candidate_name_must_be_a_folder_in_the_workdir(
  tmp_path, capsys, monkeypatch, name, message
):
  """`..` named the workdir's parent: its candidate.json and probe/ were written outside it."""
  monkeypatch.setattr(recipe, "run_worker_process", lambda *args: False)  # would have trained
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path / "inner")]
  argv += ["--minutes-per-run", "0.75", "--set", f"{name}:model.hidden_size=8"]
  assert cli_errors.run(lambda: recipe.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: {message}") and error.count("\n") == 1, error
  assert not list(tmp_path.iterdir())


def test_a_family_value_that_makes_no_folder_name_is_named_with_its_flag(tmp_path):
  with pytest.raises(cli_errors.UsageError, match="--candidates: candidate name 'hidden_ 8' is"):
    recipe.resolve_candidates(tiny_args(tmp_path, "--candidates", "base,hidden_ 8"))


def test_an_interrupted_study_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(recipe, "run_worker_process", lambda *args: False)  # Ctrl-C
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--minutes-per-run", "0.75", "--candidates", "base"]
  assert cli_errors.run(lambda: recipe.main(argv)) == 130
  assert capsys.readouterr().err == "interrupted before any candidate finished: nothing to report\n"


@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_worker_stopped_by_a_signal_exits_with_its_code(tmp_path, monkeypatch, signal_name, code):
  """Not 'error: stopped by SIGINT' and exit 2: the parent, stopped by the same Ctrl-C, reports."""
  import train

  stopped = {"stopped_by": signal_name}
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: stopped)
  args = tiny_args(tmp_path, "--candidates", "base")
  assert recipe.run_worker(args, "train", "base") == code  # in its probe
  (tmp_path / "base").mkdir()
  schedule = {"planned_epochs": 2, "learning_rate": 1e-3, "sequences_per_step": 8, "epoch_s": 1}
  (tmp_path / "base" / "schedule.json").write_text(json.dumps(schedule))
  assert recipe.run_worker(args, "train", "base") == code  # in its run
  assert not (tmp_path / "base" / "result.json").exists()


class FakeTraining:
  """`train.train_and_evaluate` on a fake clock: the probe takes `probe_s` (10 s of set-up, then
  an epoch of 3 s training and 1 s validation), a run 50 s; each call's workdir and config are
  kept. The plan: 96 lines in 6 steps, 16 per step."""

  def __init__(self, monkeypatch, probe_s=14.0, run_stopped_by=None):
    import train

    self.now, self.probe_s, self.run_stopped_by, self.calls = 0.0, probe_s, run_stopped_by, []
    monkeypatch.setattr(train, "train_and_evaluate", self)
    monkeypatch.setattr(recipe, "time", types.SimpleNamespace(perf_counter=lambda: self.now))
    loads = iter([(1.5, 0, 0), (2.5, 0, 0)])
    monkeypatch.setattr(recipe.os, "getloadavg", lambda: next(loads))

  def __call__(self, config, workdir):
    workdir = pathlib.Path(workdir)
    probe = workdir.name == "probe"
    self.calls.append((workdir.name, workdir.exists(), config.copy_and_resolve_references()))
    epochs = [(3.0, 1.0, 50.0, 0.8)] if probe else [(3.0, 1.0, 40.0, 0.6), (3.0, 1.0, 30.0, 0.5)]
    workdir.mkdir(parents=True)
    (workdir / "summary.json").write_text(json.dumps({"time_to_first_step_s": 2.0}))
    (workdir / "plan.json").write_text(json.dumps({"num_examples": 96, "steps_per_epoch": [4, 2]}))
    rows = [
      {"epoch": i, "epoch_time_s": t, "eval_time_s": e, "val_loss": loss, "val_cer": cer}
      for i, (t, e, loss, cer) in enumerate(epochs)
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    self.now += self.probe_s if probe else 50.0
    stopped_by = None if probe else self.run_stopped_by
    return {"stopped_by": stopped_by, "epochs": len(rows)}


@pytest.mark.parametrize(
  ("name", "learning_rate"),
  [("tokens_4096", 3e-3 * math.sqrt(16 / 8)), ("base", 3e-3)],  # tiny: batch 8, lr 3e-3
)
def test_a_worker_plans_its_run_from_its_probe(tmp_path, monkeypatch, name, learning_rate):
  """Budget 60 s: its 95% (57 s) less the probe's 10 s of set-up hold 11 epochs of 4 s (47 s).
  Only a token or batch budget takes the square-root rule, from its plan's 16 lines per step."""
  fake = FakeTraining(monkeypatch)
  args = tiny_args(tmp_path, "--candidates", name, "--minutes-per-run", "1")
  assert recipe.run_worker(args, "train", name) == 0
  (probe_dir, probe_existed, probe), (run_dir, run_existed, run) = fake.calls
  assert (probe_dir, run_dir) == ("probe", "train") and not probe_existed and not run_existed
  # The probe: one epoch, every step compiled first, stopped by the budget if it is too slow.
  assert (probe.num_epochs, probe.compile_mode, probe.max_minutes) == (1, "parallel", 1.0)
  schedule = json.loads((tmp_path / name / "schedule.json").read_text())
  assert (schedule["fixed_s"], schedule["epoch_s"], schedule["planned_epochs"]) == (10, 4, 11)
  assert schedule["sequences_per_step"] == 16
  assert schedule["learning_rate"] == pytest.approx(learning_rate)
  # The run: the planned epochs (no early stop), the learning rate, the budget; its own compiling.
  assert (run.num_epochs, run.patience, run.max_minutes) == (11, 11, 1.0)
  assert run.optimizer.learning_rate == pytest.approx(learning_rate)
  assert run.compile_mode == recipe.base_config(args).compile_mode != "parallel"
  result = json.loads((tmp_path / name / "result.json").read_text())
  assert result == {"wall_s": 50.0, "ended_by": "epochs", "load": [1.5, 2.5]}


def test_a_run_cut_short_trains_again_from_its_start_without_a_new_probe(tmp_path, monkeypatch):
  """Killed after its probe: the schedule stands, the unfinished run's files go (a budget cannot
  be split across starts). Stopped by the budget this time, it says so."""
  fake = FakeTraining(monkeypatch, run_stopped_by="max_minutes")
  args = tiny_args(tmp_path, "--candidates", "base", "--minutes-per-run", "1")
  schedule = {"planned_epochs": 7, "learning_rate": 1e-3, "sequences_per_step": 8, "epoch_s": 5}
  (tmp_path / "base" / "train").mkdir(parents=True)
  (tmp_path / "base" / "train" / "metrics.jsonl").write_text("")  # the killed run's
  (tmp_path / "base" / "schedule.json").write_text(json.dumps(schedule))
  assert recipe.run_worker(args, "train", "base") == 0
  ((run_dir, run_existed, run),) = fake.calls
  assert run_dir == "train" and not run_existed
  assert (run.num_epochs, run.optimizer.learning_rate) == (7, 1e-3)
  result = json.loads((tmp_path / "base" / "result.json").read_text())
  assert (result["wall_s"], result["ended_by"]) == (50.0, "budget")


def test_a_probe_whose_set_up_leaves_no_epoch_in_the_budget_is_one_line(tmp_path, monkeypatch):
  """A 60 s probe: 56 s of set-up leave 1 s of the 57 s share, less than an epoch of 4 s."""
  fake = FakeTraining(monkeypatch, probe_s=60.0)
  args = tiny_args(tmp_path, "--candidates", "base", "--minutes-per-run", "1")
  message = "base: set-up 56 s and one epoch 4 s do not fit in --minutes-per-run 1"
  with pytest.raises(cli_errors.UsageError, match=message):
    recipe.run_worker(args, "train", "base")
  assert [call[0] for call in fake.calls] == ["probe"]
  assert not (tmp_path / "base" / "schedule.json").exists()


def test_the_test_worker_scores_the_best_checkpoint_on_the_whole_split(tmp_path, monkeypatch):
  import train

  scored = []

  def evaluate_checkpoint(config, workdir, split, checkpoint="best"):
    scored.append((config.data.eval_limit, config.selection_metric, workdir, split, checkpoint))
    return {"cer": 0.25}

  monkeypatch.setattr(train, "evaluate_checkpoint", evaluate_checkpoint)
  args = tiny_args(tmp_path, "--candidates", "base")
  assert recipe.base_config(args).data.eval_limit == 16  # tiny validates on 16 lines
  (tmp_path / "base").mkdir()
  assert recipe.run_worker(args, "test", "base") == 0
  assert scored == [(0, "val_cer", tmp_path / "base" / "train", "test", "best")]
  assert recipe.read_test_cer(tmp_path / "base" / "test.json") == 0.25


def test_a_workers_error_names_its_candidate(tmp_path, capsys):
  """Found by the worker (the parent does not import JAX), so its one line must say whose."""
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--minutes-per-run", "0.75", "--candidates", "hidden_-5", "--worker", "train:hidden_-5"]
  assert cli_errors.run(lambda: recipe.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith("error: candidate 'hidden_-5': config.model: hidden_size must be >= 1")


def test_a_data_dir_without_iam_ondb_is_an_error_not_the_synthetic_set(
  tmp_path, capsys, monkeypatch
):
  monkeypatch.delenv("IAM_ONDB_DIR", raising=False)
  argv = ["--preset", "tiny", "--data-dir", str(tmp_path / "empty"), "--candidates", "base"]
  argv += ["--workdir", str(tmp_path / "study"), "--minutes-per-run", "0.75"]
  assert cli_errors.run(lambda: recipe.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: --data-dir {tmp_path / 'empty'} holds no IAM-OnDB")
  assert error.count("\n") == 1 and not (tmp_path / "study").exists()


def write_run(candidate_dir, epochs: list[tuple[float, float, float, float]], **files) -> None:
  """A finished candidate's files: (epoch time, eval time, val loss, val CER) per epoch."""
  run_dir = candidate_dir / "train"
  run_dir.mkdir(parents=True)
  (run_dir / "summary.json").write_text(json.dumps({"time_to_first_step_s": 10.0}))
  (run_dir / "plan.json").write_text(json.dumps({"num_examples": 48, "steps_per_epoch": [6]}))
  rows = [
    {"epoch": i, "epoch_time_s": t, "eval_time_s": e, "val_loss": loss, "val_cer": cer}
    for i, (t, e, loss, cer) in enumerate(epochs)
  ]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  for name, content in files.items():
    (candidate_dir / f"{name}.json").write_text(json.dumps(content))


def test_rows_compare_at_equal_wall_time_from_the_metrics(tmp_path):
  schedule = {
    "learning_rate": 3e-3,
    "sequences_per_step": 8.0,
    "epoch_s": 12.25,
    "planned_epochs": 4,
  }
  common = {
    "schedule": schedule,
    "result": {"wall_s": 99.6, "ended_by": "epochs", "load": [1.0, 2.54]},
  }
  # Clock: 10 s to the first step, then 20 s per epoch: 30, 50, 70, 90 s; budget 100 s.
  write_run(
    tmp_path / "slow",
    [(15, 5, 60.0, 0.9), (15, 5, 40.0, 0.6), (15, 5, 45.0, 0.7), (15, 5, 41.0, 0.5)],
    candidate={"changes": "none (the preset)"},
    **common,
  )
  # 10 s per epoch: 20, 30 s, and a test score.
  write_run(
    tmp_path / "fast",
    [(8, 2, 50.0, 0.8), (8, 2, 30.0, 0.4)],
    candidate={"changes": "model.hidden_size=32"},
    test={"cer": 0.45},
    **common,
  )
  slow, fast = (recipe.candidate_row(tmp_path / name, 100.0) for name in ("slow", "fast"))
  assert slow["val CER at 25%"] == "-"  # no epoch had ended by 25 s
  assert slow["val CER at 50%"] == "0.6000"  # the lowest by 50 s, not the last
  assert (slow["best val CER"], slow["at (s)"], slow["best val loss"]) == ("0.5000", "90", "40.000")
  assert (slow["epochs (planned)"], slow["probe epoch (s)"], slow["test CER"]) == (
    "4 (4)",
    "12.2",
    "-",
  )
  assert (fast["val CER at 25%"], fast["val CER at 50%"]) == ("0.8000", "0.4000")
  assert (fast["best val CER"], fast["at (s)"], fast["test CER"]) == ("0.4000", "30", "0.4500")
  assert (fast["changes"], fast["run wall (s)"], fast["load"]) == (
    "model.hidden_size=32",
    "100",
    "1.0-2.5",
  )
  assert recipe.winner([slow, fast]) == "fast"
  # The schedule's numbers in their own columns; validated epochs first, then the planned ones.
  assert (fast["learning rate"], fast["sequences per step"], fast["epochs (planned)"]) == (
    "0.003",
    "8.0",
    "2 (4)",
  )


def test_the_best_and_the_lowest_by_a_share_of_the_budget_need_not_be_the_last_epoch(tmp_path):
  """A CER that rises after its lowest (the two runs above end on their lowest)."""
  # Clock: 10 s to the first step, then 10 s per epoch: 20, 30, 40 s; budget 100 s.
  write_run(
    tmp_path / "rising",
    [(8, 2, 50.0, 0.8), (8, 2, 45.0, 0.3), (8, 2, 40.0, 0.5)],
    candidate={"changes": "none (the preset)"},
    schedule={"learning_rate": 3e-3, "sequences_per_step": 8.0, "epoch_s": 10, "planned_epochs": 3},
    result={"wall_s": 45.0, "ended_by": "epochs", "load": [1.0, 1.0]},
  )
  row = recipe.candidate_row(tmp_path / "rising", 100.0)
  assert (row["val CER at 25%"], row["val CER at 50%"]) == ("0.8000", "0.3000")
  assert (row["best val CER"], row["at (s)"], row["best val loss"]) == ("0.3000", "30", "40.000")


def test_a_run_without_a_validated_epoch_is_a_row_of_dashes_that_does_not_win(tmp_path):
  """Its one epoch did not end within the budget (a run slower than its probe)."""
  common = {
    "candidate": {"changes": "none (the preset)"},
    "schedule": {
      "learning_rate": 3e-3,
      "sequences_per_step": 8,
      "epoch_s": 50,
      "planned_epochs": 1,
    },
    "result": {"wall_s": 60.0, "ended_by": "budget", "load": [1.0, 1.0]},
  }
  write_run(tmp_path / "slow", [], **common)
  write_run(tmp_path / "fast", [(8, 2, 50.0, 0.9)], **common)
  slow, fast = (recipe.candidate_row(tmp_path / name, 60.0) for name in ("slow", "fast"))
  assert [slow[column] for column in ("best val CER", "at (s)", "val CER at 50%")] == ["-"] * 3
  assert slow["epochs (planned)"] == "0 (1)"
  assert recipe.winner([slow, fast]) == "fast" and recipe.winner([slow]) is None


def write_finished_candidate(candidate_dir) -> None:
  """A candidate whose run, schedule, result and test score are on file: the study reports it."""
  write_run(
    candidate_dir,
    [(8, 2, 50.0, 0.8), (8, 2, 30.0, 0.4)],
    schedule={"learning_rate": 3e-3, "sequences_per_step": 8.0, "epoch_s": 10, "planned_epochs": 2},
    result={"wall_s": 40.0, "ended_by": "epochs", "load": [1.0, 1.5]},
    test={"cer": 0.45},
  )


@pytest.mark.parametrize(
  ("name", "text", "message"),
  [
    ("result.json", "{}", "result.json: no wall_s, ended_by, load, so not a recipe run's result"),
    ("result.json", '{"wall_s": 1, "ended_by": "epochs", "load": 2}', "result.json: load is 2,"),
    ("test.json", "{}", "test.json: no cer, so not a recipe candidate's test scores"),
    ("test.json", '{"cer": null}', "test.json: cer is null, not a number"),
    ("schedule.json", "{}", "schedule.json: no planned_epochs, learning_rate, sequences_per_step"),
    (
      "schedule.json",
      '{"learning_rate": 1, "sequences_per_step": 8, "epoch_s": 1, "planned_epochs": 2.5}',
      "schedule.json: planned_epochs is 2.5, not an integer",
    ),
    ("train/summary.json", "{}", "summary.json: no time_to_first_step_s, so not the file this"),
    ("train/summary.json", '{"time_to_first_step_s": "10"}', 'time_to_first_step_s is "10", not'),
    ("train/plan.json", "{}", "plan.json: no num_examples, steps_per_epoch, so not the file"),
    ("train/metrics.jsonl", '{"epoch": 0}\n', "metrics.jsonl, line 1: no epoch_time_s; no eval"),
  ],
)
def test_a_damaged_file_of_a_finished_candidate_is_named_and_nothing_is_written(
  tmp_path, capsys, name, text, message
):
  """Valid JSON without the fields the table reads was a KeyError's traceback."""
  write_finished_candidate(tmp_path / "base")
  (tmp_path / "base" / name).write_text(text)
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--minutes-per-run", "0.75", "--candidates", "base", "--json"]
  assert cli_errors.run(lambda: recipe.main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: {tmp_path / 'base'}/") and message in error, error
  assert error.count("\n") == 1
  assert not list(tmp_path.glob("recipe*"))  # every file is read before any is written


def test_a_finished_candidates_files_make_the_report(tmp_path, capsys):
  """The files `write_finished_candidate` fakes are whole: each damaged one above is the error."""
  write_finished_candidate(tmp_path / "base")
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  recipe.main([*argv, "--minutes-per-run", "0.75", "--candidates", "base", "--json"])
  (row,) = json.loads(capsys.readouterr().out)["rows"]
  assert (row["best val CER"], row["test CER"], row["load"]) == ("0.4000", "0.4500", "1.0-1.5")
  assert (tmp_path / "recipe.md").is_file()


def fake_workers(monkeypatch, workdir, cers: dict, interrupted=()) -> list:
  """`run_worker_process` without processes: a train worker writes a finished run of 2 epochs
  (clock 20 and 30 s) with the candidate's two validation CERs, or is interrupted; a test worker
  writes a test CER. Returns the (phase, name) of every worker started."""
  started = []

  def run_worker_process(argv, phase, name):
    started.append((phase, name))
    if name in interrupted:
      return False
    if phase == "train":
      first, last = cers[name]
      write_run(
        workdir / name,
        [(8, 2, 50.0, first), (8, 2, 30.0, last)],
        schedule={
          "learning_rate": 3e-3,
          "sequences_per_step": 8,
          "epoch_s": 10,
          "planned_epochs": 2,
        },
        result={"wall_s": 40.0, "ended_by": "epochs", "load": [1.0, 1.5]},
      )
    else:
      (workdir / name / "test.json").write_text(json.dumps({"cer": 0.5}))
    return True

  monkeypatch.setattr(recipe, "run_worker_process", run_worker_process)
  return started


def test_only_the_winner_is_tested_and_every_finished_candidate_is_a_row(
  tmp_path, capsys, monkeypatch
):
  started = fake_workers(monkeypatch, tmp_path, {"base": (0.8, 0.4), "hidden_32": (0.7, 0.3)})
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--minutes-per-run", "0.75", "--candidates", "base,hidden_32", "--json"]
  assert recipe.main(argv) == tmp_path / "recipe.md"
  assert started == [("train", "base"), ("train", "hidden_32"), ("test", "hidden_32")]
  printed = json.loads(capsys.readouterr().out)
  assert printed["winner"] == "hidden_32"
  rows = {row["candidate"]: row for row in printed["rows"]}
  # Budget 45 s: nothing by 25% (11 s), the first epoch (20 s) by 50% (22.5 s).
  assert [(r["val CER at 25%"], r["val CER at 50%"], r["test CER"]) for r in rows.values()] == [
    ("-", "0.8000", "-"),
    ("-", "0.7000", "0.5000"),
  ]
  with open(tmp_path / "recipe.csv", newline="") as file:
    assert [row["candidate"] for row in csv.DictReader(file)] == ["base", "hidden_32"]


@pytest.mark.parametrize(
  ("test", "tested"), [("all", ["base", "hidden_32"]), ("none", []), ("winner", ["hidden_32"])]
)
def test_test_says_whose_test_cer_is_scored(tmp_path, capsys, monkeypatch, test, tested):
  started = fake_workers(monkeypatch, tmp_path, {"base": (0.8, 0.4), "hidden_32": (0.7, 0.3)})
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--minutes-per-run", "0.75", "--candidates", "base,hidden_32", "--test", test]
  recipe.main(argv)
  assert [name for phase, name in started if phase == "test"] == tested
  # Started again scoring none, the report keeps the scores already in the workdir, and says so.
  started.clear()
  recipe.main([*argv, "--test", "none"])
  assert started == []
  report = (tmp_path / "recipe.md").read_text()
  assert (
    f"(scored for: {', '.join(tested) or 'none'}; by this command, `--test none`, or an earlier one"
    in report
  )


def test_an_interrupted_study_reports_what_finished_tests_nothing_and_exits_130(
  tmp_path, capsys, monkeypatch
):
  """hidden_32 is cut short (Ctrl-C): layers_2 never starts, base's test is not scored."""
  cers = {"base": (0.8, 0.4), "layers_2": (0.7, 0.3)}
  started = fake_workers(monkeypatch, tmp_path, cers, interrupted=("hidden_32",))
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--minutes-per-run", "0.75", "--candidates", "base,hidden_32,layers_2", "--json"]
  assert recipe.main(argv) == 130
  assert started == [("train", "base"), ("train", "hidden_32")]
  printed = json.loads(capsys.readouterr().out)
  assert printed["winner"] == "base" and [row["candidate"] for row in printed["rows"]] == ["base"]
  assert printed["rows"][0]["test CER"] == "-"


def test_a_refused_candidate_starts_over_with_a_larger_budget_and_a_finished_one_is_kept(
  tmp_path, capsys, monkeypatch
):
  def refused(argv, phase, name):  # its probe found one epoch longer than the budget
    (tmp_path / name / "probe").mkdir()
    raise cli_errors.UsageError(f"candidate {name!r}: base: one epoch does not fit")

  def finished(argv, phase, name):
    write_finished_candidate(tmp_path / name)
    return True

  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--candidates", "base", "--test", "none"]
  monkeypatch.setattr(recipe, "run_worker_process", refused)
  assert cli_errors.run(lambda: recipe.main([*argv, "--minutes-per-run", "0.1"])) == 2
  monkeypatch.setattr(recipe, "run_worker_process", finished)
  capsys.readouterr()
  recipe.main([*argv, "--minutes-per-run", "0.75"])
  assert "base: unfinished, with other settings before: starting it over" in capsys.readouterr().err
  assert not (tmp_path / "base" / "probe").exists()
  settings = json.loads((tmp_path / "base" / recipe.CANDIDATE_FILE).read_text())
  assert settings["minutes_per_run"] == 0.75

  # Finished, it is reused, so other settings are refused.
  assert cli_errors.run(lambda: recipe.main([*argv, "--minutes-per-run", "1"])) == 2
  assert "holds a run of 'base' with other settings" in capsys.readouterr().err


def test_a_candidate_file_without_its_changes_is_named(tmp_path):
  write_finished_candidate(tmp_path / "base")
  (tmp_path / "base" / "candidate.json").write_text("{}")
  with pytest.raises(ValueError, match=r"candidate.json: no changes, so not a recipe candidate's"):
    recipe.candidate_row(tmp_path / "base", 100.0)


@pytest.mark.slow
def test_a_study_writes_table_and_plot_from_its_run_and_a_restart_reuses_it(tmp_path, capsys):
  """One real candidate (a token budget, so the worker applies the learning-rate rule), ~1.5 min:
  45 s leave room for a set-up that now includes waiting for compiles, on a loaded machine."""
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--candidates", "tokens_8192"]
  markdown_path = recipe.main([*argv, "--minutes-per-run", "0.75"])
  with open(tmp_path / "recipe.csv", newline="") as file:
    (row,) = list(csv.DictReader(file))
  assert list(row) == list(recipe.COLUMNS)

  # The row's numbers are the run's: its metrics, its plan's learning rate, its test score.
  run = paper.read_run(tmp_path / "tokens_8192" / "train")
  cers = [epoch["val_cer"] for epoch in run["history"]]
  assert cers and row["best val CER"] == f"{min(cers):.4f}"
  assert row["best val loss"] == f"{min(e['val_loss'] for e in run['history']):.3f}"
  assert row["epochs (planned)"].split()[0] == str(len(cers))
  base = recipe.base_config(recipe.parse_args([*argv, "--minutes-per-run", "0.75"]))
  learning_rate = recipe.scaled_learning_rate(base, run["plan"])
  assert learning_rate != base.optimizer.learning_rate
  assert row["learning rate"] == f"{learning_rate:.3g}"
  test = json.loads((tmp_path / "tokens_8192" / "test.json").read_text())
  assert row["test CER"] == f"{test['cer']:.4f}" and test["examples"] > 16  # the whole split
  # The budget held: the run stopped by its last planned epoch or at the budget.
  assert float(row["run wall (s)"]) <= 45 + 10

  # The Markdown table is the CSV; the header names machine, load and command; the plot exists.
  text = markdown_path.read_text()
  assert "Machine:" in text and "load average" in text and "python -m experiments.recipe" in text
  table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
  assert cells == [list(recipe.COLUMNS), list(row.values())]
  assert (tmp_path / "recipe_val_cer.png").read_bytes()[:4] == b"\x89PNG"

  # Started again, the study reuses the run and its test score and prints only JSON.
  capsys.readouterr()
  summary_path = tmp_path / "tokens_8192" / "train" / "summary.json"
  before = summary_path.stat().st_mtime_ns
  recipe.main([*argv, "--minutes-per-run", "0.75", "--json"])
  printed = json.loads(capsys.readouterr().out)
  assert printed["winner"] == "tokens_8192" and printed["rows"] == [row]
  assert summary_path.stat().st_mtime_ns == before

  # Other settings in the same workdir are refused, naming the candidate.
  changed = [*argv, "--minutes-per-run", "1.0"]
  assert cli_errors.run(lambda: recipe.main(changed)) == cli_errors.USAGE_EXIT_CODE
  assert "holds a run of 'tokens_8192' with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("minutes", ["0", "-1", "nan"])
def test_a_run_budget_must_be_a_positive_number(tmp_path, minutes):
  argv = ["--preset", "tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  with pytest.raises(
    cli_errors.UsageError, match=r"--minutes-per-run: must be a finite number > 0"
  ):
    recipe.parse_args([*argv, "--minutes-per-run", minutes])
