"""The start-up benchmark: every compile mode runs, and the table is what the runs reported."""

import pathlib
import subprocess
import sys

import pytest

from experiments import benchmark_compile, cli, reporting


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


def summary(first_step, wall, summed, train, hits=0, misses=4):
  """What `one_run` returns for a run of the given seconds and cache hits and misses."""
  return {
    "time_to_first_step_s": first_step,
    "compile_wall_s": wall,
    "compile_seconds_sum": summed,
    "train_and_wait_s": train,
    "compilation_cache_hits": hits,
    "compilation_cache_misses": misses,
    "num_buckets": 2,
    "upper_bounds": [16, 32],
    "train_compiles": 2,
    "eval_compiles": 2,
    "epochs": 1,
    "num_devices": 1,
  }


def test_cells_are_medians_and_ranges_of_the_repeats_and_ratios_compare_within_a_repeat(
  tmp_path, monkeypatch
):
  # Per repeat, in the order the runs take turns: the numbers of each run.
  runs = []
  for sequential, parallel, overlap in ((10, 4, 2), (12, 6, 3), (20, 5, 4)):
    runs += [
      ("sequential", summary(sequential, sequential, sequential, 5)),
      ("parallel", summary(parallel, parallel, 4 * parallel - 1, 5)),
      ("overlap", summary(overlap, 8, 16, 7)),
      ("overlap", summary(1, 8, 16, 7)),  # filling the cache
      ("overlap", summary(1, 2, 2, 7, hits=4, misses=0)),  # reading it
    ]
  runs.reverse()

  def one_run(config, mode, cache_dir, workdir):
    expected_mode, result = runs.pop()
    assert mode == expected_mode
    return result

  monkeypatch.setattr(benchmark_compile, "one_run", one_run)
  out = tmp_path / "compile.md"
  benchmark_compile.main(["--repeats", "3", "--out", str(out)])
  assert not runs
  text = out.read_text()
  cells = next(line for line in text.splitlines() if line.startswith("Cells:"))
  rows = {row["compile mode"]: row for row in reporting.read_markdown_table(text, cells)}
  assert rows["sequential"]["compile wall (s)"] == "12.00 (10.00-20.00)"  # the mean is 14
  assert rows["parallel"]["compile summed (s)"] == "19.00 (15.00-23.00)"
  assert rows["parallel"]["parallelism (summed / wall)"] == "3.80 (3.75-3.83)"
  assert rows["overlap"]["time to first step (s)"] == "3.00 (2.00-4.00)"
  assert rows["overlap"]["train time (s)"] == "7.00 (7.00-7.00)"
  assert rows["overlap, cold cache"]["cache hits / misses"] == "0 / 4"
  assert rows["overlap, warm cache"]["cache hits / misses"] == "4 / 0"
  # Overlap's first step over the same repeat's sequential compile wall: 2/10, 3/12, 4/20; the
  # parallel compile wall over it: 4/10, 6/12, 5/20.
  assert "first train step starts after 0.20 (0.20-0.25) of the sequential compile" in text
  assert "in parallel takes 0.40 (0.25-0.50) of the sequential compile wall" in text


def test_a_runs_train_time_includes_its_waits_for_compiles(monkeypatch):
  trained = []

  def train_and_evaluate(config, workdir):
    trained.append((config.compile_mode, config.compilation_cache_dir))
    return {"train_time_s": 3.0, "compile_wait_s": 0.5}

  monkeypatch.setattr(benchmark_compile.train, "train_and_evaluate", train_and_evaluate)
  monkeypatch.setattr(benchmark_compile.jax, "clear_caches", lambda: None)
  config = cli.load_config(["benchmark", "--config=experiments/synthetic.py:tiny"])
  summary = benchmark_compile.one_run(config, "overlap", "cache", None)
  assert summary["train_and_wait_s"] == 3.5
  assert trained == [("overlap", "cache")]


def test_only_the_cache_runs_use_a_cache_a_fresh_one_each_repeat_filled_then_read(
  tmp_path, monkeypatch
):
  calls = []

  def one_run(config, mode, cache_dir, workdir):
    calls.append((mode, cache_dir, bool(cache_dir) and pathlib.Path(cache_dir).exists()))
    if cache_dir:  # what the persistent cache leaves behind
      pathlib.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return summary(1, 2, 2, 3)

  monkeypatch.setattr(benchmark_compile, "one_run", one_run)
  benchmark_compile.main(["--repeats", "2", "--out", str(tmp_path / "compile.md")])
  no_cache = [("sequential", "", False), ("parallel", "", False), ("overlap", "", False)]
  assert len(calls) == 10
  first, second = calls[:5], calls[5:]
  for repeat in (first, second):
    assert repeat[:3] == no_cache
    (cold, cold_dir, cold_existed), (warm, warm_dir, warm_existed) = repeat[3:]
    assert cold == warm == "overlap"
    assert cold_dir and not cold_existed  # filled from empty
    assert warm_dir == cold_dir and warm_existed  # read back
  assert first[3][1] != second[3][1]
