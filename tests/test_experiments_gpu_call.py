"""gpu_call.sh, the script a GPU lease runs: it parses, and a mistyped call ends before any stage
spends the lease (its stages themselves are dry-run on a CPU by hand: see its header)."""

import pathlib
import subprocess

SCRIPT = pathlib.Path(__file__).parents[1] / "experiments" / "gpu_call.sh"


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False)


def test_the_script_parses():
  assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_without_a_stage_it_prints_its_usage_and_exits_2():
  done = run(".gpu/data")
  assert done.returncode == 2 and "STAGE[:MINUTES]" in done.stderr


def test_an_unknown_stage_ends_the_call_before_any_stage_runs(tmp_path):
  done = run(str(tmp_path), "accuracy:7", "papr:9")
  assert done.returncode == 2
  assert done.stderr.startswith("error: unknown stage papr") and "===" not in done.stdout
