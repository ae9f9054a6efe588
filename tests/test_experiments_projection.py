"""The multi-GPU projection: its formulas on hand-checkable inputs, and the committed inputs."""

import csv
import re
import types

import numpy as np
import pytest

import cli_errors
from experiments import projection


def test_ring_allreduce_sends_two_n_minus_one_over_n_of_the_buffer():
  assert projection.allreduce_seconds(8e9, 1, 1e9) == 0.0
  assert projection.allreduce_seconds(8e9, 2, 1e9) == pytest.approx(8.0)  # 2 * 1/2 * 8 s
  assert projection.allreduce_seconds(8e9, 4, 1e9) == pytest.approx(12.0)  # 2 * 3/4 * 8 s
  assert projection.allreduce_seconds(8e9, 8, 2e9) == pytest.approx(7.0)  # 2 * 7/8 * 4 s


def test_fit_recovers_an_exact_step_model_and_the_cost_model_is_its_special_case():
  truth = projection.StepTimeModel(constant_ms=1.0, per_timestep_ms=0.04, per_token_ms=2e-4)
  points = [(b, t, truth(b, t)) for b, t in [(32, 152), (32, 608), (32, 1544), (128, 608)]]
  fitted = projection.fit_step_model(points)
  assert fitted.per_timestep_ms == pytest.approx(0.04)
  assert fitted.per_token_ms == pytest.approx(2e-4)
  assert np.allclose(projection.relative_errors(fitted, points), 0, atol=1e-9)
  cost_model = projection.fit_step_model(points, per_timestep=False)
  assert cost_model.per_timestep_ms == 0.0
  assert max(abs(e) for e in projection.relative_errors(cost_model, points)) > 0.1


def test_leave_one_out_refits_without_the_point_it_scores():
  truth = projection.StepTimeModel(constant_ms=1.0, per_timestep_ms=0.04, per_token_ms=2e-4)
  shapes = [(32, 152), (32, 608), (32, 1544), (128, 608), (64, 304)]
  points = [(b, t, truth(b, t)) for b, t in shapes]
  points[2] = (32, 1544, 2 * truth(32, 1544))  # one step measured at twice the model's time
  in_sample = projection.fit_step_model(points)
  errors = projection.relative_errors(in_sample, points, leave_one_out=True)
  # Without it, the other four fit the truth exactly, which predicts half the measured time.
  assert errors[2] == pytest.approx(-0.5)
  assert abs(projection.relative_errors(in_sample, points)[2]) < 0.4


def test_gradient_bytes_are_four_per_parameter():
  import jax

  import train
  from experiments import iam

  config = iam.get_config("tiny")
  state = train.create_train_state(config, train.feature_config(config).num_features, 10)
  parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  assert projection.gradient_bytes(config) == 4 * parameters


def test_strong_scaling_splits_the_batch_weak_scaling_grows_it():
  lengths = np.full(64, 8)  # one bucket of 64 sequences of length 8
  model = projection.StepTimeModel(constant_ms=1.0, per_timestep_ms=0.0, per_token_ms=1.0 / 8)
  # One GPU, batch 32: 2 steps of 1 + 32 * 8 / 8 = 33 ms.
  one = projection.project_epoch(lengths, model, 1, 32, 1e9, 1e9, num_buckets=1)
  assert one["steps"] == 2 and one["epoch_s"] == pytest.approx(0.066)
  # Strong, 2 GPUs, global batch 32: 2 steps of (1 + 16) ms + 1 s all-reduce (2 * 1/2 * 1 GB).
  strong = projection.project_epoch(lengths, model, 2, 32, 1e9, 1e9, num_buckets=1)
  assert strong["steps"] == 2 and strong["epoch_s"] == pytest.approx(2 * (0.017 + 1.0))
  # Weak, 2 GPUs, 32 each: 1 step of 33 ms + the same all-reduce.
  weak = projection.project_epoch(lengths, model, 2, 64, 1e9, 1e9, num_buckets=1)
  assert weak["steps"] == 1 and weak["epoch_s"] == pytest.approx(0.033 + 1.0)


