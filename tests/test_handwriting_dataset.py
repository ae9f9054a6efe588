"""Tests for handwriting.dataset: the loading API the trainer imports, and the .npz export."""

import numpy as np
import pytest

from handwriting import dataset
from handwriting.alphabet import Alphabet
from handwriting.dataset import SequenceSet, featurize, load_examples
from handwriting.features import FeatureConfig
from handwriting.iam_ondb import IamOnDbError


def test_a_limit_generates_a_prefix_of_the_synthetic_split():
  examples = load_examples("synthetic", "train", limit=40)
  assert len(examples) == 40
  assert [e["id"] for e in load_examples("synthetic", "test", num_eval=7)] == [
    f"syn-test-0000-{i:02d}" for i in range(1, 8)
  ]
  # A limit takes a prefix of the same split, so small runs see the same first lines.
  prefix = load_examples("synthetic", "train", limit=5)
  np.testing.assert_array_equal(prefix[4]["points"], examples[4]["points"])


def test_featurize_gives_model_inputs():
  examples = load_examples("synthetic", "validation", limit=6)
  config = FeatureConfig(resample_spacing=0.1, time_deltas=True)
  sequences = featurize(examples, config, Alphabet())
  assert isinstance(sequences, SequenceSet) and len(sequences) == 6
  assert sequences.ids == [e["id"] for e in examples]
  assert sequences.texts == [e["text"] for e in examples]
  assert sequences.lengths.dtype == np.int32 and sequences.label_lengths.dtype == np.int32
  for features, labels, length, label_length, text in zip(
    sequences.features,
    sequences.labels,
    sequences.lengths,
    sequences.label_lengths,
    sequences.texts,
    strict=True,
  ):
    assert features.shape == (length, config.num_features) and features.dtype == np.float32
    assert labels.dtype == np.int32 and len(labels) == label_length == len(text)
    assert Alphabet().decode(labels) == text


def test_featurize_names_the_example_with_an_unknown_character():
  example = load_examples("synthetic", "train", limit=1)[0] | {"id": "x-01", "text": "50 %"}
  with pytest.raises(ValueError, match=r"'%'.*'x-01'"):
    featurize([example], FeatureConfig(), Alphabet())


def test_export_round_trip(tmp_path):
  examples = {
    "train": load_examples("synthetic", "train", limit=5),
    "test": load_examples("synthetic", "test", limit=3),
  }
  path = tmp_path / "synthetic.npz"
  dataset.write_export(path, examples, {"skipped": [{"id": "a", "split": "test", "reason": "b"}]})
  loaded = load_examples(str(path), "train")
  assert len(loaded) == 5 and len(load_examples(str(path), "test", limit=2)) == 2
  for a, b in zip(examples["train"], loaded, strict=True):
    assert {k: a[k] for k in ("id", "form_id", "writer_id", "text")} == {
      k: b[k] for k in ("id", "form_id", "writer_id", "text")
    }
    np.testing.assert_array_equal(a["points"], b["points"])
    np.testing.assert_array_equal(a["stroke_end"], b["stroke_end"])
    dataset.check_example(b, Alphabet())
  assert dataset.skipped_examples(str(path)) == [{"id": "a", "split": "test", "reason": "b"}]
  with pytest.raises(ValueError, match="no split 'validation'"):
    load_examples(str(path), "validation")


def test_iam_ondb_without_build_or_manual_dir_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="pass manual_dir"):
    load_examples("iam_ondb", "train", data_dir=tmp_path)
  with pytest.raises(IamOnDbError, match="manual dir is missing or empty"):
    load_examples("iam_ondb", "train", data_dir=tmp_path, manual_dir=tmp_path / "nowhere")


def test_unknown_dataset_and_split_are_rejected():
  with pytest.raises(ValueError, match="unknown dataset"):
    load_examples("mnist", "train")
  with pytest.raises(ValueError, match="unknown split"):
    load_examples("synthetic", "dev")


@pytest.mark.parametrize(
  ("change", "message"),
  [
    ({"points": np.zeros((3, 2), np.float32)}, "float32"),
    ({"stroke_end": np.zeros(3, np.bool_)}, "ending in True"),
    ({"text": ""}, "empty text"),
    ({"points": np.array([[0, 0, 1.0]] * 3, np.float32)}, "start at 0"),
  ],
)
def test_check_example_rejects_broken_examples(change, message):
  example = {
    "id": "t-01", "form_id": "t", "writer_id": "", "text": "ab",
    "points": np.array([[0, 0, 0], [1, 1, 0.02], [2, 2, 0.04]], np.float32),
    "stroke_end": np.array([False, False, True]),
  }  # fmt: skip
  dataset.check_example(example, Alphabet())
  with pytest.raises(ValueError, match=message):
    dataset.check_example(example | change, Alphabet())
