"""Tests for `python -m handwriting` (handwriting/__main__.py) on a tiny written download."""

import json
import subprocess
import sys

import pytest

import cli_errors
from handwriting.__main__ import main
from tests.test_handwriting_iam_ondb import line_path, write_download


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A data dir with `iam_ondb` built by the CLI from a six-line download."""
  root = tmp_path_factory.mktemp("cli")
  manual_dir = write_download(root / "manual", archives=True)
  main(["build", "--dataset", "iam_ondb", "--manual_dir", str(manual_dir),
        "--data_dir", str(root / "data")])  # fmt: skip
  return root / "data"


def test_build_then_stats_json(built, capsys):
  assert (built / "iam_ondb.npz").is_file()
  capsys.readouterr()
  main(["stats", "--dataset", "iam_ondb", "--data_dir", str(built), "--json"])
  stats = json.loads(capsys.readouterr().out)
  assert {split: info["examples"] for split, info in stats["splits"].items()} == {
    "train": 2,
    "validation": 1,
    "validation2": 1,
    "test": 2,
  }
  assert stats["skipped"] == []


def test_stats_plot_and_render(built, tmp_path, capsys):
  main(["stats", "--dataset", "iam_ondb", "--data_dir", str(built), "--plot",
        str(tmp_path / "lengths.png")])  # fmt: skip
  assert "skipped: 0" in capsys.readouterr().out
  main(["render", "--dataset", "iam_ondb", "--data_dir", str(built), "--id", "a01-000u-02",
        "--out", str(tmp_path / "line.png")])  # fmt: skip
  assert (tmp_path / "line.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "lengths.png").is_file()
  with pytest.raises(ValueError, match="no line with --id 'zz'"):
    main(["render", "--dataset", "iam_ondb", "--data_dir", str(built), "--id", "zz",
          "--out", str(tmp_path / "x.png")])  # fmt: skip


def test_build_synthetic_as_a_module(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "handwriting", "build", "--dataset", "synthetic", "--data_dir",
     str(tmp_path), "--num_train", "16", "--num_eval", "8"],
    capture_output=True, text=True, check=True,
  )  # fmt: skip
  assert "built synthetic" in result.stdout
  stats = subprocess.run(
    [sys.executable, "-m", "handwriting", "stats", "--dataset", str(tmp_path / "synthetic.npz"),
     "--json"],
    capture_output=True, text=True, check=True,
  )  # fmt: skip
  assert json.loads(stats.stdout)["splits"]["train"]["examples"] == 16


def test_build_iam_ondb_needs_manual_dir(tmp_path, capsys):
  with pytest.raises(cli_errors.UsageError, match=r"needs --manual_dir \(the IAM-OnDB download\)"):
    main(["build", "--dataset", "iam_ondb", "--data_dir", str(tmp_path)])


def test_first_build_with_json_prints_only_json_on_stdout(tmp_path):
  manual_dir = write_download(tmp_path / "manual")
  result = subprocess.run(
    [sys.executable, "-m", "handwriting", "stats", "--dataset", "iam_ondb", "--manual_dir",
     str(manual_dir), "--data_dir", str(tmp_path / "data"), "--json"],
    capture_output=True, text=True, check=True,
  )  # fmt: skip
  assert json.loads(result.stdout)["splits"]["test"]["examples"] == 2
  assert "Downloading and preparing" in result.stderr  # TFDS still says it, on stderr


def test_a_truncated_xml_in_the_download_is_one_line_naming_the_file(tmp_path):
  manual_dir = write_download(tmp_path / "manual")
  path = line_path(manual_dir, "b02-010-01")
  path.write_bytes(path.read_bytes()[:200])
  argv = ["build", "--dataset", "iam_ondb", "--manual_dir", str(manual_dir),
          "--data_dir", str(tmp_path / "data")]  # fmt: skip
  result = subprocess.run(
    [sys.executable, "-m", "handwriting", *argv], capture_output=True, text=True, check=False
  )
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "b02-010-01.xml: malformed or truncated XML" in last


def test_missing_data_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
  argv = ["stats", "--dataset", "iam_ondb", "--data_dir", str(tmp_path)]
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  assert cli_errors.run(lambda: main(argv)) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "IAM_ONDB_DIR or --config.data.manual_dir" in err
  monkeypatch.setenv(cli_errors.DEBUG_ENV, "1")
  with pytest.raises(FileNotFoundError, match="IAM_ONDB_DIR"):
    cli_errors.run(lambda: main(argv))
