"""`python -m bucketing plan`: the table, the JSON, the plot, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import cli_errors
from bucketing import __main__ as cli
from bucketing import boundaries

LENGTHS = np.random.default_rng(0).integers(31, 1541, 500)


@pytest.fixture
def lengths_file(tmp_path):
  path = tmp_path / "lengths.txt"
  path.write_text("\n".join(map(str, LENGTHS)) + "\n")
  return path


def run_json(capsys, *args):
  assert cli.main(["plan", *map(str, args), "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_json_holds_the_promised_fields(lengths_file, capsys):
  summary = run_json(capsys, "--lengths", lengths_file, "--num-buckets", 4, "--devices", 8)
  for key in (
    "upper_bounds",
    "bucket_sizes",
    "batch_sizes",
    "steps_per_epoch",
    "real_timesteps",
    "padded_timesteps",
    "padded_timesteps_with_filler",
    "efficiency",
  ):
    assert key in summary
  assert summary["upper_bounds"] == boundaries.optimal_bounds(LENGTHS, 4).tolist()
  assert summary["real_timesteps"] == LENGTHS.sum()
  assert all(size % 8 == 0 for size in summary["batch_sizes"])
  assert summary["num_devices"] == 8


def test_npy_input_gives_the_same_plan(lengths_file, tmp_path, capsys):
  np.save(tmp_path / "lengths.npy", LENGTHS)
  from_text = run_json(capsys, "--lengths", lengths_file, "--strategy", "quantile")
  from_npy = run_json(capsys, "--lengths", tmp_path / "lengths.npy", "--strategy", "quantile")
  assert from_text == from_npy


def test_token_budget_and_fixed_bounds(lengths_file, capsys):
  summary = run_json(capsys, "--lengths", lengths_file, "--max-tokens", 16000)
  assert all(
    b * L <= 16000 for b, L in zip(summary["batch_sizes"], summary["upper_bounds"], strict=True)
  )
  summary = run_json(
    capsys,
    "--lengths",
    lengths_file,
    "--strategy",
    "fixed",
    "--bounds",
    "200,800",
    "--overflow",
    "truncate",
  )
  assert summary["upper_bounds"] == [200, 800]
  assert len(summary["truncated"]) == int(np.sum(LENGTHS > 800))


def test_table_and_plot(lengths_file, tmp_path, capsys):
  plot = tmp_path / "plan.png"
  assert cli.main(["plan", "--lengths", str(lengths_file), "--plot", str(plot)]) == 0
  table = capsys.readouterr().out
  assert "bound" in table and "efficiency" in table
  assert len(table.splitlines()) == 2 + 8 + 5 + 1 + 1
  assert table.splitlines()[-1] == f"wrote {plot}"
  assert table.splitlines()[-2].startswith(
    "placeholder cost figures (alpha 0.005 s a step, gamma 0 s a padded timestep, beta 5e-07 s a "
    "padded token, kappa 10 s a compile): give measured ones"
  )
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Only the figures left unset are placeholders (argparse takes --alp for --alpha, too).
  some = ["plan", "--lengths", str(lengths_file), "--alp", "0.01", "--gamma", "1e-5"]
  assert cli.main(some) == 0
  last = capsys.readouterr().out.splitlines()[-1]
  assert last.startswith("placeholder cost figures (beta 5e-07 s a padded token, kappa 10 s a")
  assert cli.main([*some, "--beta", "0", "--kappa", "3"]) == 0
  assert "placeholder" not in capsys.readouterr().out


@pytest.mark.parametrize(
  ("content", "extra", "message"),
  [
    (None, [], "no such file"),
    ("12\nabc\n", [], ":2: 'abc' is not an integer"),
    ("12\n\n0\n", [], ":3: 0 is not a positive length"),
    (
      "3\n" + "9" * 23,
      [],
      f":2: {'9' * 23} is longer than the longest length allowed, 2,147,483,647",
    ),
    ("", [], "holds no lengths"),
    ("12\n", ["--lengths-as-npy"], "not a numpy array file (.npy) of integer lengths"),
    ("12\n", ["--num-buckets", "0"], "--num-buckets: must be >= 1, got 0"),
    ("12\n", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("12\n", ["--max-tokens", "0"], "--max-tokens: must be >= 1, got 0"),
    ("12\n", ["--devices", "-2"], "--devices: must be >= 1, got -2"),
    ("12\n", ["--round-to", "0"], "--round-to: must be >= 1, got 0"),
    ("12\n", ["--round-to", str(2**31)], "--round-to: must be <= 2,147,483,647, got 2147483648"),
    ("12\n", ["--devices", str(2**62)], "--devices: must be <= 2,147,483,647, got 4611686018"),
    ("12\n", ["--batch-size", str(2**63)], "--batch-size: must be <= 9,223,372,036,854,775,807"),
    ("12\n", ["--max-tokens", str(2**70)], "--max-tokens: must be <= 9,223,372,036,854,775,807"),
    (f"{2**31 - 1}\n", ["--round-to", "8"], "--round-to 8: rounds the longest length of"),
    ("12\n", ["--strategy", "fixed", "--bounds", f"12,{2**62}"], "--bounds: fixed bounds must be"),
    ("12\n", ["--strategy", "fixed", "--bounds", "20,12"], "--bounds: fixed bounds must be posi"),
    ("12\n", ["--strategy", "fixed", "--bounds", "20", "--num-buckets", "4"], "--num-buckets is"),
    ("12\n", ["--strategy", "none", "--num-buckets", "4"], "not for --strategy none, which sets"),
    ("12\n", ["--strategy", "auto", "--epochs", "nan"], "--epochs: must be a finite number > 0"),
    ("12\n", ["--epochs", "-1"], "--epochs: must be a finite number > 0, got '-1'"),
    ("12\n", ["--epochs", "0"], "--epochs: must be a finite number > 0, got '0'"),
    ("12\n", ["--epochs", "inf"], "--epochs: must be a finite number > 0, got 'inf'"),
    ("12\n", ["--epochs", "x"], "--epochs: 'x' is not a number"),
    ("12\n", ["--alpha", "nan"], "--alpha: cost model alpha must be a finite number >= 0"),
    ("12\n", ["--kappa=-1"], "--kappa: cost model kappa must be a finite number >= 0, got -1"),
    ("12\n", ["--strategy", "fixed"], "--strategy='fixed' needs --bounds"),
    ("12\n", ["--bounds", "20"], "--bounds are for --strategy='fixed' only, not 'optimal'"),
    ("12\n", ["--strategy", "fixed", "--bounds", "20,x"], "--bounds: '20,x' is not a comma-"),
    ("12\n40\n", ["--strategy", "fixed", "--bounds", "20"], "longer than the largest"),
  ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, monkeypatch, content, extra, message):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  path = tmp_path / "lengths.txt"
  if extra == ["--lengths-as-npy"]:  # a text file named .npy
    path, extra = tmp_path / "lengths.npy", []
  if content is not None:
    path.write_text(content)
  assert cli_errors.run(lambda: cli.main(["plan", "--lengths", str(path), *extra])) == 2
  err = capsys.readouterr().err
  assert message in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
  ("name", "message"),
  [
    ("folder", "--plot {tmp}/folder: names a folder; name a file in it"),
    ("new/", "--plot {tmp}/new/: names a folder"),
    ("missing/p.png", "--plot {tmp}/missing/p.png: its folder {tmp}/missing does not exist"),
    ("file.txt/p.png", "--plot {tmp}/file.txt/p.png: its folder {tmp}/file.txt is not a folder"),
    ("p.v2", "--plot {tmp}/p.v2: matplotlib cannot write '.v2' files; use .png or one of"),
  ],
)
def test_a_bad_plot_path_is_named_with_its_flag_before_planning(
  tmp_path, capsys, monkeypatch, name, message
):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  (tmp_path / "folder").mkdir()
  (tmp_path / "file.txt").write_text("")
  # No lengths file: an error about it would mean the lengths were read before the path checked.
  argv = ["plan", "--lengths", str(tmp_path / "none.txt"), "--plot", f"{tmp_path}/{name}"]
  assert cli_errors.run(lambda: cli.main(argv)) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {message.format(tmp=tmp_path)}") and len(err.splitlines()) == 1
  assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt", "folder"]


def test_a_lengths_file_that_is_not_text_is_named(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  path = tmp_path / "lengths.bin"
  path.write_bytes(b"\xff\xfe1\x002\x00")  # UTF-16, say
  assert cli_errors.run(lambda: cli.main(["plan", "--lengths", str(path)])) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {path}: not a text file of lengths ('utf-8' codec can't decode")
  assert err.endswith("; a numpy array file needs the .npy suffix\n") and err.count("\n") == 1


def plan_npy_error(tmp_path, capsys, monkeypatch, lengths):
  """`plan --lengths` of `lengths` saved as a .npy file, which must fail with exit code 2: the
  file's path and what the command line printed to stderr."""
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  path = tmp_path / "lengths.npy"
  np.save(path, lengths)
  assert cli_errors.run(lambda: cli.main(["plan", "--lengths", str(path)])) == 2
  return path, capsys.readouterr().err


