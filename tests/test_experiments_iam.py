"""The IAM-OnDB experiment's variants are valid configs that do what their docstring says."""

import numpy as np
import pytest

import bucketing
import train
from experiments import iam, recipe
from tests.test_experiments_recipe import flat


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
  assert gpu.selection_metric == "val_cer"  # the validation loss rises long before the CER does


def test_the_cpu_variant_is_the_recipe_run_it_cites_with_more_dropout(tmp_path):
  """`iam.py:cpu` trains what results/recipe_full_cpu.md measured (the recipe's base with that
  command's --base, its probe's 70 epochs and its 90 minutes; the recipe also turns the test
  split, the progress bar and the compilation cache off, which change no result) but with the
  dropout of 0.4 that results/iam_cpu_dropout04_* measured better."""
  base = (
    "data.features.resample_spacing=0.2,model.num_layers=2,bucketing.batch_size=16,"
    "optimizer.learning_rate=6e-3,optimizer.warmup_steps=100"
  )
  argv = ["--preset", "full", "--dataset", "iam_ondb", "--minutes-per-run", "90"]
  args = recipe.parse_args([*argv, "--base", base, "--candidates", "base"])
  studied = recipe.candidate_config(recipe.base_config(args), recipe.named_candidate("base"))
  studied.num_epochs = studied.patience = 70
  studied.max_minutes = args.minutes_per_run
  cpu = iam.get_config("cpu")
  train.validate_config(cpu, num_devices=1)
  unchanged = ("data.test_split", "progress_bar", "compilation_cache_dir")
  differing = {
    field
    for field, value in flat(cpu).items()
    if value != flat(studied)[field] and field not in unchanged
  }
  assert differing == {"model.dropout_rate"}
  assert (cpu.model.dropout_rate, studied.model.dropout_rate) == (0.4, 0.2)


def test_an_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="known: tiny, gpu, cpu"):
    iam.get_config("tpu")
