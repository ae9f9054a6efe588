"""Tests for handwriting.dataset: the loading API the trainer imports, and the .npz export."""

import logging
import pathlib
import re
import tempfile
import types

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
  # A limit past the split's size is the whole split, not more lines.
  assert len(load_examples("synthetic", "train", num_train=3, limit=10)) == 3


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


def test_an_interrupted_export_leaves_neither_a_temporary_file_nor_a_changed_export(
  tmp_path, monkeypatch
):
  path = tmp_path / "synthetic.npz"
  examples = {"train": load_examples("synthetic", "train", limit=3)}
  dataset.write_export(path, examples, {})
  before = path.read_bytes()

  def interrupted(file, **arrays):
    pathlib.Path(file).write_bytes(b"PK half a zip")
    raise KeyboardInterrupt

  monkeypatch.setattr(np, "savez_compressed", interrupted)
  with pytest.raises(KeyboardInterrupt):
    dataset.write_export(path, examples, {})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.npz"]
  assert path.read_bytes() == before


def spoilt_export(path, change):
  """A 3-line synthetic export, its arrays then changed by `change(arrays)` and saved again."""
  dataset.write_export(path, {"train": load_examples("synthetic", "train", limit=3)}, {})
  with np.load(path) as export:
    arrays = dict(export)
  change(arrays)
  np.savez_compressed(path, **arrays)


def drop(key):
  return lambda arrays: arrays.pop(key)


def replace(key, value):
  return lambda arrays: arrays.__setitem__(key, value)


def transform(key, function):
  return lambda arrays: arrays.__setitem__(key, function(arrays[key]))


def shift(key, by):
  return transform(key, lambda values: values + np.array(by))


def read_train(path):
  return load_examples(str(path), "train")


@pytest.mark.parametrize(
  ("change", "read", "message"),
  [
    (drop("train/points"), read_train, r"the export has no field 'train/points'"),
    (drop("metadata"), dataset.read_export_metadata, r"the export has no field 'metadata'"),
    (replace("metadata", np.array("{")), dataset.read_export_metadata, r"'metadata' is not JSON"),
    (replace("metadata", np.array("[]")), dataset.read_export_metadata, r"not a JSON object"),
    (replace("train/offsets", np.array([0.0, 1.0])), read_train, r"offsets must be non-decr"),
    (replace("train/offsets", np.array([0, 5, 2, 9])), read_train, r"offsets must be non-decr"),
    # The last line's end short of the points, the first line's start after 0: lines cut short.
    (shift("train/offsets", [0, 0, 0, -1]), read_train, r"offsets must be non-decr"),
    (shift("train/offsets", [1, 0, 0, 0]), read_train, r"offsets must be non-decr"),
    # From 0 to the end, but a line starting after the next one ends: it would be read as empty.
    (transform("train/offsets", lambda o: o[[0, 2, 1, 3]]), read_train, r"offsets must be non-d"),
    (transform("train/offsets", lambda o: o.astype(float)), read_train, r"offsets must be non-d"),
    (transform("train/offsets", lambda o: o[:, None]), read_train, r"offsets must be non-decr"),
    (replace("train/offsets", np.zeros(0, np.int64)), read_train, r"offsets must be non-decr"),
    (transform("train/points", lambda p: p[:, :2]), read_train, r"points must be \[num_points, 3"),
    (replace("train/stroke_end", np.zeros(2, bool)), read_train, r"stroke_end has shape \(2,\)"),
    (replace("train/text", np.array(["a", "b"])), read_train, r"text has shape \(2,\), expected"),
  ],
)
def test_an_inconsistent_export_is_an_error_naming_file_and_field(tmp_path, change, read, message):
  path = tmp_path / "data.npz"
  spoilt_export(path, change)
  with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{message}"):
    read(path)


def test_a_npy_file_is_not_taken_for_an_export(tmp_path):
  path = tmp_path / "data.npz"
  with path.open("wb") as file:
    np.save(file, np.zeros(3))
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a \.npz export"):
    load_examples(str(path), "train")


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_export_is_an_error_naming_the_file(tmp_path, keep):
  path = tmp_path / "data.npz"
  dataset.write_export(path, {"train": load_examples("synthetic", "train", limit=3)}, {})
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep)])  # a half-finished copy; an empty file
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable \.npz export"):
    load_examples(str(path), "train")


