"""The quickstart recorder: it runs train.py as typed and its results file is that run's."""

import json
import re
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


def test_run_train_sets_the_cache_only_when_asked(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/theirs")
  show = ["python", "-c", "import os; print(os.environ['JAX_COMPILATION_CACHE_DIR'])"]
  assert quickstart.run_train(show, "/fresh") == ["/fresh"]
  assert quickstart.run_train(show, None) == ["/theirs"]


@pytest.mark.parametrize("code, raised", [(2, cli_errors.AlreadyReported), (3, SystemExit)])
def test_a_failed_train_py_fails_the_record(code, raised):
  with pytest.raises(raised):
    quickstart.run_train(["python", "-c", f"raise SystemExit({code})"], None)


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--configs=x"], "unrecognized arguments: --configs=x"),
    (["--workdir", "{full}"], r"--workdir: .* already holds files; the record is of a fresh run"),
    (["--out", "{empty}/"], "--out .*: names a folder"),
  ],
)
def test_bad_flags_end_in_one_line_before_training(tmp_path, capsys, argv, message):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "summary.json").write_text("{}")
  (tmp_path / "empty").mkdir()
  argv = [arg.format(full=tmp_path / "full", empty=tmp_path / "empty") for arg in argv]
  argv = argv if "--workdir" in argv else [*argv, "--workdir", str(tmp_path / "new")]
  assert cli_errors.run(lambda: quickstart.main(argv)) == cli_errors.USAGE_EXIT_CODE
  (line,) = capsys.readouterr().err.splitlines()
  assert re.search(message, line), line
  assert not (tmp_path / "new").exists()


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