@pytest.mark.parametrize(
  ("lengths", "shown"),
  [(np.array([1, 2**62]), "4611686018427387904"), (np.array([1, 2**63 + 5], np.uint64), "92233")],
)
def test_npy_lengths_past_the_longest_allowed_are_refused(
  tmp_path, capsys, monkeypatch, lengths, shown
):
  # [1, 2**62] once planned as padded timesteps -2**63 and efficiency -50%; uint64 wrapped.
  path, err = plan_npy_error(tmp_path, capsys, monkeypatch, lengths)
  assert err.startswith(f"error: {path}: lengths must be at most 2,147,483,647, got {shown}")
  assert err.endswith(" at index 1\n")


@pytest.mark.parametrize(
  ("lengths", "message"),
  [
    # Whole numbers or not: a float array is not lengths, as "12.0" in a text file is not.
    (np.array([12.0, 30.0]), "expected integer lengths, got dtype float64"),
    # numpy's empty array is float64: it is said to be empty, not to be of the wrong dtype.
    (np.array([]), "holds no lengths"),
  ],
)
def test_float_npy_lengths_are_refused_for_what_is_wrong(
  tmp_path, capsys, monkeypatch, lengths, message
):
  path, err = plan_npy_error(tmp_path, capsys, monkeypatch, lengths)
  assert err == f"error: {path}: {message}\n"


