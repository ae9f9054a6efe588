"""train.py's command line: an expected error is one line on stderr and exit code 2."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=experiments/synthetic.py:tiny"


@pytest.mark.parametrize(
  ("arguments", "message"),
  [
    (
      [TINY, "--config.bucketing.strategy=bogus"],
      "config.bucketing.strategy='bogus' is not one of",
    ),
    (
      [TINY, "--config.bucketing.num_bukets=8"],
      "no config field 'num_bukets'; did you mean 'num_buckets'?",
    ),
    (["--config=experiments/synthetic.py:nosuchvariant"], "unknown variant 'nosuchvariant'"),
    ([TINY, "extra"], "unexpected arguments: ['extra']"),
    ([TINY, "--workdir="], "the workdir (--workdir) is empty"),  # else: the current folder
    ([TINY, "--workdir=README.md"], "the workdir (--workdir) README.md is a file, not a folder"),
    ([TINY, "--workdir=README.md", "--mode=evaluate"], "(--workdir) README.md is a file"),
    ([TINY, "--workdir=README.md/run"], "(--workdir) README.md/run is inside README.md, a file"),
    ([TINY, "--mode=evaluate", "--split=testing"], "--split=testing: value should be one of"),
    ([TINY, "--split=validation"], "--split goes with --mode=evaluate"),
    ([TINY, "--split=test", "--checkpoint=latest"], "--split and --checkpoint go with --mode=eval"),
    ([], "--config is required, e.g. --config=experiments/synthetic.py"),
    (["--mode=evaluate"], "--config is required"),
    (
      ["--config=experiments/iam.py:tiny", "--config.data.data_dir=/nonexistent"],
      "IAM_ONDB_DIR or --config.data.manual_dir",
    ),
  ],
)
def test_an_expected_error_is_one_line_and_exit_code_2(tmp_path, arguments, message):
  environment = {key: value for key, value in os.environ.items() if key != "IAM_ONDB_DIR"}
  command = [
    sys.executable,
    "train.py",
    f"--workdir={tmp_path / 'run'}",
    *arguments,
  ]
  result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
  assert result.returncode == 2, result.stderr
  (line,) = result.stderr.strip().splitlines()  # one line: no warning above it
  assert line.startswith("error: ") and message in line, result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_a_damaged_best_checkpoint_is_an_error_naming_the_file(tmp_path):
  command = [sys.executable, "train.py", TINY, f"--workdir={tmp_path / 'run'}"]
  subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
  arrays = [p for p in (tmp_path / "run" / "checkpoints" / "best").rglob("d/*") if p.is_file()]
  for path in arrays:
    path.write_bytes(bytes(path.stat().st_size))
  result = subprocess.run([*command, "--mode=evaluate"], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 2, result.stderr
  # Orbax's other reads of the damaged files fail on its threads too: their tracebacks are dropped.
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  (line,) = lines
  assert re.match(r"error: the best checkpoint .*best/\d+ is damaged: .*params", line), line


def test_ctrl_c_twice_quits_at_once_while_the_first_step_compiles(tmp_path):
  # The first Ctrl-C asks for a stop at the next step boundary; the second, with the first step
  # still compiling, ends the process at once. Before, its KeyboardInterrupt waited for the
  # compile threads, or aborted the process from inside XLA (exit 134, "Fatal Python error").
  command = [
    sys.executable,
    "train.py",
    "--config=experiments/synthetic.py",
    f"--workdir={tmp_path / 'run'}",
    "--config.compilation_cache_dir=",  # a compile long enough to interrupt
    "--config.data.synthetic.num_train=64",
    "--config.data.synthetic.num_eval=16",
  ]
  process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    lines = iter(process.stderr.readline, "")
    next(line for line in lines if line.startswith("compiling "))
    process.send_signal(signal.SIGINT)
    next(line for line in lines if "stopping at the next step boundary" in line)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGINT, rest
    assert time.monotonic() - started < 5, "the second Ctrl-C waited for the compile"
  finally:
    process.kill()
  assert rest.splitlines()[-1] == "interrupted" and "Fatal" not in rest, rest
