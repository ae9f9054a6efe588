"""Command-line mistakes with configs and experiment drivers end in one line, exit code 2."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import cli_errors
import train
from experiments import cli


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (
      ["--config=experiments/synthetic.py", "--config.bucketing.num_bukets=8"],
      "--config.bucketing.num_bukets=8: no config field 'num_bukets'; did you mean 'num_buckets'?",
    ),
    (
      ["--config=experiments/synthetic.py:nosuchvariant"],
      "--config=experiments/synthetic.py:nosuchvariant: unknown variant 'nosuchvariant' of "
      "experiments/synthetic.py; known: tiny",
    ),
    (
      ["--config=experiments/nosuchfile.py"],
      "--config: [Errno 2] No such file or directory: 'experiments/nosuchfile.py'",
    ),
    (
      ["--config=experiments/synthetic.py", "--config.model.hidden_size=big"],
      "--config.model.hidden_size=big: invalid literal for int() with base 10: 'big'",
    ),
    ([], "--config is required, e.g. --config=experiments/synthetic.py"),
    (  # a field with no near miss, and one unset with None
      ["--config=experiments/synthetic.py", "--config.model.zzz=3"],
      "--config.model.zzz=3: no config field 'zzz'",
    ),
    (
      ["--config=experiments/synthetic.py", "--config.model.zzz=None"],
      "--config.model.zzz=None: no config field 'zzz'",
    ),
  ],
)
def test_config_flag_mistakes_are_one_line_naming_the_flag(overrides, message):
  with pytest.raises(cli_errors.UsageError) as error:
    cli.load_config(["train.py", *overrides])
  assert str(error.value) == message


@pytest.mark.parametrize(
  ("source", "message"),
  [
    ("def get_config():\n  return {'seed': 0}\n", "get_config() returned a dict, not an"),
    ("def get_config():\n  pass\n", "get_config() returned None, not an"),
    ("seed = 0\n", "defines no get_config()"),
    # Before, an AttributeError traceback where the trainer first read a missing field.
    (
      "import ml_collections as mlc\n\ndef get_config():\n  return mlc.ConfigDict({'seed': 0})\n",
      "get_config() lacks",
    ),
    (
      "from experiments import common\n\ndef get_config():\n  config = common.base_config()\n"
      "  config.unlock()\n  del config.ctc, config.data.features\n  return config\n",
      "get_config() lacks 6 of the trainer's fields (ctc.batch_tile, ctc.impl, ctc.num_warps, ...)",
    ),
  ],
)
def test_a_config_file_without_a_config_dict_is_named(tmp_path, monkeypatch, source, message):
  # config_flags loads every file as the module "config_config", into the one loaded before.
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  path = tmp_path / "config.py"
  path.write_text(source)
  for argv in (["train.py", f"--config={path}"], ["train.py", "--config", str(path)]):
    with pytest.raises(cli_errors.UsageError) as error:
      cli.load_config(argv)
    assert str(error.value).startswith(f"--config={path}: {message}")


def test_a_config_file_without_get_config_is_named_as_typed(tmp_path, monkeypatch):
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  path = tmp_path / "config.py"
  path.write_text("seed = 0\n")
  for flag in (f"-config={path}", f"--config={path}:tiny"):
    with pytest.raises(cli_errors.UsageError) as error:
      cli.load_config(["train.py", flag])
    assert str(error.value) == f"{flag}: defines no get_config()"


def test_a_field_a_config_file_misspells_is_named_not_added(tmp_path, monkeypatch):
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  path = tmp_path / "config.py"
  path.write_text(
    "from experiments import common\n\ndef get_config():\n  config = common.base_config()\n"
    "  config.num_epoch = 3\n  return config\n"
  )
  with pytest.raises(cli_errors.UsageError) as error:
    cli.load_config(["train.py", f"--config={path}"])
  # Named by the file that set it: no --config.num_epoch was typed.
  assert (
    str(error.value) == f"--config={path}: no config field 'num_epoch'; did you mean 'num_epochs'?"
  )


def test_a_bad_config_value_is_one_line_through_the_runner(capsys, monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  argv = ["train.py", "--config=experiments/synthetic.py:tiny"]
  config = cli.load_config([*argv, "--config.bucketing.strategy=bogus"])
  assert config.model.hidden_size == 16  # the variant and the override both applied
  assert cli_errors.run(lambda: train.validate_config(config, 1)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: config.bucketing.strategy='bogus' is not one of")
  assert len(err.splitlines()) == 1
  with pytest.raises(AttributeError):  # the config is locked: no new fields by accident
    config.bucketing.num_bukets = 8


def test_override_parses_values_as_config_flags_do_and_leaves_its_input_alone():
  config = cli.load_config(["train.py", "--config=experiments/synthetic.py"])
  assignments = ["model.dropout_rate=0", "optimizer.schedule=constant", "model.num_layers=1"]
  assignments.append("model.input_projection_size=32")  # unset (None): it keeps its type, int
  changed = cli.override(config, assignments, "--base")
  assert (changed.model.dropout_rate, changed.optimizer.schedule) == (0.0, "constant")
  assert changed.model.input_projection_size == 32 and config.model.input_projection_size is None
  assert changed.model.num_layers == 1 and config.model.num_layers == 2
  assert isinstance(changed.model.dropout_rate, float)
  assert isinstance(changed.model.input_projection_size, int)  # a layer's width: 32.0 fails
  with pytest.raises(AttributeError):
    changed.model.num_layer = 1  # locked, as train.py's config is
  for assignment, message in [
    ("model.hiden_size=8", "--base: model.hiden_size=8: no config field 'hiden_size'; did you"),
    ("model.hidden_size=big", "--base: model.hidden_size=big: invalid literal for int()"),
  ]:
    with pytest.raises(cli_errors.UsageError, match="^" + re.escape(message)):
      cli.override(config, [assignment], "--base")


def test_none_unsets_an_optional_field_and_only_an_optional_one():
  argv = ["train.py", "--config=experiments/iam.py:gpu", "--config.data.test_split=None"]
  config = cli.load_config([*argv, "--config.data.features.resample_spacing=None"])
  assert config.data.test_split is None  # not the text "None"
  assert config.data.features.resample_spacing is None  # not a float parse error
  changed = cli.override(config, ["data.features.resample_spacing=0.1"], "--base")
  assert (
    cli.override(changed, ["data.features.resample_spacing=None"], "--base").data.features[
      "resample_spacing"
    ]
    is None
  )
  with pytest.raises(cli_errors.UsageError, match=r"hidden_size is not optional; it cannot be"):
    cli.load_config([*argv, "--config.model.hidden_size=None"])
  with pytest.raises(cli_errors.UsageError, match=r"^--base: model.num_layers=None: config.model"):
    cli.override(config, ["model.num_layers=None"], "--base")


def test_a_workdir_of_other_settings_is_refused_naming_what_differs(tmp_path):
  path, settings = tmp_path / "run" / "settings.json", {"a": 1, "b": 2, "c": 3, "d": {"e": 4}}
  cli.record_settings(path, settings)
  cli.check_settings(path, settings, "a run")  # the same settings: reused
  with pytest.raises(cli_errors.UsageError) as error:
    cli.check_settings(path, {"a": 0, "b": 0, "c": 0, "d": {"e": 0}, "f": 5}, "a run")
  assert str(error.value) == (
    f"{path.parent} holds a run with other settings (a=1 there, 0 here; b=2 there, 0 here; c=3 "
    f"there, 0 here; and 2 more; compare {path}); use a new --workdir"
  )
  # A folder made for the run, still empty, holds nothing to check; one a run wrote to with no
  # record of its settings is not reused unchecked.
  (tmp_path / "made").mkdir()
  cli.check_settings(tmp_path / "made" / "settings.json", settings, "a run", "config.json")
  (tmp_path / "made" / "metrics.jsonl").write_text("")
  with pytest.raises(cli_errors.UsageError, match=r"made holds a run with no record of its setti"):
    cli.check_settings(
      tmp_path / "made" / "settings.json", {"config": {"seed": 0}}, "a run", "config.json"
    )


def test_differences_name_each_changed_field_sorted_with_both_values():
  there, here = {"b": 2, "a": 1, "gone": 0, "same": 5}, {"a": 3, "b": 2, "new": [1], "same": 5}
  assert cli_errors.differences(there, here) == [
    "a=1 there, 3 here",
    "gone=0 there, None here",
    "new=None there, [1] here",
  ]
  # Only the fields asked about, named with the prefix; equal records differ in nothing.
  assert cli_errors.differences(there, here, ["new", "same"], prefix="config.") == [
    "config.new=None there, [1] here"
  ]
  assert cli_errors.differences(here, dict(here)) == []


def test_parse_flags_fills_absl_flags_and_keeps_the_rest():
  from absl import flags
  from ml_collections import config_flags

  flag_values = flags.FlagValues()
  argv = ["train.py", "--config=experiments/iam.py:tiny", "--workdir=/tmp/w", "extra"]
  config = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  assert cli.parse_flags(argv, flag_values) == ["train.py", "extra"]
  assert flag_values.workdir == "/tmp/w" and config.value.data.dataset == "iam_ondb"
  with pytest.raises(cli_errors.UsageError, match=r"^Unknown command line flag 'mode'$"):
    cli.parse_flags(["train.py", "--mode=x"], flag_values)
  with pytest.raises(cli_errors.UsageError, match=r"^Unknown command line flag 'mode.x'$"):
    cli.parse_flags(["train.py", "--mode.x=None"], flag_values)  # None unsets config fields only


@pytest.mark.parametrize(
  ("module", "args", "last_line"),
  [
    ("experiments.paper", ["--buckets", "2,x"], "argument --buckets: '2,x' is not a comma"),
    ("experiments.paper", ["--cost", "1,2"], "--cost '1,2' is not three or four numbers"),
    ("experiments.benchmark", ["--tiny", "--dataset", "iam_ondb"], "holds no IAM-OnDB"),
    ("experiments.benchmark_compile", ["--num-buckets", "0"], "--num-buckets: must be >= 1"),
  ],
)
def test_experiment_drivers_end_bad_input_in_one_line(tmp_path, module, args, last_line):
  env = {k: v for k, v in os.environ.items() if k not in ("IAM_ONDB_DIR", cli_errors.DEBUG_ENV)}
  env["HANDWRITING_DATA_DIR"] = str(tmp_path)  # no IAM-OnDB there
  result = subprocess.run(
    [sys.executable, "-m", module, *args, "--data-dir", str(tmp_path)],
    capture_output=True,
    text=True,
    check=False,
    env=env,
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert last_line in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  "command",
  [
    ["-m", "bucketing", "plan", "--lengths", "x.txt", "--strategy", "optimale"],
    ["-m", "handwriting", "stats", "--resample_spacing", "abc"],
    ["-m", "experiments.benchmark_step", "--xla-flags", "bogus"],
    ["-m", "experiments.paper", "--no-such-flag"],
  ],
)
def test_a_flag_argparse_refuses_is_one_line_too(command):
  done = subprocess.run(
    [sys.executable, *command],
    capture_output=True,
    text=True,
    check=False,
    env={key: value for key, value in os.environ.items() if key != cli_errors.DEBUG_ENV},
  )
  assert done.returncode == 2 and done.stdout == ""
  # Named as typed, "python -m bucketing plan", not "__main__.py" or "bucketing.__main__".
  assert re.fullmatch(rf"error: python -m {command[1]}( \w+)?: .+ \(see --help\)\n", done.stderr)


def test_help_is_the_first_paragraph_of_the_drivers_docstring(capsys, monkeypatch):
  from experiments import quickstart

  monkeypatch.setenv("COLUMNS", "200")
  with pytest.raises(SystemExit):
    quickstart.main(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "The README's quickstart run, recorded: train.py as a user types it, and a" in text
  assert "python -m experiments.quickstart #" not in text and "Runs `python train.py" not in text


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_code_130(capsys, monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)

  def measuring():
    raise KeyboardInterrupt

  assert cli_errors.run(measuring) == 130
  assert capsys.readouterr().err == "interrupted\n"


def test_the_runner_prints_one_line_for_an_error_and_none_for_one_already_reported(
  capsys, monkeypatch
):
  monkeypatch.setenv(cli_errors.DEBUG_ENV, "0")  # 0 asks for no traceback either

  def raising(error):
    def main():
      raise error

    return main

  assert cli_errors.run(raising(ValueError("bad line\n\n  in lengths.txt \n"))) == 2
  assert cli_errors.run(raising(cli_errors.AlreadyReported("train.py refused the run"))) == 2
  assert capsys.readouterr().err == "error: bad line; in lengths.txt\n"
  assert cli_errors.run(lambda: pathlib.Path("report.md")) == 0  # main returned what it wrote


def test_a_reader_that_goes_away_ends_the_command_quietly():
  # `python -m bucketing plan ... | head -1`: no "error: [Errno 32] Broken pipe".
  code = (
    "import cli_errors, sys; sys.exit(cli_errors.run(lambda: [print(i) for i in range(10**6)]))"
  )
  worker = subprocess.Popen(
    [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  assert worker.stdout.readline() == "0\n"
  worker.stdout.close()
  assert worker.wait(timeout=60) == 128 + 13  # SIGPIPE's
  assert worker.stderr.read() == ""


@pytest.mark.parametrize("repeats", ["0", "-3"])
def test_a_benchmark_refuses_fewer_than_one_repeat_naming_the_flag(repeats):
  # Before, --repeats 0 ran every compile and then failed on "no median for empty data".
  from experiments import benchmark_compile

  with pytest.raises(cli_errors.UsageError, match=rf"--repeats: must be >= 1, got {repeats}"):
    benchmark_compile.main(["--repeats", repeats])