def test_a_round_to_of_the_longest_allowed_length_is_taken(tmp_path, capsys):
  path = tmp_path / "lengths.txt"
  path.write_text("12\n")
  summary = run_json(capsys, "--lengths", path, "--round-to", boundaries.MAX_LENGTH)
  assert summary["upper_bounds"] == [boundaries.MAX_LENGTH]


def test_the_longest_allowed_length_plans_with_exact_sums(tmp_path, capsys):
  longest = boundaries.MAX_LENGTH
  path = tmp_path / "lengths.npy"
  np.save(path, np.array([1, longest]))
  summary = run_json(capsys, "--lengths", path, "--devices", 8, "--max-tokens", 2**62)
  assert summary["upper_bounds"] == [1, longest] and summary["batch_sizes"] == [8, 8]
  assert summary["real_timesteps"] == summary["padded_timesteps"] == 1 + longest
  assert summary["padded_timesteps_with_filler"] == 8 * (1 + longest)
  assert summary["tokens_per_step"] == [8, 8 * longest]
  assert summary["ideal_speedup"] == longest / (1 + longest)  # baseline: 8 rows at longest


def test_a_plot_name_without_suffix_gets_png_and_says_so(lengths_file, tmp_path, capsys):
  argv = ["plan", "--lengths", str(lengths_file), "--json", "--plot", str(tmp_path / "p")]
  assert cli.main(argv) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out) and captured.err == f"wrote {tmp_path / 'p.png'}\n"
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_plot_under_home_or_with_a_capital_suffix_is_written_where_named(
  lengths_file, tmp_path, capsys, monkeypatch
):
  monkeypatch.setenv("HOME", str(tmp_path))  # `--plot=~/p.png`: no shell expands `~` after `=`
  for name, file in [("~/p.png", tmp_path / "p.png"), (f"{tmp_path}/P.PNG", tmp_path / "P.PNG")]:
    assert cli.main(["plan", "--lengths", str(lengths_file), "--json", f"--plot={name}"]) == 0
    assert capsys.readouterr().err == f"wrote {file}\n"
    assert file.read_bytes()[:4] == b"\x89PNG"