def test_iam_ondb_without_build_or_manual_dir_says_what_to_do(tmp_path):
  # A new user training with train.py must learn the flag and the variable, not the Python API.
  with pytest.raises(FileNotFoundError, match=r"IAM_ONDB_DIR or --config\.data\.manual_dir"):
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
    ({"points": np.array([[0, 0, 0], [1, 1, 0.02], [2, 2, 0.04]])}, "float32"),  # float64
    ({"stroke_end": np.zeros(3, np.bool_)}, "ending in True"),
    ({"text": ""}, "empty text"),
    ({"points": np.array([[0, 0, 1.0]] * 3, np.float32)}, "start at 0"),
    ({"stroke_end": np.array([0, 0, 1])}, "stroke_end must be bool"),
    ({"stroke_end": np.array([False, True])}, "stroke_end must be bool"),  # 2 for 3 points
    (
      {"points": np.array([[0, 0, 0], [np.nan, 1, 0.02], [2, np.inf, 0.04]], np.float32)},
      r"2 of 3 points are not finite \(NaN or inf\), the first at point 1",
    ),
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


def write_bad_export(path, spoil):
  """A synthetic export whose line 2 of train and line 1 of validation are spoilt by `spoil`."""
  train = load_examples("synthetic", "train", limit=4)
  validation = load_examples("synthetic", "validation", limit=3)
  train[2] = train[2] | spoil(train[2])
  validation[1] = validation[1] | spoil(validation[1])
  dataset.write_export(path, {"train": train, "validation": validation}, {})
  return train[2]["id"], validation[1]["id"]


def nan_points(example):
  points = example["points"].copy()
  points[5, 1] = np.nan
  return {"points": points}


def inf_points(example):
  points = example["points"].copy()
  points[-1, 0] = np.inf
  return {"points": points}


def no_points(example):
  return {"points": np.zeros((0, 3), np.float32), "stroke_end": np.zeros(0, np.bool_)}


def no_text(example):
  return {"text": ""}


@pytest.mark.parametrize(
  ("spoil", "reason"),
  [
    (nan_points, r"1 of \d+ points are not finite \(NaN or inf\), the first at point 5"),
    (inf_points, r"1 of \d+ points are not finite"),
    (no_points, r"no points \(empty ink\)"),
    (no_text, "empty text"),
  ],
)
def test_a_bad_line_in_an_export_is_named_or_skipped_and_reported(tmp_path, spoil, reason):
  path = tmp_path / "bad.npz"
  train_id, validation_id = write_bad_export(path, spoil)
  source = str(dataset.data_source(str(path)))
  for split, bad_id, size in (("train", train_id, 4), ("validation", validation_id, 3)):
    examples = load_examples(str(path), split)
    with pytest.raises(dataset.BadExampleError) as error:
      dataset.validate_examples(examples, split, Alphabet(), source=source)
    message = str(error.value)
    assert message.startswith(f"split '{split}', line {bad_id}: ")
    assert message.endswith(f"; data: the numpy export {path}; its origin is not recorded")
    assert re.search(reason, message) and "\n" not in message

    kept, skipped = dataset.validate_examples(examples, split, Alphabet(), policy="skip")
    assert [e["id"] for e in kept] == [e["id"] for e in examples if e["id"] != bad_id]
    assert len(kept) == size - 1
    assert len(skipped) == 1 and skipped[0]["id"] == bad_id and skipped[0]["split"] == split
    assert re.search(reason, skipped[0]["reason"])


def test_validation_counts_every_bad_line_and_keeps_good_splits_whole():
  examples = load_examples("synthetic", "validation", limit=5)
  spoilt = [examples[0], examples[1] | {"text": ""}, examples[2], examples[3] | {"text": "€"}]
  with pytest.raises(dataset.BadExampleError, match=r"empty text \(2 bad lines in all\)"):
    dataset.validate_examples(spoilt, "validation", Alphabet())
  kept, skipped = dataset.validate_examples(spoilt, "validation", Alphabet(), policy="skip")
  assert [e["id"] for e in kept] == [examples[0]["id"], examples[2]["id"]]
  assert [item["id"] for item in skipped] == [examples[1]["id"], examples[3]["id"]]
  assert skipped[1]["reason"].startswith("character '€'")
  kept, skipped = dataset.validate_examples(examples, "validation", Alphabet())
  assert len(kept) == len(examples) and skipped == []
  with pytest.raises(ValueError, match="unknown bad-example policy 'drop'"):
    dataset.validate_examples(examples, "validation", Alphabet(), policy="drop")


