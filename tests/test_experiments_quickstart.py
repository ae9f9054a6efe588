"""The quickstart recorder: it runs train.py as typed and its results file is that run's."""

import datetime
import json
import re
import shlex
import sys
import types

import pytest

import cli_errors
from experiments import quickstart, reporting


def test_the_record_is_the_runs_metrics_summary_and_console(tmp_path, capsys, monkeypatch):
  out, workdir = tmp_path / "run.md", tmp_path / "run"
  caches, run = [], quickstart.run_train
  monkeypatch.setattr(quickstart, "run_train", lambda *args: caches.append(args[1]) or run(*args))
  argv = ["--config", "experiments/synthetic.py:tiny", "--workdir", str(workdir), "--out", str(out)]
  quickstart.main([*argv, "--config.num_epochs=2"])
  printed = capsys.readouterr().err
  text = out.read_text()
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  summary = json.loads((workdir / "summary.json").read_text())

  header = "| epoch | train loss | val loss | val CER | val WER | epoch time (s) | waiting for "
  rows = reporting.read_markdown_table(text, "## Epochs")
  assert [row["epoch"] for row in rows] == ["0", "1"] and text.count(header) == 1
  for row, epoch in zip(rows, history, strict=True):
    assert row["val loss"] == f"{epoch['val_loss']:.3f}"
    assert row["epoch time (s)"] == f"{epoch['epoch_time_s']:.1f}"
  assert f"bounds {summary['upper_bounds']}" in text
  # A fresh cache, which train.py used: every executable compiled, none read.
  (cache,) = caches
  assert "quickstart-cache-" in cache and f"persistent cache: {cache}\n" in text
  assert summary["compilation_cache_hits"] == 0 < summary["compilation_cache_misses"]
  assert "Persistent compilation cache: a fresh, empty one." in text
  # The command as a user types it, then what train.py printed (echoed to stderr), less its JSON.
  command = f"python train.py --config=experiments/synthetic.py:tiny --workdir={workdir} "
  assert f"$ {command}--config.num_epochs=2\n" in text
  console = text.split("## Console\n\n```console\n")[1].split("```")[0]
  assert "epoch 1: train loss" in console and '"num_buckets"' not in console
  assert console.splitlines()[1:] == printed.splitlines()[: len(console.splitlines()) - 1]
  assert "jaxlib" in text and "--config.num_epochs=2" in text.splitlines()[3]
  assert f"python -m experiments.quickstart {shlex.join(argv)} --config.num_epochs=2`." in text


SUMMARY = {
  "strategy": "optimal", "num_buckets": 2, "upper_bounds": [40, 80], "efficiency": 0.875,
  "train_compiles": 3, "eval_compiles": 2, "compilation_cache_hits": 1,
  "compilation_cache_misses": 4, "time_to_first_step_s": 1.5, "compile_wall_s": 2.5,
  "peak_step_memory_mb": 12.4, "mean_step_memory_mb": 5.5, "best_epoch": 1, "best_val_loss": 1.5,
  "best_val_cer": 0.5, "train_time_s": 9.0, "ended_by": "num_epochs",
}  # fmt: skip
HISTORY = [  # epoch, train loss, val loss, CER, WER, epoch time, sequences/s, compile wait
  dict(zip((*quickstart.EPOCH_NUMBERS, "compile_wait_s"), row, strict=False))
  for row in [
    (0, 3.0, 2.5, 0.9, 1.0, 4.0, 12.0, 1.5),
    (1, 2.0, 1.5, 0.5, 0.75, 1.0, 24.0),  # no compile_wait_s: none waited
    (2, 1.0, 1.75, 0.25, 0.5, 1.5, 16.0, 0.0),
  ]
]


