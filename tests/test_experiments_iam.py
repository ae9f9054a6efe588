"""The IAM-OnDB experiment's variants are valid configs that do what their docstring says."""

import numpy as np
import pytest

import bucketing
import train
from experiments import iam


def test_the_gpu_variant_budgets_four_times_the_base_lines_at_216_resampled_frames():
  base, gpu = iam.get_config(), iam.get_config("gpu")
  train.validate_config(gpu, num_devices=1)
  assert base.data.features.resample_spacing is None and gpu.data.features.resample_spacing == 0.2
  bounds = np.array([108, 216, 432])
  sizes = bucketing.batch_sizes(bounds, np.full(3, 10_000), max_tokens=gpu.bucketing.max_tokens)
  assert sizes.tolist() == [8 * base.bucketing.batch_size, 4 * base.bucketing.batch_size, 64]
  # The square-root rule for 4x the sequences per step, and as many warm-up sequences as the base.
  assert gpu.optimizer.learning_rate == pytest.approx(2 * base.optimizer.learning_rate)
  assert gpu.optimizer.warmup_steps * 4 == base.optimizer.warmup_steps
  assert 0 < gpu.max_minutes <= 9  # ends inside one 10-minute GPU call
  assert gpu.optimizer.schedule == "constant"  # no cosine planned for epochs the cap cuts off


def test_an_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="known: tiny, gpu"):
    iam.get_config("tpu")