def test_an_empty_data_dir_variable_is_unset_not_the_current_folder(monkeypatch):
  monkeypatch.setenv("HANDWRITING_DATA_DIR", "")
  assert dataset.default_data_dir() == pathlib.Path("~/tensorflow_datasets").expanduser()


def test_data_source_says_where_the_data_comes_from(tmp_path, monkeypatch):
  monkeypatch.delenv("HANDWRITING_DATA_DIR", raising=False)
  source = dataset.data_source("synthetic", seed=3, num_train=10, num_eval=5)
  assert source.kind == "generator" and "'seed': 3" in str(source)
  with pytest.raises(
    ValueError, match=r"num_train and num_eval must be >= 1, got .*'num_train': -5"
  ):
    load_examples("synthetic", "train", num_train=-5)
  with pytest.raises(ValueError, match=r"num_train and num_eval must be >= 1, got .*'num_eval': 0"):
    load_examples("synthetic", "validation", num_eval=0)

  export = dataset.export_path("iam_ondb", tmp_path)
  dataset.write_export(export, {"train": load_examples("synthetic", "train", limit=2)}, {})
  source = dataset.data_source("iam_ondb", data_dir=tmp_path)
  assert (source.kind, source.path, source.default_location) == ("export", export, False)
  assert str(source) == f"the numpy export {export}; its origin is not recorded"

  # Nothing configured: an export found in ~/tensorflow_datasets may be a forgotten one.
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  default_export = dataset.export_path("iam_ondb")
  dataset.write_export(default_export, {"train": []}, {"manual_dir": "/old", "built_at": "2020"})
  source = dataset.data_source("iam_ondb", manual_dir="/somewhere/else")
  assert source.kind == "export" and source.default_location
  assert "(the default data dir: no data dir configured)" in str(
    source
  ) and "built from /old at 2020" in str(source)

  empty = tmp_path / "empty"
  source = dataset.data_source("iam_ondb", data_dir=empty, manual_dir=tmp_path / "download")
  assert (source.kind, source.path) == ("build", tmp_path / "download")

  # `--config.data.data_dir=~/x`: the shell expands no `~` after `=`, so the code does.
  source = dataset.data_source("iam_ondb", data_dir="~/tensorflow_datasets")
  assert (source.kind, source.path) == ("export", default_export)
  assert dataset.data_source(f"~/tensorflow_datasets/{default_export.name}").path == default_export
  source = dataset.data_source("iam_ondb", data_dir=empty, manual_dir="~/download")
  assert source.path == tmp_path / "home" / "download"
  assert dataset.export_path("iam_ondb", "") == default_export  # "" is unset, not the cwd


def test_looking_for_a_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  empty = tmp_path / "empty"
  source = dataset.data_source("iam_ondb", data_dir=empty, manual_dir=tmp_path / "download")
  assert source.kind == "build"
  assert list(temp.iterdir()) == [] and not empty.exists()


def test_looking_for_a_build_logs_no_warning_above_the_callers_own_words(tmp_path, caplog):
  # TFDS warns "Variant folder ... has no dataset_info.json"; the CLI's one-line error says more.
  with caplog.at_level(logging.INFO):
    source = dataset.data_source("iam_ondb", data_dir=tmp_path, manual_dir=tmp_path / "download")
  assert source.kind == "build"
  assert "has no dataset_info.json" not in caplog.text


def test_ctc_needs_a_frame_per_character_and_a_blank_between_equal_neighbours():
  labels = ([], [3], [3, 3], [1, 2, 2, 2])
  assert [dataset.ctc_frames_needed(np.array(label)) for label in labels] == [0, 1, 3, 6]