def test_the_record_reports_each_epochs_figures_and_the_summarys():
  command = ["python", "train.py", "--config=c.py", "--workdir=/w"]
  output = ["epoch 0: train loss 3.0", "{", '  "num_buckets": 2', "}"]
  text = "\n".join(quickstart.report_lines(SUMMARY, HISTORY, ["Machine: m."], command, output))
  assert [list(row.values()) for row in reporting.read_markdown_table(text, "## Epochs")] == [
    ["0", "3.000", "2.500", "0.900", "1.000", "4.0", "1.5", "12.0"],
    ["1", "2.000", "1.500", "0.500", "0.750", "1.0", "0.0", "24.0"],
    ["2", "1.000", "1.750", "0.250", "0.500", "1.5", "0.0", "16.0"],
  ]
  assert (
    "Plan: optimal, 2 buckets, bounds [40, 80], efficiency 87.5% with filler rows; 3 train and 2 "
    "eval compiles (persistent cache: 1 hits, 4 misses), first train step after 1.5 s, compile "
    "wall 2.5 s; XLA plans the largest train step at 12.4 MB, 5.5 MB on average"
  ) in text
  assert (
    "Best epoch 1: validation loss 1.500, CER 0.5000; training time 9.0 s (the epochs' steps, "
    "waits for compiles left out); median epoch 1.5 s (1.0-4.0); ended by num_epochs."
  ) in text
  # The console as printed, less the summary JSON it ends with.
  assert text.endswith(
    "```console\n$ python train.py --config=c.py --workdir=/w\nepoch 0: train loss 3.0\n```\n"
  )
  assert quickstart.console(output[:1]) == output[:1]  # a console without the JSON is all kept


def test_run_train_sets_the_cache_only_when_asked(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/theirs")
  show = ["python", "-c", "import os; print(os.environ['JAX_COMPILATION_CACHE_DIR'])"]
  assert quickstart.run_train(show, "/fresh") == ["/fresh"]
  assert quickstart.run_train(show, None) == ["/theirs"]


def test_run_train_runs_train_py_from_the_repository_wherever_it_is_typed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  show = ["python", "-c", "import os; print(os.getcwd())"]
  assert quickstart.run_train(show, None) == [str(quickstart.ROOT)]


@pytest.mark.parametrize("code, raised", [(2, cli_errors.AlreadyReported), (3, SystemExit)])
def test_a_failed_train_py_fails_the_record(code, raised):
  with pytest.raises(raised) as error:
    quickstart.run_train(["python", "-c", f"raise SystemExit({code})"], None)
  assert raised is not SystemExit or error.value.code == code  # a crash's own exit code


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--configs=x"], "unrecognized arguments: --configs=x"),
    (["--workdir", "{full}"], r"--workdir: .* already holds files; the record is of a fresh run"),
    (["--out", "{empty}/"], "--out .*: names a folder"),
  ],
)
def test_bad_flags_end_in_one_line_before_training(tmp_path, capsys, monkeypatch, argv, message):
  monkeypatch.setattr(quickstart, "run_train", lambda *args: pytest.fail("train.py was run"))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "summary.json").write_text("{}")
  (tmp_path / "empty").mkdir()
  argv = [arg.format(full=tmp_path / "full", empty=tmp_path / "empty") for arg in argv]
  argv = argv if "--workdir" in argv else [*argv, "--workdir", str(tmp_path / "new")]
  assert cli_errors.run(lambda: quickstart.main(argv)) == cli_errors.USAGE_EXIT_CODE
  (line,) = capsys.readouterr().err.splitlines()
  assert re.search(message, line), line
  assert not (tmp_path / "new").exists()


def test_by_default_it_records_the_readmes_synthetic_run(tmp_path, monkeypatch):
  commands = []

  def stop(command, cache_dir):
    commands.append(shlex.join(command))
    raise cli_errors.UsageError("stopped before training")

  monkeypatch.setattr(quickstart, "run_train", stop)
  (tmp_path / "made").mkdir()  # a workdir made for the run, still empty, is a fresh run's
  with pytest.raises(cli_errors.UsageError, match="stopped before training"):
    quickstart.main(["--workdir", str(tmp_path / "made")])
  assert commands == [
    f"python train.py --config=experiments/synthetic.py --workdir={tmp_path}/made"
  ]
  with pytest.raises(cli_errors.UsageError) as error:  # refused where /tmp/synthetic holds a run
    quickstart.main([])
  assert "/tmp/synthetic" in (commands[1] if len(commands) == 2 else str(error.value))


@pytest.mark.parametrize(
  "config, backend, name",
  [
    ("experiments/synthetic.py", "cpu", "synthetic_cpu.md"),
    ("experiments/iam.py:tiny", "gpu", "iam_tiny_gpu.md"),
  ],
)
def test_the_default_record_is_named_by_config_variant_and_backend(config, backend, name):
  assert quickstart.default_out(config, backend) == quickstart.RESULTS / name