def test_a_folder_of_lengths_is_not_called_missing(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  for path, message in [
    (tmp_path, "is a folder, not a file of lengths (one per line, or .npy)"),
    (tmp_path / "none.txt", "no such file"),
  ]:
    assert cli_errors.run(lambda path=path: cli.main(["plan", "--lengths", str(path)])) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
  path = tmp_path / "lengths.txt"
  path.write_text("5\n-3\n")
  result = subprocess.run(
    [sys.executable, "-m", "bucketing", "plan", "--lengths", str(path)],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 2
  # Line numbers count from 1, as for a line that is not an integer.
  assert result.stderr == f"error: {path}:2: -3 is not a positive length\n"


@pytest.mark.slow
def test_cli_on_the_real_iam_ondb_training_lengths(built_data_dir, tmp_path, capsys):
  from handwriting import dataset

  examples = dataset.load_examples("iam_ondb", "train", data_dir=built_data_dir)
  points = np.array([len(example["points"]) for example in examples])
  path = tmp_path / "iam_train_points.txt"
  path.write_text("\n".join(map(str, points)))
  assert (points.size, points.min(), points.max()) == (5364, 31, 1540)

  baseline = run_json(capsys, "--lengths", path, "--strategy", "none")
  optimal = run_json(capsys, "--lengths", path, "--strategy", "optimal", "--num-buckets", 8)
  # The figures: one bucket wastes ~60% of the compute, 8 optimal buckets ~9%.
  assert baseline["efficiency"] == pytest.approx(0.40, abs=0.01)
  assert optimal["efficiency"] == pytest.approx(0.91, abs=0.01)
  assert optimal["upper_bounds"] == boundaries.optimal_bounds(points, 8).tolist()
  quantile = run_json(capsys, "--lengths", path, "--strategy", "quantile", "--num-buckets", 8)
  assert optimal["padded_timesteps"] <= quantile["padded_timesteps"]


def test_a_plot_write_that_fails_anyway_is_named_with_its_flag(lengths_file, tmp_path, monkeypatch):
  from matplotlib.figure import Figure

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(Figure, "savefig", refuse)
  argv = ["plan", "--lengths", str(lengths_file), "--plot", str(tmp_path / "p.png")]
  with pytest.raises(OSError, match=r"^--plot .*p\.png: cannot write it \(Permission denied\)$"):
    cli.main(argv)


def test_the_default_batch_is_32_sequences(tmp_path, capsys):
  path = tmp_path / "lengths.txt"
  path.write_text("7\n" * 100)
  summary = run_json(capsys, "--lengths", path, "--strategy", "none")
  assert summary["batch_sizes"] == [32] and summary["steps_per_epoch"] == [4]
  assert summary["filler_rows"] == [28]


# 100 lengths of 10 and 100 of 1,000 in batches of 100, at 1e-6 s a padded token and 1 s a
# compile: one bucket takes 2 x 100 x 1,000 tokens, 0.2 s an epoch; two take 0.101 s.
AUTO_FLAGS = ["--strategy", "auto", "--num-buckets", 2, "--batch-size", 100]
COST_FLAGS = ["--alpha", 0, "--gamma", 0, "--beta", 1e-6, "--kappa", 1]


@pytest.fixture
def two_lengths_file(tmp_path):
  path = tmp_path / "two_lengths.txt"
  path.write_text("10\n" * 100 + "1000\n" * 100)
  return path


def test_cost_flags_are_the_cost_model_of_the_plan(two_lengths_file, capsys):
  summary = run_json(capsys, "--lengths", two_lengths_file, *AUTO_FLAGS, *COST_FLAGS)
  assert summary["cost_model"] == {"alpha": 0.0, "beta": 1e-6, "kappa": 1.0, "gamma": 0.0}
  # One bucket against two: 0.2 s against 0.101 s an epoch.
  assert summary["predicted_speedup"] == pytest.approx(0.2 / 0.101)


def test_auto_plans_for_20_epochs_unless_told(two_lengths_file, capsys):
  # 20 epochs: 20 x 0.2 + 1 = 5 s in one bucket, 20 x 0.101 + 2 = 4.02 s in two.
  summary = run_json(capsys, "--lengths", two_lengths_file, *AUTO_FLAGS, *COST_FLAGS)
  assert summary["auto_seconds_per_count"] == pytest.approx([5.0, 4.02])
  assert summary["upper_bounds"] == [10, 1000]
  # 1 epoch: 1.2 s in one bucket, 2.101 s in two.
  summary = run_json(capsys, "--lengths", two_lengths_file, *AUTO_FLAGS, *COST_FLAGS, "--epochs", 1)
  assert summary["auto_seconds_per_count"] == pytest.approx([1.2, 2.101])
  assert summary["upper_bounds"] == [1000]


def test_round_to_rounds_the_plans_bounds(tmp_path, capsys):
  # Lengths 3, 5, 17 and 30, rounded up to 8: one bucket at 32, or fixed bounds 10, 20 at 16, 24.
  path = tmp_path / "lengths.txt"
  path.write_text("3\n5\n17\n30\n")
  summary = run_json(capsys, "--lengths", path, "--strategy", "none", "--round-to", 8)
  assert summary["upper_bounds"] == [32] and summary["padded_timesteps"] == 4 * 32
  fixed = ["--strategy", "fixed", "--bounds", "10,20", "--overflow", "drop", "--round-to", 8]
  summary = run_json(capsys, "--lengths", path, *fixed)
  assert summary["upper_bounds"] == [16, 24] and summary["dropped"] == ["#3"]
