"""The README's Python snippets run as printed (the training one is the notebook test's job)."""

import pathlib
import re

import numpy as np
import pytest

import bucketing
from experiments import common

README = pathlib.Path(__file__).parent.parent / "README.md"


def snippet(containing: str) -> str:
  """The README's one ```python block that contains `containing`."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
  found = [block for block in blocks if containing in block]
  assert len(found) == 1, f"{len(found)} README python blocks contain {containing!r}"
  return found[0]


def test_bucketing_snippet_batches_every_sequence_once(monkeypatch):
  rng = np.random.default_rng(0)
  lengths = rng.integers(20, 600, size=500)
  label_lengths = np.maximum(lengths // 25, 1)
  features = [rng.normal(size=(length, 3)).astype(np.float32) for length in lengths]
  labels = [np.ones(length, np.int32) for length in label_lengths]
  batches = []

  def assemble_and_keep(*args, **kwargs):
    batches.append(assemble_batch(*args, **kwargs))
    return batches[-1]

  assemble_batch = bucketing.assemble_batch
  monkeypatch.setattr(bucketing, "assemble_batch", assemble_and_keep)
  namespace = dict(lengths=lengths, label_lengths=label_lengths, features=features, labels=labels)
  exec(compile(snippet("bucketing.make_plan("), str(README), "exec"), namespace)

  plan = namespace["plan"]
  assert plan.num_buckets == 8
  assert len(batches) == int(np.sum(plan.steps_per_epoch))
  assert {batch["inputs"].shape[1] for batch in batches} == set(plan.upper_bounds.tolist())
  # Every sequence once, whole: the real rows' valid frames add up to the corpus (filler rows,
  # weight 0, hold one frame each).
  real = sum(
    int(np.sum((1.0 - batch["input_paddings"]) * batch["weights"][:, None])) for batch in batches
  )
  assert real == int(lengths.sum())
  assert sum(int(batch["weights"].sum()) for batch in batches) == len(lengths)


@pytest.mark.slow
def test_data_snippet_gives_the_documented_features():
  namespace = {}
  exec(compile(snippet("featurize(load_examples("), str(README), "exec"), namespace)
  train = namespace["train"]
  assert train.features[0].shape == (train.lengths[0], 3)
  assert train.features[0].dtype == np.float32
  assert all(label.min() >= 1 and label.max() <= 81 for label in train.labels[:100])


def test_the_config_table_gives_the_defaults_of_base_config():
  config, checked = common.base_config(), []
  table = README.read_text().split("| field | default | meaning |\n")[1].split("\n\n")[0]
  for line in table.splitlines()[1:]:
    names, default = [cell.strip() for cell in line.strip("|").split("|")[:2]]
    fields = re.findall(r"`([\w.]+)`", names)  # `model.*` and the like are prose
    defaults = re.split(r" / |, ", default.replace("`", ""))
    if not fields or default == "per-user":
      continue
    parent = fields[0].rpartition(".")[0]  # `bucketing.batch_size` / `max_tokens`
    defaults = defaults * len(fields) if len(defaults) == 1 else defaults
    for field, text in zip(fields, defaults, strict=True):
      value = config
      for key in (field if "." in field or not parent else f"{parent}.{field}").split("."):
        value = value[key]
      assert value == (None if text == "None" else float(text) if text[0].isdigit() else text)
      checked.append(field)
  assert len(checked) == 20 and "num_buckets" in " ".join(checked)


def test_tiny_is_the_readmes_48_lines_and_2_epochs():
  tiny = common.tiny(common.base_config())
  assert (tiny.data.train_limit, tiny.num_epochs) == (48, 2)
  assert 0 < tiny.data.eval_limit <= 48  # 0 would evaluate the whole validation split