def test_an_epoch_has_k_8_optimal_buckets_bounded_by_multiples_of_8():
  # Lengths 5, 13, ..., 53 and 125 (rounded up: 8, 16, ..., 56 and 128, unevenly spaced), 32 k
  # sequences of the k-th: 8 buckets without padding, k steps of 1 + 32 L_k / 8 ms each:
  # sum over k <= 7 of k (1 + 32 k) = 28 + 32 * 140 ms, and 8 (1 + 4 * 128) ms.
  k = np.arange(1, 9)
  lengths = np.repeat(np.where(k < 8, 8 * k, 128) - 3, 32 * k)
  model = projection.StepTimeModel(constant_ms=1.0, per_timestep_ms=0.0, per_token_ms=1.0 / 8)
  epoch = projection.project_epoch(lengths, model, 1, 32, 0.0, 1e9)
  assert epoch["steps"] == 36 and epoch["compute_s"] == pytest.approx(4.508 + 4.104)
  # One bucket pads everything to 128: 36 steps of 1 + 32 * 128 / 8 = 513 ms.
  one = projection.project_epoch(lengths, model, 1, 32, 0.0, 1e9, num_buckets=1)
  assert one["steps"] == 36 and one["compute_s"] == pytest.approx(36 * 0.513)


def test_a_partial_batch_is_padded_to_a_multiple_of_the_gpus():
  """5 sequences on 4 GPUs: 8 rows (3 filler), 2 per GPU, as the trainer runs them."""
  model = projection.StepTimeModel(constant_ms=1.0, per_timestep_ms=0.0, per_token_ms=1.0 / 8)
  epoch = projection.project_epoch(np.full(5, 8), model, 4, 32, 0.0, 1e9)
  assert epoch["steps"] == 1 and epoch["compute_s"] == pytest.approx(0.003)  # 1 + 2 * 8 / 8 ms


def test_scaling_rows_report_speed_up_against_one_gpu():
  lengths = np.repeat(np.arange(8, 8 * 65, 8), 32)  # 8 buckets of 256 sequences
  model = projection.StepTimeModel(0.5, 0.01, 1e-4)
  rows = projection.scaling_rows(lengths, model, 4e6, links={"fast": 1e12}, device_counts=(1, 2))
  assert [(row["scaling"], row["GPUs"], row["global batch"]) for row in rows] == [
    ("strong", "1", "32"),
    ("strong", "2", "32"),
    ("weak", "1", "32"),
    ("weak", "2", "64"),
  ]
  assert [row["per-GPU batch"] for row in rows] == ["32", "16", "32", "32"]
  assert rows[0]["speed-up"] == rows[2]["speed-up"] == "1.00"
  for row in rows[1], rows[3]:
    ratio = float(rows[0]["epoch (s)"]) / float(row["epoch (s)"])
    assert float(row["speed-up"]) == pytest.approx(ratio, abs=0.01)
    assert float(row["efficiency"]) == pytest.approx(float(row["speed-up"]) / 2, abs=0.01)
  # Strong: half the batch per GPU saves less than half the step time. Weak: the same steps per
  # GPU, half as many of them, and the all-reduce is negligible on this link.
  assert 1 < float(rows[1]["speed-up"]) < 1.9
  assert rows[3]["speed-up"] == "2.00"


def test_rows_give_the_time_of_one_step_and_of_its_all_reduce():
  lengths = np.full(64, 8)  # one bucket of 64 sequences of length 8
  model = projection.StepTimeModel(constant_ms=1.0, per_timestep_ms=0.0, per_token_ms=1.0 / 8)
  rows = projection.scaling_rows(lengths, model, 1e6, links={"slow": 1e9}, device_counts=(1, 2))
  per_step = [(row["compute/step (ms)"], row["all-reduce/step (ms)"]) for row in rows]
  # 1 + B * 8 / 8 ms for B sequences per GPU; 2 * 1/2 * 1 MB at 1 GB/s = 1 ms on 2 GPUs.
  assert per_step == [
    ("33.00", "0.0000"),
    ("17.00", "1.0000"),
    ("33.00", "0.0000"),
    ("33.00", "1.0000"),
  ]


