"""Pen trajectories -> per-step model inputs (numpy, on the host).

The rows of `ink_to_features` are the time steps the LSTM sees, so their count is the sequence
length that bucketing works with; resampling changes it, normalisation does not.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """How ink becomes features: [dx, dy, pen_up] (+ [dt] with `time_deltas`) per point.

  normalize: translate the line to its first point and divide by the writing's height (the
    5th..95th percentile range of y, robust to a stray stroke), so that writers of different size
    and distance from the sensor look alike. Offsets are translation invariant either way.
  resample_spacing: when set, each stroke is resampled to points this far apart along the pen path
    (in height units when `normalize`, else sensor units), keeping each stroke's ends. It removes
    the writer's speed from the sequence and shortens it. None keeps the digitiser's points.
  time_deltas: add the time since the previous point in seconds (the pen's speed, and the pause
    before a stroke), clipped to [0, max_time_delta]: the digitiser clock jumps (backwards, too)
    in some IAM-OnDB lines, and a longer pause says nothing more. With resampling these are
    interpolated times.
  """

  normalize: bool = True
  resample_spacing: float | None = None
  time_deltas: bool = False
  max_time_delta: float = 1.0

  def __post_init__(self):
    if self.resample_spacing is not None and not self.resample_spacing > 0:
      raise ValueError(f"resample_spacing must be positive or None, got {self.resample_spacing}")
    if not self.max_time_delta > 0:  # NaN too: every dt would be clipped to it
      raise ValueError(f"max_time_delta must be positive, got {self.max_time_delta}")

  @property
  def num_features(self) -> int:
    """Width F of the feature rows: dx, dy, pen_up and optionally dt."""
    return 4 if self.time_deltas else 3


def writing_height(y: np.ndarray) -> float:
  """The writing's vertical extent [y: num_points], robust to outliers; 1.0 for a flat line."""
  low, high = np.percentile(y, [5.0, 95.0])
  return float(high - low) if high > low else 1.0


def resample_strokes(
  points: np.ndarray, stroke_end: np.ndarray, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
  """Points [N, 3] -> points [M, 3] equidistant (`spacing`) along each stroke's path.

  Each stroke keeps its first and last point, so pen-ups stay where they were; a stroke shorter
  than `spacing` becomes its two ends (one point if it has no length). Time is interpolated; the
  dtype of `points` is kept.

  Per stroke this is `np.interp` at `np.linspace(0, length, count)` of the arc length, to the
  bit, but done for all strokes of a line at once: an IAM-OnDB line has 26 strokes (median), and
  with a loop over them loading its training split resampled took 10.2 s instead of 3.8 (median
  of 3, a 2-core CPU), paid by every run's start.
  """
  ends = np.flatnonzero(stroke_end) + 1
  if ends.size == 0 or ends[-1] != len(points):
    ends = np.append(ends, len(points))
  sizes = np.diff(ends, prepend=0)
  strokes = np.arange(len(sizes))
  # [stroke, point of the stroke] tables; arc: each stroke's running path length, summed in the
  # order np.cumsum sums one stroke, +inf past the stroke's last point.
  point_stroke = np.repeat(strokes, sizes)
  point_index = np.arange(len(points)) - (ends - sizes)[point_stroke]
  values = np.zeros((len(sizes), sizes.max(), 3))
  values[point_stroke, point_index] = points
  steps = np.hypot(*np.diff(values[:, :, :2], axis=1).transpose(2, 0, 1))
  arc = np.concatenate([np.zeros((len(sizes), 1)), np.cumsum(steps, axis=1)], axis=1)
  arc[np.arange(sizes.max()) >= sizes[:, None]] = np.inf
  length = arc[strokes, sizes - 1]
  # The samples: per stroke np.linspace(0, length, count), one for a stroke without length.
  counts = np.where(length > 0, np.maximum(np.ceil(length / spacing).astype(np.int64), 1) + 1, 1)
  stroke = np.repeat(strokes, counts)
  index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  last = index == counts[stroke] - 1
  targets = np.where(last, length[stroke], index * (length / np.maximum(counts - 1, 1))[stroke])
  # np.interp: the last knot j with arc[j] <= target; a target on a knot takes its value (so a
  # stroke without length its first point), one between knots j and j + 1 their line's.
  knot = np.where(length[stroke] > 0, np.sum(arc[stroke] <= targets[:, None], axis=1) - 1, 0)
  following = np.minimum(knot + 1, sizes[stroke] - 1)
  x0, x1 = arc[stroke, knot], arc[stroke, following]
  y0, y1 = values[stroke, knot], values[stroke, following]
  on_knot = (knot == sizes[stroke] - 1) | (x0 == targets)
  with np.errstate(divide="ignore", invalid="ignore"):  # x1 == x0 only where on_knot
    between = (y1 - y0) / (x1 - x0)[:, None] * (targets - x0)[:, None] + y0
  return np.where(on_knot[:, None], y0, between).astype(points.dtype), last


def ink_to_features(
  points: np.ndarray, stroke_end: np.ndarray, config: FeatureConfig
) -> np.ndarray:
  """Points [N, 3] (x, y, time) and stroke_end [N] -> features float32 [T, config.num_features].

  Row t is (dx, dy, pen_up[, dt]): the pen's offset from point t-1 (zero for the first point),
  whether the pen lifts after point t, and the time since point t-1. T == N without resampling.
  """
  points = np.asarray(points, dtype=np.float64)
  stroke_end = np.asarray(stroke_end, dtype=np.bool_)
  if (
    points.ndim != 2
    or points.shape[1] != 3
    or stroke_end.shape != (len(points),)
    or not len(points)
  ):
    raise ValueError(
      f"expected points [N>0, 3] and stroke_end [N], got {points.shape} and {stroke_end.shape}"
    )
  if not np.all(np.isfinite(points)):  # NaN would reach the model as NaN features, silently
    row = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0])
    raise ValueError(f"points must be finite numbers; point {row} is {points[row].tolist()}")
  if config.normalize:
    scale = writing_height(points[:, 1])
    points = np.concatenate([(points[:, :2] - points[0, :2]) / scale, points[:, 2:]], axis=1)
  if config.resample_spacing is not None:
    points, stroke_end = resample_strokes(points, stroke_end, config.resample_spacing)
  deltas = np.diff(points, axis=0, prepend=points[:1])
  columns = [deltas[:, 0], deltas[:, 1], stroke_end.astype(np.float64)]
  if config.time_deltas:
    columns.append(np.clip(deltas[:, 2], 0.0, config.max_time_delta))
  return np.stack(columns, axis=1).astype(np.float32)