def test_a_line_ctc_cannot_align_is_named_or_skipped_and_reported():
  labels = [np.array(label, np.int32) for label in ([5, 5], [5, 6], [7], [7, 7, 7])]
  lengths = np.array([2, 2, 1, 5], np.int32)  # "ll" in 2 frames needs 3
  sequences = dataset.SequenceSet(
    ids=["a", "b", "c", "d"],
    texts=["ll", "lm", "n", "nnn"],
    features=[np.zeros((n, 3), np.float32) for n in lengths],
    labels=labels,
    lengths=lengths,
    label_lengths=np.array([len(label) for label in labels], np.int32),
  )
  with pytest.raises(dataset.BadExampleError) as error:
    dataset.validate_alignable(sequences, "train", source="here")
  message = str(error.value)
  assert message.startswith("split 'train', line a: 2 feature frames, but CTC needs at least 3 ")
  assert "resample_spacing" in message and message.endswith("; data: here")

  kept, skipped = dataset.validate_alignable(sequences, "train", policy="skip")
  assert kept.ids == ["b", "c", "d"] and kept.lengths.tolist() == [2, 1, 5]
  assert [label.tolist() for label in kept.labels] == [[5, 6], [7], [7, 7, 7]]
  assert kept.texts == ["lm", "n", "nnn"] and kept.label_lengths.tolist() == [2, 1, 3]
  assert [(item["id"], item["split"]) for item in skipped] == [("a", "train")]
  kept, skipped = dataset.validate_alignable(kept, "train")
  assert len(kept) == 3 and skipped == []
  with pytest.raises(ValueError, match="unknown bad-example policy 'drop'"):
    dataset.validate_alignable(sequences, "train", policy="drop")


def test_a_data_dir_from_the_environment_is_configured_not_the_default(tmp_path, monkeypatch):
  monkeypatch.setenv("HANDWRITING_DATA_DIR", str(tmp_path))
  export = tmp_path / "iam_ondb.npz"
  dataset.write_export(export, {"train": []}, {})
  source = dataset.data_source("iam_ondb")
  assert (source.kind, source.path, source.default_location) == ("export", export, False)
  assert "no data dir configured" not in str(source)


@pytest.mark.parametrize("empty", ["environment", "argument"])
def test_an_empty_data_dir_setting_is_the_default_location(tmp_path, monkeypatch, empty):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv("HANDWRITING_DATA_DIR", raising=False)
  dataset.write_export(dataset.export_path("iam_ondb"), {"train": []}, {})
  if empty == "environment":
    monkeypatch.setenv("HANDWRITING_DATA_DIR", "")
  source = dataset.data_source("iam_ondb", data_dir="" if empty == "argument" else None)
  assert source.path == tmp_path / "tensorflow_datasets" / "iam_ondb.npz"
  assert source.default_location


def test_a_limit_at_or_past_the_size_of_an_exports_split_reads_all_of_it(tmp_path):
  examples = load_examples("synthetic", "train", limit=3)
  ids = [example["id"] for example in examples]
  path = tmp_path / "small.npz"
  dataset.write_export(path, {"train": examples}, {})
  for limit, expected in ((0, []), (1, ids[:1]), (3, ids), (10, ids), (None, ids)):
    assert [e["id"] for e in load_examples(str(path), "train", limit=limit)] == expected, limit


def test_the_synthetic_seed_chooses_the_lines():
  first, again, other = (
    load_examples("synthetic", "train", limit=2, seed=seed) for seed in (5, 5, 6)
  )
  assert [e["text"] for e in first] == [e["text"] for e in again]
  np.testing.assert_array_equal(first[1]["points"], again[1]["points"])
  assert any(
    a["text"] != b["text"] or not np.array_equal(a["points"], b["points"])
    for a, b in zip(first, other, strict=True)
  )


class FakeTfdsBuild:
  """A built TFDS `iam_ondb` as `load_examples` sees it: three lines a split, named by split."""

  data_dir = "/fake/iam_ondb/1.0.0"
  info = types.SimpleNamespace(metadata={"manual_dir": "/download", "built_at": "2024"})

  def is_prepared(self):
    return True

  def as_data_source(self, split):
    return [
      {
        "id": f"{split}-{i:02d}".encode(),
        "form_id": split.encode(),
        "writer_id": b"w",
        "text": b"ab",
        "points": np.zeros((2, 3), np.float32),
        "stroke_end": np.array([False, True]),
      }
      for i in range(3)
    ]


