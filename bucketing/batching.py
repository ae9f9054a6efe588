"""Batch assembly: per-example arrays into one padded, statically shaped batch dict."""

from collections.abc import Sequence

import numpy as np

from bucketing.schedule import FILLER


def assemble_batch(
  features: Sequence[np.ndarray],
  labels: Sequence[np.ndarray],
  indices: np.ndarray,
  upper_bound: int,
  label_upper_bound: int,
  *,
  truncate: bool = False,
) -> dict[str, np.ndarray]:
  """Pads the sequences `indices` points at to the bucket's shape.

  Args:
    features: per example, an array [length, num_features].
    labels: per example, an int array [label_length].
    indices: [batch] example indices; `FILLER` (-1) marks a filler row, which gets length 1, an
      empty label and weight 0, so every layer still sees a valid sequence. A process's slice of
      a last, partial batch may hold filler rows only.
    upper_bound: the bucket's time length L.
    label_upper_bound: the bucket's label width.
    truncate: cut sequences longer than `upper_bound` (the plan's `truncate` overflow policy);
      otherwise such a sequence is an error.

  Returns:
    `inputs` [batch, L, num_features] float32, `input_paddings` [batch, L] (1.0 = padded),
    `labels` [batch, label_width] int32, `label_paddings` [batch, label_width], `weights` [batch].
  """
  num_features = features[0].shape[-1]
  batch = len(indices)
  inputs = np.zeros((batch, upper_bound, num_features), np.float32)
  input_paddings = np.ones((batch, upper_bound), np.float32)
  label_array = np.zeros((batch, label_upper_bound), np.int32)
  label_paddings = np.ones((batch, label_upper_bound), np.float32)
  weights = np.zeros(batch, np.float32)
  for row, index in enumerate(indices):
    if index == FILLER:
      input_paddings[row, 0] = 0.0
      continue
    sequence, label = features[index], labels[index]
    if len(sequence) > upper_bound and not truncate:
      raise ValueError(
        f"example {index} has length {len(sequence)} > bucket bound {upper_bound} "
        "(plan it with overflow='truncate' to cut it)"
      )
    if len(label) > label_upper_bound:
      raise ValueError(
        f"example {index} has a label of {len(label)} > bucket label width {label_upper_bound}"
      )
    length = min(len(sequence), upper_bound)
    inputs[row, :length] = sequence[:length]
    input_paddings[row, :length] = 0.0
    label_array[row, : len(label)] = label
    label_paddings[row, : len(label)] = 0.0
    weights[row] = 1.0
  return {
    "inputs": inputs,
    "input_paddings": input_paddings,
    "labels": label_array,
    "label_paddings": label_paddings,
    "weights": weights,
  }
