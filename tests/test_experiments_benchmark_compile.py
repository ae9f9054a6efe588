"""The start-up benchmark: every compile mode runs, and the table is what the runs reported."""

import subprocess
import sys

import pytest

from experiments import benchmark_compile, reporting


@pytest.mark.slow
def test_the_table_reports_each_mode_and_the_warm_cache_compiles_nothing(tmp_path, capsys):
  out = tmp_path / "compile.md"
  argv = ["--num-buckets", "2", "--repeats", "1", "--out", str(out), "--config.num_epochs=1"]
  benchmark_compile.main(argv)
  text = out.read_text()
  cells = next(line for line in text.splitlines() if line.startswith("Cells:"))
  rows = reporting.read_markdown_table(text, cells)
  assert [row["compile mode"] for row in rows] == list(benchmark_compile.RUNS)
  by_mode = {row["compile mode"]: row for row in rows}
  executables = sum(map(int, by_mode["overlap, cold cache"]["cache hits / misses"].split(" / ")))
  assert by_mode["overlap, cold cache"]["cache hits / misses"] == f"0 / {executables}"
  assert by_mode["overlap, warm cache"]["cache hits / misses"] == f"{executables} / 0"
  assert "--config.num_epochs=1" in text  # the command, overrides included
  assert "1 epochs" in text


def test_a_misspelt_config_override_is_one_line_and_exit_code_2():
  command = [sys.executable, "-m", "experiments.benchmark_compile", "--config.num_epoch=1"]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    "error: --config.num_epoch=1: no config field 'num_epoch'; did you mean 'num_epochs'?"
  ]