@pytest.mark.parametrize(("limit", "count"), [(None, 3), (2, 2), (3, 3), (5, 3)])
def test_a_limit_takes_the_first_lines_of_the_tfds_split_asked(tmp_path, monkeypatch, limit, count):
  monkeypatch.setattr(dataset, "iam_ondb_builder", lambda data_dir=None: FakeTfdsBuild())
  for split in dataset.SPLITS:
    examples = load_examples("iam_ondb", split, data_dir=tmp_path, limit=limit)
    assert [e["id"] for e in examples] == [f"{split}-{i:02d}" for i in range(count)]
    assert examples[0]["text"] == "ab" and examples[0]["form_id"] == split


def test_one_bad_line_is_named_without_a_count_of_bad_lines():
  examples = load_examples("synthetic", "validation", limit=3)
  spoilt = [examples[0], examples[1] | {"text": ""}, examples[2]]
  with pytest.raises(dataset.BadExampleError) as error:
    dataset.validate_examples(spoilt, "validation", Alphabet(), source="here")
  assert str(error.value) == f"split 'validation', line {examples[1]['id']}: empty text; data: here"


def test_a_missing_export_file_stays_file_not_found(tmp_path):
  # Callers tell "not there yet" from "there but broken"; only the second is a ValueError.
  with pytest.raises(FileNotFoundError):
    dataset.read_export(tmp_path / "none.npz", "train")


def test_a_data_source_says_how_its_export_was_made(tmp_path):
  for metadata, origin in (
    ({"generator": {"seed": 1}}, "generated with {'seed': 1}"),
    ({"manual_dir": "/download"}, "built from /download at an unknown time"),
  ):
    path = tmp_path / "data.npz"
    dataset.write_export(path, {"train": []}, metadata)
    assert str(dataset.data_source(str(path))) == f"the numpy export {path}; {origin}"


def test_check_example_names_missing_fields_and_fields_that_are_not_text():
  example = load_examples("synthetic", "train", limit=1)[0]
  without_text = {field: value for field, value in example.items() if field != "text"}
  with pytest.raises(ValueError, match=r"missing fields \['text'\]"):
    dataset.check_example(without_text, Alphabet())
  with pytest.raises(ValueError, match="writer_id and text must be str"):
    dataset.check_example(example | {"writer_id": None}, Alphabet())


class DamagedTfdsBuild(FakeTfdsBuild):
  """A build whose record files ArrayRecord cannot read."""

  def as_data_source(self, split):
    raise RuntimeError("corrupted record")


def test_a_tfds_split_that_cannot_be_read_is_an_error_naming_the_build(tmp_path, monkeypatch):
  monkeypatch.setattr(dataset, "iam_ondb_builder", lambda data_dir=None: DamagedTfdsBuild())
  with pytest.raises(ValueError, match=r"^/fake/iam_ondb/1\.0\.0: the train split .*corrupted"):
    load_examples("iam_ondb", "train", data_dir=tmp_path)


def test_an_unknown_split_of_a_tfds_build_is_rejected_not_read(tmp_path, monkeypatch):
  monkeypatch.setattr(dataset, "iam_ondb_builder", lambda data_dir=None: FakeTfdsBuild())
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    load_examples("iam_ondb", "dev", data_dir=tmp_path)


def test_the_lines_left_out_are_those_of_the_build_read(tmp_path, monkeypatch):
  left_out = {"id": "z01-000z-01", "split": "test", "reason": "no transcription"}
  build = FakeTfdsBuild()
  build.info = types.SimpleNamespace(metadata={"skipped": [left_out]})
  monkeypatch.setattr(dataset, "iam_ondb_builder", lambda data_dir=None: build)
  assert dataset.skipped_examples("iam_ondb", tmp_path) == [left_out]  # no export: the build's
  # The synthetic set is generated in memory: an export lying in the data dir is not what is read.
  dataset.write_export(dataset.export_path("synthetic", tmp_path), {}, {"skipped": [left_out]})
  assert dataset.skipped_examples("synthetic", tmp_path) == []
