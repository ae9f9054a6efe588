"""Looking at a dataset: length and character statistics, a length histogram, and rendered ink."""

import collections

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from handwriting.features import FeatureConfig, ink_to_features


def _summary(lengths: np.ndarray) -> dict:
  """Length statistics that matter for bucketing: the centre and how long the tail is."""
  if not len(lengths):
    return {}
  percentiles = np.percentile(lengths, [5, 50, 95])
  return {
    "min": int(lengths.min()),
    "p5": round(float(percentiles[0]), 1),
    "median": round(float(percentiles[1]), 1),
    "mean": round(float(lengths.mean()), 1),
    "p95": round(float(percentiles[2]), 1),
    "max": int(lengths.max()),
  }


def split_lengths(examples: list[dict], feature_config: FeatureConfig) -> dict[str, np.ndarray]:
  """Per-example lengths [num_examples] of points, of features and of the text."""
  return {
    "points": np.array([len(e["points"]) for e in examples], dtype=np.int64),
    "features": np.array(
      [len(ink_to_features(e["points"], e["stroke_end"], feature_config)) for e in examples],
      dtype=np.int64,
    ),
    "characters": np.array([len(e["text"]) for e in examples], dtype=np.int64),
  }


def dataset_stats(
  examples_by_split: dict[str, list[dict]],
  lengths_by_split: dict[str, dict[str, np.ndarray]],
  skipped: list[dict],
  feature_config: FeatureConfig,
) -> dict:
  """The `stats` report: per split counts and lengths, skipped lines, character counts.

  `lengths_by_split` is `split_lengths` of each split under `feature_config`, computed once by the
  caller (featurising every line is the slow part, and the plot needs the same lengths).

  Returns {"splits": {split: {"examples", "points", "features", "characters"}}, "skipped":
  [{"id", "reason", ...}], "feature_config": {...}, "character_counts": {character: count}}.
  """
  splits = {}
  character_counts = collections.Counter()
  for split, examples in examples_by_split.items():
    lengths = lengths_by_split[split]
    splits[split] = {"examples": len(examples)} | {k: _summary(v) for k, v in lengths.items()}
    for example in examples:
      character_counts.update(example["text"])
  return {
    "splits": splits,
    "skipped": skipped,
    "feature_config": {
      "normalize": feature_config.normalize,
      "resample_spacing": feature_config.resample_spacing,
      "time_deltas": feature_config.time_deltas,
    },
    "character_counts": dict(sorted(character_counts.items())),
  }


def format_stats(stats: dict) -> str:
  """The `stats` report as text for a terminal."""
  lines = [f"{'split':<12} {'examples':>8}  lengths (min / median / mean / p95 / max)"]
  for split, info in stats["splits"].items():
    lines.append(f"{split:<12} {info['examples']:>8}")
    for kind in ("points", "features", "characters"):
      s = info[kind]
      if s:
        lines.append(
          f"{'':<12} {kind:>12}  {s['min']} / {s['median']:g} / {s['mean']:g} / {s['p95']:g} / "
          f"{s['max']}"
        )
  lines.append(f"features computed with {stats['feature_config']}")
  lines.append(f"skipped: {len(stats['skipped'])}")
  lines.extend(f"  {item['id']}: {item['reason']}" for item in stats["skipped"])
  counts = stats["character_counts"]
  lines.append(f"characters: {len(counts)} distinct")
  lines.append("  " + "  ".join(f"{c!r}:{n}" for c, n in counts.items()))
  return "\n".join(lines)


def plot_lengths(
  lengths_by_split: dict[str, dict[str, np.ndarray]], feature_config: FeatureConfig, path: str
) -> None:
  """Save histograms of point and feature lengths per split (`split_lengths` of each split under
  `feature_config`): what bucketing has to cover."""
  figure, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
  for split, lengths in lengths_by_split.items():
    for axis, kind in zip(axes, ("points", "features"), strict=True):
      axis.hist(lengths[kind], bins=60, histtype="step", density=True, label=split)
  axes[0].set(title="points per line", xlabel="length", ylabel="density")
  axes[1].set(
    title=f"features per line (resample_spacing={feature_config.resample_spacing})", xlabel="length"
  )
  axes[0].legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def render_example(example: dict, path: str) -> None:
  """Save a picture of one line's ink (pen-down strokes, y upwards) titled with its text."""
  points = example["points"]
  ends = np.flatnonzero(example["stroke_end"]) + 1
  width = float(np.ptp(points[:, 0])) or 1.0
  height = float(np.ptp(points[:, 1])) or 1.0
  figure, axis = plt.subplots(figsize=(12, max(1.5, 12 * height / width + 0.8)))
  for stroke in np.split(points, ends[:-1]):
    axis.plot(stroke[:, 0], -stroke[:, 1], color="black", linewidth=1.2)
  axis.set_aspect("equal")
  axis.set_axis_off()
  axis.set_title(f"{example['id']}: {example['text']}", fontsize=11, loc="left")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