@pytest.mark.parametrize(
  "cpuinfo, expected",
  [
    ("model name\t: Some CPU\nflags\t\t: fpu sse4_2 avx avx2 avx512f\n", "Some CPU, AVX-512"),
    ("model name\t: Some CPU\nflags\t: fpu sse4_2 avx avx2\n\nprocessor\t: 1\n", "Some CPU, AVX2"),
    ("model name\t: Some CPU\nflags\t\t: fpu\n", "Some CPU"),
  ],
)
def test_the_cpu_is_named_with_its_widest_vector_instructions(tmp_path, cpuinfo, expected):
  (tmp_path / "cpuinfo").write_text(cpuinfo)
  assert reporting.cpu_model(tmp_path / "cpuinfo") == expected


def test_without_cpuinfo_the_cpu_is_what_platform_knows(tmp_path, monkeypatch):
  monkeypatch.setattr(reporting.platform, "processor", lambda: "arm")
  assert reporting.cpu_model(tmp_path / "missing") == "arm"


def test_results_files_name_the_installed_versions_and_torch_only_when_asked(monkeypatch):
  installed = {"jax": "1.2.3", "jaxlib": "1.2.4", "flax": "0.9", "optax": "0.3", "numpy": "2.0"}
  monkeypatch.setattr(reporting.importlib.metadata, "version", installed.__getitem__)
  torch = types.SimpleNamespace(
    __version__="9.9",
    backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(version=lambda: 91)),
  )
  monkeypatch.setitem(sys.modules, "torch", torch)
  everything = "jax 1.2.3, jaxlib 1.2.4, flax 0.9, optax 0.3, numpy 2.0"
  assert reporting.versions() == everything
  assert reporting.versions(("numpy",)) == "numpy 2.0"
  assert reporting.versions(with_torch=True) == f"{everything}, torch 9.9 (cuDNN 91)"
  torch.backends.cudnn.version = lambda: None  # a CPU build of torch
  assert reporting.versions(with_torch=True) == f"{everything}, torch 9.9"
  monkeypatch.setitem(sys.modules, "torch", None)  # not installed: import torch raises
  assert reporting.versions(with_torch=True) == everything


def test_a_markdown_table_is_right_aligned_under_its_header():
  rows = [{"K": "1", "time (s)": "2.5"}, {"K": "8", "time (s)": "1.0"}]
  lines = reporting.markdown_table(rows, ["K", "time (s)"])
  assert lines == ["| K | time (s) |", "| ---: | ---: |", "| 1 | 2.5 |", "| 8 | 1.0 |"]
  assert reporting.read_markdown_table("## T\n\n" + "\n".join(lines) + "\n\nrest", "## T") == rows
  with pytest.raises(ValueError, match="no table with rows under '## T'"):
    reporting.read_markdown_table("## T\n\n" + "\n".join(lines[:2]), "## T")


def test_a_report_is_written_then_named_on_stdout_and_printed_only_when_asked(tmp_path, capsys):
  path = tmp_path / "r.md"
  assert reporting.write_report(path, ["# R", "", "a line"]) == path
  assert path.read_text() == "# R\n\na line"
  assert capsys.readouterr() == (f"wrote {path}\n", "")
  reporting.write_report(path, ["# R"], echo=True)
  assert capsys.readouterr() == (f"# R\nwrote {path}\n", "")


def test_out_is_where_the_report_goes_and_its_new_folder_is_made_before_the_run(tmp_path):
  default = tmp_path / "results" / "default.md"
  assert reporting.results_path(f"{tmp_path}/new/r.md", default) == tmp_path / "new" / "r.md"
  assert (tmp_path / "new").is_dir()
  assert reporting.results_path(None, default) == default


def test_the_header_names_the_load_before_and_after_and_the_minutes_taken(monkeypatch):
  loads, clock = iter([(0.5, 9.0, 9.0), (2.25, 9.0, 9.0)]), iter([100.0, 190.0])
  monkeypatch.setattr(reporting.os, "getloadavg", lambda: next(loads))
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(reporting.os, "cpu_count", lambda: 4)
  monkeypatch.setattr(reporting, "machine_description", lambda: "x86_64 Linux")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  record = reporting.RunRecord("experiments.quickstart", ["--out", "a b.md"], "jax 1")
  assert record.header() == [
    "Machine: x86_64 Linux.",
    f"Date: {datetime.date.today().isoformat()}; jax 1. Command: "
    "`python -m experiments.quickstart --out 'a b.md'`.",
    "1-minute load average 0.50 before and 2.25 after the run on 4 cores (a load above the core "
    "count means other processes shared the CPU); the run took 1.5 min.",
  ]