def test_reads_the_committed_h200_step_times():
  points = projection.read_step_times()
  assert sorted((b, t) for b, t, _ in points) == [(32, 152), (32, 608), (32, 1544), (128, 608)]
  # The optax-CTC row of the same shape is another implementation, and is left out.
  with pytest.raises(ValueError, match="the fit needs 3"):
    projection.read_step_times(implementation="scan unroll 8, optax CTC")
  assert projection.read_measured_epoch()[0] == 8


def test_main_writes_a_table_labelled_a_projection(tmp_path):
  out = tmp_path / "projection"
  argv = ["--dataset", "synthetic", "--train-limit", "100", "--out", str(out)]
  text = projection.main(argv).read_text()
  assert "PROJECTION" in text and "2 (n - 1) / n" in text
  # 100 synthetic lines are not the measured epoch's data: no side-by-side check is claimed.
  assert "measured on all of IAM-OnDB's training lines, compares only with a projection" in text
  assert "(not `synthetic`'s 100 here)" in text
  with open(f"{out}.csv", newline="") as file:
    rows = list(csv.DictReader(file))
  assert len(rows) == 2 * len(projection.LINKS) * len(projection.DEVICE_COUNTS)
  assert (tmp_path / "projection.png").read_bytes()[:4] == b"\x89PNG"


def step_times_file(path, rows: list[tuple[int, int, float]], ours: str = "| ours, optimal | 4 |"):
  """A results file of `experiments.benchmark_step` with these (B, T, ms) rows of implementation
  `x` and our measured epoch of 0.5 s."""
  text = [
    projection.ANATOMY_HEADING,
    "",
    "| B | T | implementation | step |",
    "| ---: | ---: | ---: | ---: |",
    *(f"| {b} | {t} | x | {ms} |" for b, t, ms in rows),
    "",
    projection.EPOCH_HEADING,
    "",
    "| contender | K | epoch (s) |",
    "| ---: | ---: | ---: |",
    f"{ours} 0.50 |",
    "",
  ]
  path.write_text("\n".join(text))
  return path


def test_the_fit_needs_three_step_times(tmp_path):
  path = step_times_file(tmp_path / "steps.md", [(32, 152, 3.0), (32, 608, 9.0)])
  with pytest.raises(ValueError, match="2 rows of implementation 'x', the fit needs 3"):
    projection.read_step_times(path, "x")
  step_times_file(path, [(32, 152, 3.0), (32, 608, 9.0), (128, 608, 15.0)])
  assert len(projection.read_step_times(path, "x")) == 3
  assert projection.read_measured_epoch(path) == (4, 0.5)


