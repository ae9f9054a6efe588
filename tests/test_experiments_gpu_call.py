"""gpu_call.sh, the script a GPU lease runs: it parses, and a mistyped call ends before any stage
spends the lease (its stages themselves are dry-run on a CPU by hand: see its header)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "gpu_call.sh"
CAPTURE = {"capture_output": True, "text": True, "check": False}


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(SCRIPT), *args], **CAPTURE)


def test_the_script_parses():
  assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_without_a_stage_it_prints_its_usage_and_exits_2():
  done = run(".gpu/data")
  assert done.returncode == 2 and "STAGE[:MINUTES]" in done.stderr


def test_an_unknown_stage_ends_the_call_before_any_stage_runs(tmp_path):
  done = run(str(tmp_path), "accuracy:7", "papr:9")
  assert done.returncode == 2
  assert done.stderr.startswith("error: unknown stage papr") and "===" not in done.stdout


def fake_tools(tmp_path: pathlib.Path) -> dict[str, str]:
  """An environment whose `python` logs its arguments (running `-c` snippets for real) and, for
  a benchmark, waits for a signal; and whose `nvidia-smi` finds no GPU."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_dir.mkdir()
  (bin_dir / "python").write_text(
    f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec {sys.executable} "$@"; fi
echo "$*" >>{log}
if [[ $* == *benchmark_step* ]]; then
  trap 'echo "stopped by INT" >>{log}; exit 130' INT
  for _ in $(seq 600); do sleep 0.1; done
fi
echo '{{}}'
"""
  )
  (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\nexit 9\n")
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RESULTS_DIR": str(tmp_path)}


def test_a_stage_that_needs_minutes_and_a_dry_run_without_a_results_dir_end_the_call(tmp_path):
  done = run(str(tmp_path), "epoch", "accuracy")
  assert done.returncode == 2
  assert done.stderr == "error: accuracy: the accuracy stage needs its minutes, e.g. accuracy:4\n"
  env = fake_tools(tmp_path)
  del env["RESULTS_DIR"]  # the committed GPU results would be overwritten
  done = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "epoch"], env=env, **CAPTURE)
  assert done.returncode == 2 and "no GPU here (nvidia-smi): set RESULTS_DIR" in done.stderr
  assert not (tmp_path / "calls.log").exists()


def test_accuracy_trains_only_until_the_test_split_still_fits_in_the_call(tmp_path):
  env = fake_tools(tmp_path) | {"DEADLINE_S": "210"}
  done = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "accuracy:7"], env=env, **CAPTURE)
  assert done.returncode == 0, done.stderr
  train, evaluate = (tmp_path / "calls.log").read_text().splitlines()
  minutes = float(train.split("--config.max_minutes=")[1].split()[0])
  assert 1.9 <= minutes <= 2.0  # (210 s - 90 s for the test split) / 60, less the seconds gone
  assert "--mode=evaluate --split=test" in evaluate
  assert json.loads((tmp_path / "accuracy_gpu.json").read_text())["max_minutes"] == minutes


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_running_stage_and_the_call(tmp_path, signal_number):
  """Ctrl-C reaches the script's process group; a scheduler's SIGTERM the script alone."""
  env = fake_tools(tmp_path)
  call = subprocess.Popen(
    ["bash", str(SCRIPT), str(tmp_path), "kernels", "epoch"],
    env=env,
    start_new_session=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  log = tmp_path / "calls.log"
  deadline = time.monotonic() + 30
  while not (log.exists() and "benchmark_step" in log.read_text()):
    assert time.monotonic() < deadline and call.poll() is None
    time.sleep(0.1)
  time.sleep(0.5)  # its trap set
  if signal_number == signal.SIGINT:
    os.killpg(call.pid, signal_number)
  else:
    os.kill(call.pid, signal_number)
  _, stderr = call.communicate(timeout=30)
  assert call.returncode == 130
  assert "interrupted during kernels: the stages after it did not run" in stderr
  calls = log.read_text().splitlines()
  assert len(calls) == 2 and calls[1] == "stopped by INT"  # the stage stopped; epoch never ran
