"""Tests for `python -m handwriting` (handwriting/__main__.py) on a tiny written download."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cli_errors
from handwriting import dataset, report
from handwriting.__main__ import main
from handwriting.dataset import SPLITS
from handwriting.synthetic import generate_examples
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


@pytest.mark.parametrize(
  "damaged, message",
  [
    (
      "iam_ondb-validation.array_record-*",
      "the validation split of this TFDS build cannot be read",
    ),
    # Before, a traceback (protobuf's ParseError) and a JSON error that named no file.
    ("dataset_info.json", "this TFDS build's dataset_info.json cannot be read"),
    ("metadata.json", "this TFDS build's metadata.json cannot be read"),
  ],
)
def test_a_damaged_tfds_build_is_one_line_naming_it(built, tmp_path, capsys, damaged, message):
  data_dir = tmp_path / "data"
  shutil.copytree(built, data_dir)
  (data_dir / "iam_ondb.npz").unlink()  # read the TFDS build itself
  (path,) = data_dir.glob(f"iam_ondb/*/{damaged}")
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  argv = ["stats", "--dataset", "iam_ondb", "--data_dir", str(data_dir)]
  assert cli_errors.run(lambda: main(argv)) == cli_errors.USAGE_EXIT_CODE
  error = capsys.readouterr().err
  assert error.startswith(f"error: {data_dir}/iam_ondb/1.0.0: ") and error.count("\n") == 1
  assert message in error


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


def test_a_build_from_another_download_is_not_taken_for_this_ones(built, tmp_path):
  """TFDS keeps a finished build: building again from a download fixed or moved would silently
  give the old lines. The same download, by another path, is the same build."""
  manual_dir = built.parent / "manual"
  (tmp_path / "link").symlink_to(manual_dir)
  main(["build", "--dataset", "iam_ondb", "--manual_dir", str(tmp_path / "link"),
        "--data_dir", str(built)])  # fmt: skip
  other = write_download(tmp_path / "other", archives=True)
  with pytest.raises(ValueError, match=rf"already holds iam_ondb built from {manual_dir}, not"):
    main(["build", "--dataset", "iam_ondb", "--manual_dir", str(other), "--data_dir", str(built)])


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


@pytest.fixture
def export_with_a_nan(tmp_path):
  """A small synthetic export whose third training line has one NaN point."""
  examples = {split: generate_examples(split, 6 if split == "train" else 2) for split in SPLITS}
  bad = examples["train"][2]
  bad["points"] = bad["points"].copy()
  bad["points"][5, 0] = np.nan
  path = tmp_path / "nan.npz"
  dataset.write_export(path, examples, {})
  return path, bad["id"]


def one_line_error(argv, capsys, monkeypatch) -> str:
  """The stderr of `python -m handwriting argv`, which must be one line and exit code 2."""
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  capsys.readouterr()
  assert cli_errors.run(lambda: main(argv)) == 2
  captured = capsys.readouterr()
  assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
  return captured.err


def test_stats_names_a_line_with_a_nan_point_or_skips_it(export_with_a_nan, capsys, monkeypatch):
  path, bad_id = export_with_a_nan
  err = one_line_error(["stats", "--dataset", str(path)], capsys, monkeypatch)
  assert f"split 'train', line {bad_id}: 1 of" in err and "not finite" in err
  assert "--bad_examples skip" in err and f"data: the numpy export {path}" in err
  assert main(["stats", "--dataset", str(path), "--bad_examples", "skip", "--json"]) == 0
  stats = json.loads(capsys.readouterr().out)
  assert stats["splits"]["train"]["examples"] == 5
  assert [(line["id"], line["split"]) for line in stats["skipped"]] == [(bad_id, "train")]


def test_figures_print_the_file_they_write(tmp_path, capsys):
  small = ["--dataset", "synthetic", "--num_train", "2", "--num_eval", "1"]
  assert main(["render", *small, "--id", "syn-train-0000-01", "--out", str(tmp_path / "a")]) == 0
  assert capsys.readouterr().out == f"wrote {tmp_path / 'a.png'}\n"
  assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
  assert main(["stats", *small, "--plot", str(tmp_path / "b")]) == 0
  assert capsys.readouterr().out.endswith(f"\nwrote {tmp_path / 'b.png'}\n")
  assert main(["stats", *small, "--json", "--plot", str(tmp_path / "c.svg")]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out) and captured.err == f"wrote {tmp_path / 'c.svg'}\n"
  assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png", "b.png", "c.svg"]


@pytest.mark.parametrize("flag", ["--plot", "--out"])
@pytest.mark.parametrize(
  ("name", "message"),
  [
    ("folder", "names a folder; name a file in it"),
    ("new/", "names a folder"),
    ("missing/x.png", "its folder {tmp}/missing does not exist"),
    ("file.txt/x.png", "its folder {tmp}/file.txt is not a folder"),
    ("x.v2", "matplotlib cannot write '.v2' files; use .png or one of"),
  ],
)
def test_a_bad_figure_path_is_named_with_its_flag_before_any_work(
  tmp_path, capsys, monkeypatch, flag, name, message
):
  (tmp_path / "folder").mkdir()
  (tmp_path / "file.txt").write_text("")
  command = ["stats"] if flag == "--plot" else ["render", "--id", "x"]
  # No such export: an error about the data would mean the data was read before the path checked.
  path = f"{tmp_path}/{name}"
  argv = [*command, "--dataset", str(tmp_path / "none.npz"), flag, path]
  err = one_line_error(argv, capsys, monkeypatch)
  assert f"{flag} {path}:" in err
  assert message.format(tmp=tmp_path) in err


@pytest.mark.parametrize(
  ("writer", "argv", "flag"),
  [
    ("plot_lengths", ["stats", "--plot"], "--plot"),
    ("render_example", ["render", "--id", "syn-train-0000-01", "--out"], "--out"),
  ],
)
def test_a_write_that_fails_anyway_is_named_with_its_flag(
  tmp_path, capsys, monkeypatch, writer, argv, flag
):
  def refuse(*args):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(report, writer, refuse)
  path = tmp_path / "a.png"
  err = one_line_error(
    [*argv, str(path), "--num_train", "2", "--num_eval", "1"], capsys, monkeypatch
  )
  assert err == f"error: {flag} {path}: cannot write it (Permission denied)\n"


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["stats", "--resample_spacing", "nan"], "--resample_spacing: must be a finite number >= 0"),
    (["stats", "--resample_spacing", "-1"], "--resample_spacing: must be a finite number >= 0"),
    (["build", "--num_train", "0"], "--num_train: must be >= 1, got 0"),
    (["render", "--num_eval", "-2", "--id", "x", "--out", "x.png"], "--num_eval: must be >= 1"),
    (
      ["stats", "--seed", "-1"],
      "python -m handwriting stats: argument --seed: must be >= 0, got -1",
    ),
    (["build", "--dataset", "x.npz"], "--dataset: invalid choice: 'x.npz'"),
    (["build", "--data_dir", "{tmp}/file.npz"], "--data_dir {tmp}/file.npz: is a file, not a"),
    # Flags the dataset would not read: the default synthetic set reported for IAM-OnDB's folder.
    (["stats", "--data_dir", "{tmp}"], "--data_dir with --dataset synthetic: the synthetic set is"),
    (["build", "--manual_dir", "{tmp}"], "--manual_dir with --dataset synthetic: the synthetic"),
    (["stats", "--manual_dir", "{tmp}"], "--manual_dir with --dataset synthetic: the synthetic"),
    (
      ["stats", "--dataset", "{tmp}/file.npz", "--seed", "3", "--num_eval", "9"],
      "--seed and --num_eval with --dataset {tmp}/file.npz: only the synthetic set's generator",
    ),
  ],
)
def test_bad_flags_are_named(tmp_path, capsys, monkeypatch, argv, message):
  (tmp_path / "file.npz").write_text("")
  argv = [arg.format(tmp=tmp_path) for arg in argv]
  assert message.format(tmp=tmp_path) in one_line_error(argv, capsys, monkeypatch)


def test_build_help_says_what_the_folders_are(capsys, monkeypatch):
  monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal; one line each here
  with pytest.raises(SystemExit):
    main(["build", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "--data_dir DIR where to write the build and its export" in text
  assert "--manual_dir DIR iam_ondb only, and needed: the folder with the IAM-OnDB download" in text
  # The download's address in one piece, and what the folder must hold.
  assert "https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database" in text
  assert "lineStrokes-all.tar.gz and ascii-all.tar.gz" in text and "testset_f.txt" in text
  assert "--dataset {iam_ondb,synthetic}" in text  # build takes no .npz


def test_build_synthetic_writes_num_train_lines_to_train_and_num_eval_to_the_others(tmp_path):
  argv = ["build", "--dataset", "synthetic", "--data_dir", str(tmp_path), "--num_train", "3",
          "--num_eval", "2"]  # fmt: skip
  assert main(argv) == 0
  path = tmp_path / "synthetic.npz"
  sizes = {split: len(dataset.read_export(path, split)) for split in SPLITS}
  assert sizes == {"train": 3, "validation": 2, "validation2": 2, "test": 2}
  settings = {"seed": 0, "num_train": 3, "num_eval": 2}
  assert dataset.read_export_metadata(path) == {"generator": settings}


def test_stats_reports_feature_lengths_for_the_resample_spacing_asked(capsys):
  small = ["stats", "--num_train", "3", "--num_eval", "1", "--json"]
  assert main([*small, "--resample_spacing", "0"]) == 0
  raw = json.loads(capsys.readouterr().out)
  assert raw["feature_config"]["resample_spacing"] is None
  for info in raw["splits"].values():
    assert info["features"] == info["points"]  # a row per pen point
  assert main([*small, "--resample_spacing", "0.5"]) == 0
  coarse = json.loads(capsys.readouterr().out)
  assert coarse["feature_config"]["resample_spacing"] == 0.5
  for split, info in coarse["splits"].items():
    assert info["features"]["max"] < raw["splits"][split]["features"]["max"], split


def test_stats_lists_the_lines_the_build_left_out_before_those_it_skips(export_with_a_nan, capsys):
  path, bad_id = export_with_a_nan
  examples = {split: dataset.read_export(path, split) for split in SPLITS}
  left_out = {"id": "z01-000z-01", "split": "test", "reason": "no transcription"}
  dataset.write_export(path, examples, {"skipped": [left_out]})
  assert main(["stats", "--dataset", str(path), "--bad_examples", "skip", "--json"]) == 0
  skipped = json.loads(capsys.readouterr().out)["skipped"]
  assert [(line["id"], line["split"]) for line in skipped] == [
    ("z01-000z-01", "test"),
    (bad_id, "train"),
  ]
  assert skipped[0] == left_out


@pytest.mark.parametrize("line_id", ["syn-validation2-0000-01", "syn-test-0000-01"])
def test_render_finds_a_line_of_any_split(tmp_path, monkeypatch, line_id):
  drawn = []
  monkeypatch.setattr(report, "render_example", lambda example, out: drawn.append(example["id"]))
  small = ["--num_train", "2", "--num_eval", "1"]
  assert main(["render", *small, "--id", line_id, "--out", str(tmp_path / "line.png")]) == 0
  assert drawn == [line_id]


def test_build_synthetic_generates_from_the_seed_given_and_prints_its_export(tmp_path, capsys):
  argv = ["build", "--dataset", "synthetic", "--data_dir", str(tmp_path), "--seed", "7",
          "--num_train", "2", "--num_eval", "1"]  # fmt: skip
  assert main(argv) == 0
  path = tmp_path / "synthetic.npz"
  assert capsys.readouterr().out.endswith(f"; export: {path}\n")
  assert dataset.read_export_metadata(path)["generator"]["seed"] == 7
  expected = dataset.load_examples("synthetic", "train", seed=7, num_train=2)
  for built, generated in zip(dataset.read_export(path, "train"), expected, strict=True):
    assert built["text"] == generated["text"]
    np.testing.assert_array_equal(built["points"], generated["points"])