@pytest.mark.parametrize("train_limit", [0, 640])
def test_main_projects_with_the_fitted_step_model_and_the_links(tmp_path, monkeypatch, train_limit):
  """Step times on c + a T + b B T (c = 1 ms, a = 10 us, b = 100 ns), which the bucketing cost
  model (a = 0) does not fit; 640 IAM-OnDB lines of length 800; 2.88 GB of gradients."""
  import train

  def step(b, t):
    return 1 + 0.01 * t + 1e-4 * b * t

  shapes = [(32, 152), (32, 608), (32, 1544), (128, 608)]
  steps = step_times_file(tmp_path / "steps.md", [(b, t, step(b, t)) for b, t in shapes])
  loaded = []

  def load_split(config, split, limit):
    loaded.append((config.data.dataset, config.data.data_dir, split, limit))
    return types.SimpleNamespace(lengths=np.full(640, 800))

  monkeypatch.setattr(train, "load_split", load_split)
  monkeypatch.setattr(projection, "gradient_bytes", lambda config: 2_880_000_000)
  out = tmp_path / "projection"
  argv = ["--dataset", "iam_ondb", "--data-dir", str(tmp_path / "data"), "--steps", str(steps)]
  argv += ["--implementation", "x", "--train-limit", str(train_limit), "--out", str(out)]
  text = projection.main(argv).read_text()
  assert loaded == [("iam_ondb", str(tmp_path / "data"), "train", train_limit)]
  assert "720,000,000 parameters, 2880.00 MB of float32" in text
  assert "c = 1.000 ms, a = 10.000 us per timestep, b = 100.000 ns per token" in text
  # One GPU, batch 32: 20 steps of 1 + 8 + 2.56 ms.
  assert "projects a one-GPU epoch (K = 8, batch 32) of 0.23 s" in text
  if train_limit:
    assert "compares only with a projection of them (not `iam_ondb`'s 640 here)" in text
  else:
    assert "the same file measured 0.50 s for our trainer at K = 4." in text
  with open(f"{out}.csv", newline="") as file:
    rows = list(csv.DictReader(file))
  per_step = {
    (row["scaling"], row["link"], row["GPUs"]): (
      row["compute/step (ms)"],
      row["all-reduce/step (ms)"],
    )
    for row in rows
  }
  # Per GPU B = 32 / n on 2 GPUs: 1 + 8 + 1.28 ms; 2 * 1/2 * 2.88 GB at 450 and 64 GB/s.
  assert per_step["strong", "NVLink 4", "1"] == ("11.56", "0.0000")
  assert per_step["strong", "NVLink 4", "2"] == ("10.28", "6.4000")
  assert per_step["strong", "PCIe Gen5 x16", "2"] == ("10.28", "45.0000")
  assert per_step["weak", "PCIe Gen5 x16", "2"] == ("11.56", "45.0000")
  # 1-8 GPUs; an epoch: its steps times compute and all-reduce, 20 steps of 32 lines, or of 64.
  assert [row["GPUs"] for row in rows] == ["1", "2", "4", "8"] * 4
  strong, weak = (
    next(r for r in rows if (r["scaling"], r["link"], r["GPUs"]) == (scaling, "NVLink 4", "2"))
    for scaling in ("strong", "weak")
  )
  assert (strong["steps/epoch"], strong["epoch (s)"]) == ("20", "0.334")  # 20 * (10.28 + 6.4) ms
  assert (weak["steps/epoch"], weak["epoch (s)"]) == ("10", "0.180")  # 10 * (11.56 + 6.4) ms


def spoilt_step_times(tmp_path, old: str, new: str) -> str:
  """A copy of the committed results file with `old` replaced by `new`."""
  text = projection.STEP_TIMES.read_text()
  assert old in text
  path = tmp_path / "steps.md"
  path.write_text(text.replace(old, new))
  return str(path)


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--train-limit", "-5"], "argument --train-limit: must be >= 0, got -5"),
    (["--steps", "{tmp}/none.md"], "--steps {tmp}/none.md: no such file"),
    (["--steps", "{tmp}"], "--steps {tmp}: is a folder, not a results file of"),
    (["--steps", "{tmp}/notes.md"], "--steps {tmp}/notes.md: no heading '## Anatomy of one train"),
    (["--implementation", "nope"], "0 rows of implementation 'nope', the fit needs 3; it has"),
    (["--out", "{tmp}"], "--out {tmp}: names a folder; name a file in it"),
    (["--out", "{tmp}/notes.md/x"], "--out {tmp}/notes.md/x: its folder {tmp}/notes.md is not a"),
  ],
)
def test_bad_flags_are_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, argv, message):
  (tmp_path / "notes.md").write_text("# Notes\n\nNot a results file.\n")
  # The data would come after the flags are checked: none here, so reaching it fails otherwise.
  monkeypatch.setattr(projection.iam, "get_config", lambda: pytest.fail("read the data"))
  monkeypatch.delenv(cli_errors.DEBUG_ENV, raising=False)
  argv = ["--dataset", "synthetic", *(arg.format(tmp=tmp_path) for arg in argv)]
  assert cli_errors.run(lambda: projection.main(argv)) == 2
  err = capsys.readouterr().err
  assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1
  assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.md"]


@pytest.mark.parametrize(
  ("read", "old", "new", "message"),
  [
    (projection.read_step_times, "| step |", "| stepz |", "has no column ['step']"),
    (projection.read_step_times, "CTC | 25.10 |", "CTC | x |", "is not numbers (could not"),
    (projection.read_measured_epoch, "| ours, optimal |", "| theirs |", "no row of ours under"),
  ],
)
def test_a_step_table_without_what_the_fit_needs_names_the_file(tmp_path, read, old, new, message):
  path = spoilt_step_times(tmp_path, old, new)
  with pytest.raises(ValueError, match=rf"^{path}: .*{re.escape(message)}"):
    read(path)
