"""Tests for handwriting.report: the numbers `stats` prints and the pictures it draws."""

import numpy as np

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
