"""Batch assembly: padding, paddings masks, labels, weights, filler rows, truncation."""

import numpy as np
import pytest

from bucketing import batching
from bucketing.schedule import FILLER

RNG = np.random.default_rng(0)
FEATURES = [RNG.normal(size=(n, 3)).astype(np.float32) for n in (4, 7, 2)]
LABELS = [np.array(label, np.int32) for label in ([1, 2], [3], [4, 5, 6])]


def test_batch_holds_each_sequence_and_its_paddings():
  batch = batching.assemble_batch(FEATURES, LABELS, np.array([2, 0, FILLER, 1]), 8, 4)
  assert batch["inputs"].shape == (4, 8, 3) and batch["inputs"].dtype == np.float32
  assert batch["labels"].shape == (4, 4) and batch["labels"].dtype == np.int32
  np.testing.assert_array_equal(batch["weights"], [1, 1, 0, 1])
  for row, index in ((0, 2), (1, 0), (3, 1)):
    length = len(FEATURES[index])
    np.testing.assert_array_equal(batch["inputs"][row, :length], FEATURES[index])
    np.testing.assert_array_equal(batch["inputs"][row, length:], 0)
    np.testing.assert_array_equal(batch["input_paddings"][row], np.arange(8) >= length)
    label = LABELS[index]
    np.testing.assert_array_equal(batch["labels"][row, : len(label)], label)
    np.testing.assert_array_equal(batch["label_paddings"][row], np.arange(4) >= len(label))


def test_filler_row_is_a_valid_length_one_sequence_with_no_label():
  batch = batching.assemble_batch(FEATURES, LABELS, np.array([0, FILLER]), 8, 4)
  assert batch["weights"][1] == 0
  assert (1 - batch["input_paddings"][1]).sum() == 1
  assert batch["label_paddings"][1].sum() == 4


def test_a_slice_of_filler_rows_only_keeps_its_shape():
  batch = batching.assemble_batch(FEATURES, LABELS, np.array([FILLER, FILLER]), 8, 4)
  assert batch["inputs"].shape == (2, 8, 3)
  np.testing.assert_array_equal(batch["weights"], [0, 0])


def test_long_sequence_is_an_error_unless_truncating():
  with pytest.raises(ValueError, match="example 1 has length 7 > bucket bound 5"):
    batching.assemble_batch(FEATURES, LABELS, np.array([1]), 5, 4)
  batch = batching.assemble_batch(FEATURES, LABELS, np.array([1]), 5, 4, truncate=True)
  np.testing.assert_array_equal(batch["inputs"][0], FEATURES[1][:5])
  assert batch["input_paddings"].sum() == 0


def test_label_wider_than_the_bucket_is_an_error():
  with pytest.raises(ValueError, match="label of 3 > bucket label width 2"):
    batching.assemble_batch(FEATURES, LABELS, np.array([2]), 8, 2)


def test_a_sequence_and_a_label_exactly_as_long_as_the_bucket_fit_unpadded():
  # A bucket's bounds are its longest sequence and label: every bucket has rows exactly that long.
  batch = batching.assemble_batch(FEATURES, LABELS, np.array([1, 2]), 7, 3)
  np.testing.assert_array_equal(batch["inputs"][0], FEATURES[1])
  np.testing.assert_array_equal(batch["input_paddings"][0], np.zeros(7))
  np.testing.assert_array_equal(batch["labels"][1], [4, 5, 6])
  np.testing.assert_array_equal(batch["label_paddings"][1], np.zeros(3))
  np.testing.assert_array_equal(batch["weights"], [1, 1])
