"""Tests for handwriting.features: what the LSTM sees, and the lengths bucketing sees."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handwriting import synthetic
from handwriting.features import FeatureConfig, ink_to_features, resample_strokes


@pytest.fixture(scope="module")
def line():
  example = synthetic.generate_examples("validation", 1, seed=3)[0]
  return example["points"], example["stroke_end"]


@pytest.mark.parametrize(
  "config",
  [FeatureConfig(), FeatureConfig(time_deltas=True), FeatureConfig(resample_spacing=0.05)],
  ids=["default", "time_deltas", "resampled"],
)
def test_shape_and_dtype(line, config):
  features = ink_to_features(*line, config)
  assert features.dtype == np.float32
  assert features.ndim == 2 and features.shape[1] == config.num_features
  assert np.isfinite(features).all()
  if config.resample_spacing is None:
    assert len(features) == len(line[0])
  # The pen-up bit counts strokes, which resampling keeps.
  assert features[:, 2].sum() == line[1].sum()


@pytest.mark.parametrize(
  "config", [FeatureConfig(time_deltas=True), FeatureConfig(normalize=False)]
)
def test_translation_invariance(line, config):
  points, stroke_end = line
  shifted = points + np.array([1234.0, -567.0, 0.0], dtype=np.float32)
  np.testing.assert_allclose(
    ink_to_features(shifted, stroke_end, config),
    ink_to_features(points, stroke_end, config),
    atol=1e-3,
  )


def test_normalisation_removes_scale(line):
  points, stroke_end = line
  scaled = points * np.array([3.0, 3.0, 1.0], dtype=np.float32)
  config = FeatureConfig()
  np.testing.assert_allclose(
    ink_to_features(scaled, stroke_end, config),
    ink_to_features(points, stroke_end, config),
    atol=1e-4,
  )


def _distance_to_polyline(points, polyline):
  """Distance [num_points] from each point to the nearest segment of polyline [M, 2]."""
  starts, ends = polyline[:-1], polyline[1:]
  segment = ends - starts
  lengths = np.maximum((segment**2).sum(1), 1e-12)
  t = np.clip(((points[:, None] - starts[None]) * segment[None]).sum(-1) / lengths, 0, 1)
  nearest = starts[None] + t[..., None] * segment[None]
  return np.sqrt(((points[:, None] - nearest) ** 2).sum(-1)).min(1)


def test_resampling_keeps_the_path_and_spacing(line):
  points, stroke_end = line
  spacing = 40.0
  resampled, resampled_end = resample_strokes(points.astype(np.float64), stroke_end, spacing)
  assert resampled_end.sum() == stroke_end.sum()
  old_strokes = np.split(points[:, :2], np.flatnonzero(stroke_end)[:-1] + 1)
  new_strokes = np.split(resampled[:, :2], np.flatnonzero(resampled_end)[:-1] + 1)
  for old, new in zip(old_strokes, new_strokes, strict=True):
    np.testing.assert_allclose(new[[0, -1]], old[[0, -1]], atol=1e-3)
    if len(old) > 1 and len(new) > 1:
      # Resampled points lie on the pen's path; the path stays within a spacing of them.
      assert _distance_to_polyline(new, old).max() < 1e-3
      assert _distance_to_polyline(old, new).max() <= spacing
      steps = np.hypot(*np.diff(new, axis=0).T)
      assert steps.max() <= spacing + 1e-6
  assert len(resampled) < len(points)


def resample_each_stroke(points, stroke_end, spacing):
  """`resample_strokes` by its definition, a stroke at a time: np.interp at np.linspace."""
  ends = np.flatnonzero(stroke_end) + 1
  if ends.size == 0 or ends[-1] != len(points):
    ends = np.append(ends, len(points))
  samples, sample_ends = [], []
  for stroke in np.split(points.astype(np.float64), ends[:-1]):
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(stroke[:, :2], axis=0).T))])
    if arc[-1] == 0.0:
      stroke_samples = stroke[:1]
    else:
      targets = np.linspace(0.0, arc[-1], max(int(np.ceil(arc[-1] / spacing)), 1) + 1)
      stroke_samples = np.stack([np.interp(targets, arc, column) for column in stroke.T], axis=1)
    samples.append(stroke_samples)
    sample_ends.append(np.arange(len(stroke_samples)) == len(stroke_samples) - 1)
  return np.concatenate(samples).astype(points.dtype), np.concatenate(sample_ends)


def assert_resampled_as_each_stroke(points, stroke_end, spacing):
  resampled, resampled_end = resample_strokes(points, stroke_end, spacing)
  expected, expected_end = resample_each_stroke(points, stroke_end, spacing)
  assert resampled.dtype == points.dtype
  np.testing.assert_array_equal(resampled, expected)  # to the bit
  np.testing.assert_array_equal(resampled_end, expected_end)


# Strokes of 1-6 points on a coarse grid, so that points repeat (steps of length 0) and whole
# strokes have no length; the last point need not end a stroke.
@settings(max_examples=300, deadline=None)
@given(
  strokes=st.lists(
    st.lists(st.tuples(*[st.integers(-3, 3)] * 3), min_size=1, max_size=6), min_size=1, max_size=6
  ),
  last_ends_a_stroke=st.booleans(),
  spacing=st.sampled_from([0.3, 1.0, 2.5, 7.0]),
  dtype=st.sampled_from([np.float32, np.float64]),
)
def test_resampling_all_strokes_at_once_is_resampling_each(
  strokes, last_ends_a_stroke, spacing, dtype
):
  points = np.array([point for stroke in strokes for point in stroke], dtype) * 0.7
  stroke_end = np.zeros(len(points), bool)
  stroke_end[np.cumsum([len(stroke) for stroke in strokes]) - 1] = True
  stroke_end[-1] = last_ends_a_stroke
  assert_resampled_as_each_stroke(points, stroke_end, spacing)


def test_resampling_real_lines_is_resampling_each_stroke(built_data_dir):
  from handwriting import dataset

  for example in dataset.load_examples("iam_ondb", "train", data_dir=built_data_dir, limit=300):
    points = example["points"].astype(np.float64)
    points = (points - points[0]) / np.array([50.0, 50.0, 1.0])  # near the IAM presets' scale
    for spacing in (0.05, 0.2, 1.0):
      assert_resampled_as_each_stroke(points, example["stroke_end"], spacing)


def test_a_row_is_the_step_from_the_previous_point_and_whether_the_pen_lifts_after_it():
  points = np.array([[10, 20, 0.0], [13, 24, 0.1], [13, 20, 0.2], [20, 21, 0.5]], np.float32)
  stroke_end = np.array([False, True, False, True])
  raw = ink_to_features(points, stroke_end, FeatureConfig(normalize=False, time_deltas=True))
  expected = [[0, 0, 0, 0], [3, 4, 1, 0.1], [0, -4, 0, 0.1], [7, 1, 1, 0.3]]
  np.testing.assert_allclose(raw, expected, rtol=1e-6, atol=1e-6)
  # Normalised: the same steps over the writing's height, the 5th..95th percentile range of y.
  height = np.percentile([20, 24, 20, 21], 95) - np.percentile([20, 24, 20, 21], 5)
  normalised = ink_to_features(points, stroke_end, FeatureConfig())
  np.testing.assert_allclose(normalised[:, :2], raw[:, :2] / height, rtol=1e-6)
  np.testing.assert_array_equal(normalised[:, 2], raw[:, 2])


def test_time_deltas_are_clipped():
  points = np.array([[0, 0, 0], [1, 0, 5.0], [2, 0, 4.0]], dtype=np.float32)
  features = ink_to_features(
    points, np.array([False, False, True]), FeatureConfig(time_deltas=True)
  )
  np.testing.assert_allclose(features[:, 3], [0.0, 1.0, 0.0])


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="expected points"):
    ink_to_features(np.zeros((0, 3), np.float32), np.zeros(0, bool), FeatureConfig())
  for points, stroke_end in (
    (np.zeros((3, 2), np.float32), np.zeros(3, bool)),  # no time column
    (np.zeros((3, 3), np.float32), np.zeros(2, bool)),  # a pen-up bit short
  ):
    with pytest.raises(ValueError, match="expected points"):
      ink_to_features(points, stroke_end, FeatureConfig())
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match=f"resample_spacing must be positive or None, got {bad}"):
      FeatureConfig(resample_spacing=bad)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match=f"max_time_delta must be positive, got {bad}"):
      FeatureConfig(max_time_delta=bad)


def test_a_flat_line_keeps_its_offsets_in_sensor_units():
  # y never changes: the height is 1 (not 0, which would make every offset NaN).
  points = np.array([[0, 5, 0.0], [3, 5, 0.1], [7, 5, 0.2]], np.float32)
  features = ink_to_features(points, np.array([False, False, True]), FeatureConfig())
  np.testing.assert_array_equal(features, [[0, 0, 0], [3, 0, 0], [4, 0, 1]])
  dot = ink_to_features(np.array([[2, 3, 0.0]], np.float32), np.array([True]), FeatureConfig())
  np.testing.assert_array_equal(dot, [[0, 0, 1]])


def test_resample_spacing_is_in_height_units_when_normalised():
  # Two vertical strokes 10 sensor units long; the writing's height is 10, so each stroke is 1
  # height long and a spacing of 0.25 puts 5 points on it (in sensor units it would be 41).
  points = np.array([[0, 0, 0], [0, 10, 1], [5, 0, 2], [5, 10, 3]], np.float32)
  stroke_end = np.array([False, True, False, True])
  features = ink_to_features(points, stroke_end, FeatureConfig(resample_spacing=0.25))
  up = [0, 0.25, 0]
  expected = [[0, 0, 0], up, up, up, [0, 0.25, 1], [0.5, -1, 0], up, up, up, [0, 0.25, 1]]
  np.testing.assert_allclose(features, expected, atol=1e-6)


def test_time_deltas_stay_in_seconds_when_the_offsets_are_normalised():
  # y is 0 or 10, so the writing is 10 high: offsets shrink tenfold, seconds stay seconds.
  points = np.array([[0, 0, 0], [0, 10, 0.5], [5, 0, 0.75], [5, 10, 1.0]], np.float32)
  stroke_end = np.array([False, True, False, True])
  features = ink_to_features(points, stroke_end, FeatureConfig(time_deltas=True))
  expected = [[0, 0, 0, 0], [0, 1, 1, 0.5], [0.5, -1, 0, 0.25], [0, 1, 1, 0.25]]
  np.testing.assert_allclose(features, expected, atol=1e-6)


def test_time_deltas_are_clipped_at_the_configured_maximum():
  points = np.array([[0, 0, 0], [1, 0, 2.0], [2, 0, 6.0], [3, 0, 6.5]], np.float32)
  stroke_end = np.array([False, False, False, True])
  config = FeatureConfig(normalize=False, time_deltas=True, max_time_delta=3.0)
  np.testing.assert_allclose(ink_to_features(points, stroke_end, config)[:, 3], [0, 2, 3, 0.5])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_point_that_is_not_a_finite_number_is_rejected_naming_it(normalize, bad):
  # Else it reaches the model as NaN features (with normalisation, every row of the line).
  points = np.array([[0, 0, 0], [1, 2, 0.5], [2, 4, 1.0]], np.float32)
  points[1, 1] = bad
  message = rf"must be finite numbers; point 1 is \[1\.0, {bad}, 0\.5\]"
  with pytest.raises(ValueError, match=message):
    ink_to_features(points, np.array([False, False, True]), FeatureConfig(normalize=normalize))


def test_the_first_point_that_is_not_a_finite_number_is_named():
  points = np.array([[0, 0, 0], [np.nan, 2, 0.5], [2, np.inf, 1.0]], np.float32)
  with pytest.raises(ValueError, match=r"point 1 is \[nan, 2\.0, 0\.5\]"):
    ink_to_features(points, np.array([False, False, True]), FeatureConfig())
