"""Tests for handwriting.report: the numbers `stats` prints and the pictures it draws."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from handwriting import report
from handwriting.features import FeatureConfig
from handwriting.synthetic import generate_examples


def test_dataset_stats_counts_lengths_and_characters():
  examples = {"train": generate_examples("train", 6), "test": generate_examples("test", 3)}
  skipped = [{"id": "x-01", "split": "test", "reason": "no points"}]
  config = FeatureConfig(resample_spacing=0.1)
  lengths = {split: report.split_lengths(lines, config) for split, lines in examples.items()}
  stats = report.dataset_stats(examples, lengths, skipped, config)
  assert stats["splits"]["train"]["examples"] == 6 and stats["splits"]["test"]["examples"] == 3
  points = [len(e["points"]) for e in examples["train"]]
  assert stats["splits"]["train"]["points"]["max"] == max(points)
  assert stats["splits"]["train"]["points"]["median"] == np.median(points)
  assert stats["splits"]["train"]["features"]["max"] < max(points)  # resampling shortens
  text = "".join(e["text"] for split in examples.values() for e in split)
  assert stats["character_counts"] == {c: text.count(c) for c in sorted(set(text))}
  assert stats["skipped"] == skipped
  printed = report.format_stats(stats)
  assert "x-01: no points" in printed and "train" in printed


def test_plots_are_written(tmp_path):
  examples = {"train": generate_examples("train", 4)}
  lengths = {"train": report.split_lengths(examples["train"], FeatureConfig())}
  report.plot_lengths(lengths, FeatureConfig(), str(tmp_path / "lengths.png"))
  report.render_example(examples["train"][0], str(tmp_path / "line.png"))
  for name in ("lengths.png", "line.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_length_statistics_on_lengths_made_by_hand():
  squares = np.arange(201) ** 2  # the 5th, 50th and 95th percentiles fall on entries 10, 100, 190
  lengths = {"train": {"points": squares}}
  stats = report.dataset_stats({"train": [{"text": "a"}] * 201}, lengths, [], FeatureConfig())
  assert stats["splits"]["train"]["points"] == {
    "min": 0,
    "p5": 100.0,
    "median": 10_000.0,
    "mean": 13_366.7,
    "p95": 36_100.0,
    "max": 40_000,
  }


def test_extreme_lengths_are_found_wherever_they_are_in_the_split():
  lengths = {"train": {"points": np.array([7, 2, 9, 4])}}
  stats = report.dataset_stats({"train": [{"text": "a"}] * 4}, lengths, [], FeatureConfig())
  assert stats["splits"]["train"]["points"]["min"] == 2
  assert stats["splits"]["train"]["points"]["max"] == 9


def _line(text: str, num_points: int) -> dict:
  """A hand-made line: one stroke of `num_points` points along a diagonal."""
  points = np.stack([np.arange(num_points), np.arange(num_points), 0.02 * np.arange(num_points)], 1)
  stroke_end = np.arange(num_points) == num_points - 1
  return {"id": text, "text": text, "points": points.astype(np.float32), "stroke_end": stroke_end}


def test_split_lengths_count_the_points_and_the_characters_of_each_line():
  lengths = report.split_lengths([_line("ab c", 3), _line("hello", 5)], FeatureConfig())
  np.testing.assert_array_equal(lengths["points"], [3, 5])
  np.testing.assert_array_equal(lengths["characters"], [4, 5])  # spaces are characters too


def test_an_empty_split_has_its_count_and_no_length_statistics():
  examples = {"train": [_line("ab", 3)], "test": []}
  lengths = {
    split: report.split_lengths(lines, FeatureConfig()) for split, lines in examples.items()
  }
  stats = report.dataset_stats(examples, lengths, [], FeatureConfig())
  assert stats["splits"]["test"] == {"examples": 0, "points": {}, "features": {}, "characters": {}}
  lines = report.format_stats(stats).splitlines()
  test = [line.split() for line in lines].index(["test", "0"])
  assert lines[test + 1].startswith("features computed with")  # no length lines for the split


def test_stats_name_the_feature_config_and_list_characters_in_order():
  config = FeatureConfig(normalize=False, resample_spacing=0.5, time_deltas=True)
  examples = {"train": [{"text": "ba"}, {"text": "ca"}]}
  lengths = {"train": {"characters": np.array([2, 2])}}
  stats = report.dataset_stats(examples, lengths, [], config)
  assert stats["feature_config"] == {
    "normalize": False,
    "resample_spacing": 0.5,
    "time_deltas": True,
  }
  assert list(stats["character_counts"].items()) == [("a", 2), ("b", 1), ("c", 1)]


def test_format_stats_prints_each_figure_in_its_place():
  summary = {"min": 3, "p5": 4.0, "median": 50.5, "mean": 61.25, "p95": 120.0, "max": 130}
  stats = {
    "splits": {
      "train": {"examples": 7, "points": summary, "features": {}, "characters": summary},
      "test": {"examples": 0, "points": {}, "features": {}, "characters": {}},
    },
    "skipped": [{"id": "x-01", "split": "test", "reason": "no points"}],
    "feature_config": {"normalize": True, "resample_spacing": None, "time_deltas": False},
    "character_counts": {" ": 2, "a": 3, "b": 1},
  }
  lines = report.format_stats(stats).splitlines()
  assert lines[0].split()[:2] == ["split", "examples"]
  assert lines[1].split() == ["train", "7"]
  # min / median / mean / p95 / max; no line for the features, which have no statistics
  assert lines[2].split() == ["points", "3", "/", "50.5", "/", "61.25", "/", "120", "/", "130"]
  assert lines[3].split() == ["characters", "3", "/", "50.5", "/", "61.25", "/", "120", "/", "130"]
  assert lines[4].split() == ["test", "0"]
  assert lines[5] == f"features computed with {stats['feature_config']}"
  assert lines[6:] == [
    "skipped: 1",
    "  x-01: no points",
    "characters: 3 distinct",
    "  ' ':2  'a':3  'b':1",
  ]


@pytest.fixture
def kept_figures(monkeypatch):
  """The figures report draws, kept open instead of closed so that a test can look at them."""
  figures, close = [], plt.close
  monkeypatch.setattr(report.plt, "close", figures.append)
  yield figures
  for figure in figures:
    close(figure)


def test_length_histograms_show_points_left_and_features_right_for_each_split(
  tmp_path, kept_figures
):
  lengths = {
    "train": {"points": np.array([100, 150, 200]), "features": np.array([10, 15, 20])},
    "test": {"points": np.array([300, 400]), "features": np.array([30, 40])},
  }
  report.plot_lengths(lengths, FeatureConfig(), str(tmp_path / "lengths.png"))
  (figure,) = kept_figures
  left, right = figure.axes
  for axis, kind in ((left, "points"), (right, "features")):
    # a step histogram's outline spans its data's range, from the first bin edge to the last
    spans = {p.get_label(): (p.get_xy()[:, 0].min(), p.get_xy()[:, 0].max()) for p in axis.patches}
    assert spans == {split: (v[kind].min(), v[kind].max()) for split, v in lengths.items()}
  assert [text.get_text() for text in left.get_legend().get_texts()] == ["train", "test"]


def test_a_rendered_line_draws_each_stroke_apart_with_y_upwards(tmp_path, kept_figures):
  points = np.array([[0, 0, 0], [1, 2, 0.02], [2, 1, 0.04], [5, 5, 0.5], [6, 6, 0.52]], np.float32)
  stroke_end = np.array([False, False, True, False, True])
  line = {"id": "x-01", "text": "hi", "points": points, "stroke_end": stroke_end}
  report.render_example(line, str(tmp_path / "line.png"))
  (figure,) = kept_figures
  (axis,) = figure.axes
  drawn = [(list(a.get_xdata()), list(a.get_ydata())) for a in axis.get_lines()]
  assert drawn == [([0, 1, 2], [0, -2, -1]), ([5, 6], [-5, -6])]  # y grows downwards in the ink
  assert axis.get_title(loc="left") == "x-01: hi"
