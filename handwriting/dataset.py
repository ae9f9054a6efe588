"""Loading examples (real or synthetic) and turning them into model inputs.

An example is a plain dict, the same for IAM-OnDB and the synthetic set:
  id: str ("a01-000u-01"), form_id: str, writer_id: str ("" when unknown), text: str,
  points: float32 [num_points, 3] (x, y, seconds since the line's first point; y downwards),
  stroke_end: bool [num_points] (True on the last point of each pen-down stroke).

Three ways to the same examples: the TFDS `iam_ondb` dataset (built on first use from a manual
dir), an exported `.npz` file that needs only numpy (for machines without TFDS or network: `python
-m handwriting build` writes `<data_dir>/iam_ondb.npz` next to the TFDS files, and `load_examples`
prefers it), and the synthetic generator, which is cheap enough to run in memory every time.
"""

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
import zipfile
import zlib

import numpy as np

import cli_errors
from handwriting import iam_ondb, synthetic
from handwriting.alphabet import Alphabet
from handwriting.features import FeatureConfig, ink_to_features

DATASETS = ("iam_ondb", "synthetic")
SPLITS = ("train", "validation", "validation2", "test")
_TEXT_FIELDS = ("id", "form_id", "writer_id", "text")


def default_data_dir() -> pathlib.Path:
  """`$HANDWRITING_DATA_DIR`, else TFDS's default `~/tensorflow_datasets`."""
  # Set but empty is unset, as in `user_path`: not the current folder.
  return pathlib.Path(
    os.environ.get("HANDWRITING_DATA_DIR") or "~/tensorflow_datasets"
  ).expanduser()


def user_path(path: str | os.PathLike | None) -> pathlib.Path | None:
  """`path` with a leading `~` expanded: the shell leaves `--flag=~/x` alone."""
  return pathlib.Path(path).expanduser() if path else None  # "" is unset, not the cwd


def export_path(dataset: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the numpy-only export of `dataset` lives: `<data_dir>/<dataset>.npz`."""
  return (user_path(data_dir) or default_data_dir()) / f"{dataset}.npz"


def write_export(path: str | os.PathLike, examples: dict[str, list[dict]], metadata: dict):
  """Save split name -> examples (and JSON-able `metadata`) as one compressed `.npz` file.

  Per split the points of all lines are concatenated ([total_points, 3]) with `offsets`
  [num_lines + 1] marking where each line starts, so the file holds no Python objects and loads
  with `allow_pickle=False`.
  """
  arrays = {"metadata": np.array(json.dumps(metadata))}
  for split, split_examples in examples.items():
    lengths = [len(example["points"]) for example in split_examples]
    arrays[f"{split}/offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays[f"{split}/points"] = np.concatenate(
      [example["points"] for example in split_examples] or [np.zeros((0, 3), np.float32)]
    ).astype(np.float32)
    arrays[f"{split}/stroke_end"] = np.concatenate(
      [example["stroke_end"] for example in split_examples] or [np.zeros(0, np.bool_)]
    ).astype(np.bool_)
    for field in _TEXT_FIELDS:
      arrays[f"{split}/{field}"] = np.array([example[field] for example in split_examples], str)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_suffix(".tmp.npz")
  try:
    np.savez_compressed(temporary, **arrays)
  except BaseException:  # a full disk, Ctrl-C: no half-written file left beside the export
    temporary.unlink(missing_ok=True)
    raise
  temporary.replace(path)


# What numpy raises for a file that is not a whole .npz: truncated, corrupted, or another format.
_UNREADABLE = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def _open_export(path: str | os.PathLike):
  """`np.load(path)`, with a file that is not a readable export reported as a ValueError naming
  it (a missing file stays a FileNotFoundError)."""
  try:
    export = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except _UNREADABLE as error:
    raise ValueError(f"{path}: not a readable .npz export ({_reason(error)})") from error
  if not isinstance(export, np.lib.npyio.NpzFile):  # a .npy file: one array, no fields
    raise ValueError(f"{path}: not a .npz export but a single {type(export).__name__}")
  with export:
    yield export


def _read_field(export, path: str | os.PathLike, key: str) -> np.ndarray:
  if key not in export.files:
    raise ValueError(f"{path}: the export has no field {key!r}; rebuild it")
  try:
    return export[key]
  except _UNREADABLE as error:
    raise ValueError(f"{path}: field {key!r} is unreadable ({_reason(error)})") from error


def _reason(error: BaseException) -> str:
  return cli_errors.one_line(error) or type(error).__name__


def read_export(path: str | os.PathLike, split: str, limit: int | None = None) -> list[dict]:
  """The first `limit` (default all) examples of `split` from a `write_export` file.

  A file that is not one (truncated, a field missing or inconsistent with the others) is a
  ValueError naming the file and the field."""
  with _open_export(path) as export:
    if f"{split}/offsets" not in export.files:
      splits = sorted({key.split("/")[0] for key in export.files if "/" in key})
      raise ValueError(f"{path}: no split {split!r}; it has {splits}")
    offsets = _read_field(export, path, f"{split}/offsets")
    points = _read_field(export, path, f"{split}/points")
    stroke_end = _read_field(export, path, f"{split}/stroke_end")
    texts = {field: _read_field(export, path, f"{split}/{field}") for field in _TEXT_FIELDS}
  _check_split(path, split, offsets, points, stroke_end, texts)
  count = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
  return [
    {
      **{field: str(values[i]) for field, values in texts.items()},
      "points": points[offsets[i] : offsets[i + 1]],
      "stroke_end": stroke_end[offsets[i] : offsets[i + 1]],
    }
    for i in range(count)
  ]


def _check_split(path, split, offsets, points, stroke_end, texts) -> None:
  """The arrays of one split agree with each other, as `write_export` writes them."""
  where = f"{path}: {split}/"
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"{where}points must be [num_points, 3], got shape {points.shape}")
  if stroke_end.shape != points.shape[:1]:
    raise ValueError(
      f"{where}stroke_end has shape {stroke_end.shape}, expected ({len(points)},) like the points"
    )
  if (
    offsets.ndim != 1
    or offsets.dtype.kind not in "iu"
    or len(offsets) == 0
    or offsets[0] != 0
    or offsets[-1] != len(points)
    or np.any(np.diff(offsets) < 0)
  ):
    raise ValueError(
      f"{where}offsets must be non-decreasing integers from 0 to the {len(points)} points, "
      f"got {offsets.dtype} of shape {offsets.shape}"
    )
  for field, values in texts.items():
    if values.shape != (len(offsets) - 1,):
      raise ValueError(
        f"{where}{field} has shape {values.shape}, expected ({len(offsets) - 1},) for the "
        "lines the offsets mark"
      )


def read_export_metadata(path: str | os.PathLike) -> dict:
  """The metadata dict stored by `write_export` (e.g. `skipped`, generator settings)."""
  with _open_export(path) as export:
    text = str(_read_field(export, path, "metadata"))
  try:
    metadata = json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: field 'metadata' is not JSON ({error})") from error
  if not isinstance(metadata, dict):
    raise ValueError(f"{path}: field 'metadata' is not a JSON object")
  return metadata


def iam_ondb_builder(data_dir: str | os.PathLike | None = None):
  """The TFDS builder of `iam_ondb` at `data_dir` (imports TFDS, so only when needed). A build
  there whose `dataset_info.json` is damaged is an error naming its folder."""
  from google.protobuf import json_format  # TFDS's dataset_info.json parser

  from handwriting.builder import IamOndb  # Imported here so that .npz users need no TFDS.

  root = user_path(data_dir) or default_data_dir()
  try:
    return IamOndb(data_dir=os.fspath(root))
  except (ValueError, json_format.Error) as error:  # JSONDecodeError is a ValueError
    folder = root / IamOndb.name / str(IamOndb.VERSION)
    raise ValueError(
      f"{folder}: this TFDS build's dataset_info.json cannot be read ({error}); delete the folder "
      "and build it again"
    ) from None


def build_metadata(builder) -> dict:
  """What the build recorded (`manual_dir`, `built_at`, the lines it skipped); a damaged
  `metadata.json`, which TFDS reads only now, is an error naming its folder."""
  try:
    return dict(builder.info.metadata)
  except ValueError as error:  # JSONDecodeError
    raise ValueError(
      f"{builder.data_dir}: this TFDS build's metadata.json cannot be read ({error}); delete the "
      "folder and build it again"
    ) from None


def _is_prepared(builder) -> bool:
  """`builder.is_prepared()` without the warning TFDS logs while looking for a build that is not
  there ("Variant folder ... has no dataset_info.json"): not built yet is a state the caller
  reports in its own words, and the warning would stand above that one-line error."""

  def not_that_warning(record: logging.LogRecord) -> bool:
    return "has no dataset_info.json" not in record.getMessage()

  logger = logging.getLogger("absl")
  logger.addFilter(not_that_warning)
  try:
    return builder.is_prepared()
  finally:
    logger.removeFilter(not_that_warning)


def build_iam_ondb(
  manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, export: bool = True
):
  """Build the TFDS dataset from the download in `manual_dir` and (by default) its .npz export."""
  import tensorflow_datasets as tfds

  manual_dir = user_path(manual_dir)
  iam_ondb.check_manual_dir(manual_dir)  # Our message names what is missing; TFDS's does not.
  builder = iam_ondb_builder(data_dir)
  built_from = build_metadata(builder).get("manual_dir") if _is_prepared(builder) else None
  if built_from is not None and os.path.realpath(built_from) != os.path.realpath(manual_dir):
    # TFDS would keep the build there: a download fixed or moved would not be read again.
    raise ValueError(
      f"{builder.data_dir} already holds iam_ondb built from {built_from}, not from "
      f"{manual_dir}; delete {builder.data_dir} to build it from there"
    )
  # TFDS prints "Downloading and preparing dataset ..." on stdout; stdout is for results (`--json`).
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
  if export:
    examples = {split: _read_tfds(builder, split) for split in SPLITS}
    write_export(export_path("iam_ondb", data_dir), examples, build_metadata(builder))
  return builder


def _read_tfds(builder, split: str, limit: int | None = None) -> list[dict]:
  """The examples of a TFDS build's `split`; a build whose files cannot be read (ArrayRecord's
  RuntimeError for a damaged file, or records of missing fields from a cut one) is an error
  naming its folder."""
  fields = (*_TEXT_FIELDS, "points", "stroke_end")
  try:
    source = builder.as_data_source(split=split)
    count = len(source) if limit is None else min(limit, len(source))
    records = [source[i] for i in range(count)]
    for index, record in enumerate(records):
      if record is None or any(record.get(field) is None for field in fields):
        raise ValueError(f"record {index} of {count} has lost its fields")
  except (RuntimeError, OSError, ValueError) as error:
    raise ValueError(
      f"{builder.data_dir}: the {split} split of this TFDS build cannot be read ({error}); "
      "delete the folder and build it again"
    ) from None
  return [
    {
      **{field: record[field].decode("utf-8") for field in _TEXT_FIELDS},
      "points": record["points"],
      "stroke_end": record["stroke_end"],
    }
    for record in records
  ]


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where `load_examples` reads a dataset from, so a run can say so before it trains on it.

  kind: "export" (a `.npz` file), "tfds" (a built TFDS folder), "build" (built now from a manual
    dir, then read from TFDS) or "generator" (the synthetic set, in memory).
  path: the `.npz` file, the TFDS folder, or the manual dir of a build; None for the generator.
  detail: what is known of its origin ("built from /data/iam-ondb at ...", generator settings).
  default_location: found in `~/tensorflow_datasets` with no data dir configured anywhere: data a
    user may have forgotten (an old export), which a trainer can refuse or warn about.
  """

  kind: str
  path: pathlib.Path | None
  detail: str
  default_location: bool

  def __str__(self) -> str:
    where = {
      "export": f"the numpy export {self.path}",
      "tfds": f"the TFDS dataset in {self.path}",
      "build": f"a fresh build of IAM-OnDB from the manual dir {self.path}",
      "generator": "the synthetic generator, in memory",
    }[self.kind]
    default = " (the default data dir: no data dir configured)" if self.default_location else ""
    return f"{where}{default}" + (f"; {self.detail}" if self.detail else "")


def _origin(metadata: dict) -> str:
  """The build's own record of where it came from (exports older than the record lack it)."""
  if "generator" in metadata:
    return f"generated with {metadata['generator']}"
  if "manual_dir" in metadata:
    return f"built from {metadata['manual_dir']} at {metadata.get('built_at', 'an unknown time')}"
  return "its origin is not recorded"


def data_source(
  dataset: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  seed: int = 0,
  num_train: int = 5000,
  num_eval: int = 500,
) -> DataSource:
  """Where `load_examples(dataset, ..., same arguments)` would read from; nothing is built.

  Raises FileNotFoundError, naming every way to point at the download, when IAM-OnDB is neither
  exported nor built in `data_dir` and no manual dir is given.
  """
  if dataset.endswith(".npz"):
    path = user_path(dataset)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such export file")
    return DataSource("export", path, _origin(read_export_metadata(path)), False)
  if dataset == "synthetic":
    settings = {"seed": seed, "num_train": num_train, "num_eval": num_eval}
    if num_train < 1 or num_eval < 1:
      raise ValueError(f"the synthetic set's num_train and num_eval must be >= 1, got {settings}")
    return DataSource("generator", None, f"generated with {settings}", False)
  if dataset != "iam_ondb":
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS} or a .npz path")
  # Nothing configured, where "" counts as unset as in `export_path`: the default folder.
  default_location = not data_dir and not os.environ.get("HANDWRITING_DATA_DIR")
  export = export_path(dataset, data_dir)
  if export.is_file():
    return DataSource("export", export, _origin(read_export_metadata(export)), default_location)
  builder = iam_ondb_builder(data_dir)
  if _is_prepared(builder):
    path = pathlib.Path(builder.data_dir)
    return DataSource("tfds", path, _origin(build_metadata(builder)), default_location)
  if manual_dir is None:
    raise FileNotFoundError(
      f"IAM-OnDB is not built in {builder.data_dir} and there is no export {export}; point "
      "IAM_ONDB_DIR or --config.data.manual_dir (train.py with experiments/iam.py), --manual_dir "
      "(python -m handwriting) or manual_dir= (Python) at the folder with the IAM-OnDB download "
      "(README: Getting IAM-OnDB)"
    )
  return DataSource("build", user_path(manual_dir), f"into {builder.data_dir}", False)


def load_examples(
  dataset: str,
  split: str,
  *,
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  limit: int | None = None,
  seed: int = 0,
  num_train: int = 5000,
  num_eval: int = 500,
) -> list[dict]:
  """The first `limit` (default all) examples of `split` of `dataset`, in a fixed order.

  dataset: "iam_ondb" reads `<data_dir>/iam_ondb.npz` if present (numpy only), else the TFDS
    dataset in `data_dir`, building it from `manual_dir` first if needed; "synthetic" generates
    `num_train` lines for "train" and `num_eval` for the other splits from `seed` (only `limit`
    lines when given, so a few dozen take a fraction of a second); a path ending in `.npz` reads
    that export. `data_source` with the same arguments says which of these it is.
  split: "train", "validation", "validation2" or "test".
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  source = data_source(
    dataset,
    data_dir=data_dir,
    manual_dir=manual_dir,
    seed=seed,
    num_train=num_train,
    num_eval=num_eval,
  )
  if source.kind == "export":
    return read_export(source.path, split, limit)
  if source.kind == "generator":
    size = num_train if split == "train" else num_eval
    return synthetic.generate_examples(split, size if limit is None else min(limit, size), seed)
  if source.kind == "build":
    return _read_tfds(build_iam_ondb(manual_dir, data_dir), split, limit)
  return _read_tfds(iam_ondb_builder(data_dir), split, limit)


BAD_EXAMPLE_POLICIES = ("error", "skip")


def example_problem(example: dict, alphabet: Alphabet) -> str | None:
  """What makes `example` unfit for training (None when it is fine), in words a user can act on.

  The checks a trainer relies on: field types and shapes, some ink, finite points, time from 0, a
  stroke end on the last point, and a non-empty text inside the alphabet. Time may step backwards:
  the digitiser clock does so in 47 real lines (by up to 6,408 s), see `FeatureConfig.time_deltas`.
  """
  missing = {"id", "form_id", "writer_id", "text", "points", "stroke_end"} - set(example)
  if missing:
    return f"missing fields {sorted(missing)}"
  if not all(isinstance(example[field], str) for field in _TEXT_FIELDS):
    return "id, form_id, writer_id and text must be str"
  points, stroke_end = example["points"], example["stroke_end"]
  if points.dtype != np.float32 or points.ndim != 2 or points.shape[1] != 3:
    return f"points must be float32 [N, 3], got {points.dtype} {points.shape}"
  if not len(points):
    return "no points (empty ink)"
  if stroke_end.dtype != np.bool_ or stroke_end.shape != (len(points),) or not stroke_end[-1]:
    return "stroke_end must be bool [N] ending in True"
  finite = np.isfinite(points).all(axis=1)
  if not finite.all():
    first = int(np.flatnonzero(~finite)[0])
    return (
      f"{int((~finite).sum())} of {len(points)} points are not finite (NaN or inf), the first "
      f"at point {first}: {points[first].tolist()}"
    )
  if points[0, 2] != 0:
    return f"time must start at 0, got {points[0, 2]}"
  if not example["text"]:
    return "empty text"
  try:
    alphabet.encode(example["text"])
  except ValueError as error:
    return str(error)
  return None


def check_example(example: dict, alphabet: Alphabet) -> None:
  """Raise ValueError naming the example unless `example_problem` finds nothing wrong."""
  problem = example_problem(example, alphabet)
  if problem:
    raise ValueError(f"example {example.get('id', '<no id>')}: {problem}")


class BadExampleError(ValueError):
  """A split holds an example that cannot be trained or scored on; the message names it."""


def validate_examples(
  examples: list[dict], split: str, alphabet: Alphabet, policy: str = "error", source: str = ""
) -> tuple[list[dict], list[dict]]:
  """Check every example of `split` once, before anything trains on it.

  A bad line (NaN or inf points, no ink, empty text, a character outside the alphabet, ...) would
  otherwise surface later as a NaN loss with no line id, or lose a run silently (a NaN validation
  loss never improves). policy "error" raises BadExampleError naming `source` (where the data came
  from, see `data_source`), the split, the line id and what is wrong, and how many lines are bad;
  "skip" drops bad lines and reports them.

  Returns (the good examples in their order, skipped [{"id", "split", "reason"}]), the format of
  the build's `skipped_examples`.
  """
  _check_policy(policy)
  kept, skipped = [], []
  for example in examples:
    problem = example_problem(example, alphabet)
    if problem is None:
      kept.append(example)
    else:
      skipped.append({"id": example.get("id", "<no id>"), "split": split, "reason": problem})
  _raise_under_error_policy(skipped, split, policy, source)
  return kept, skipped


def _check_policy(policy: str) -> None:
  if policy not in BAD_EXAMPLE_POLICIES:
    raise ValueError(
      f"unknown bad-example policy {policy!r}; expected one of {BAD_EXAMPLE_POLICIES}"
    )


def _raise_under_error_policy(skipped: list[dict], split: str, policy: str, source: str) -> None:
  """Under policy "error", the first bad line of `split` as a BadExampleError, with the count."""
  if skipped and policy == "error":
    first = skipped[0]
    more = f" ({len(skipped)} bad lines in all)" if len(skipped) > 1 else ""
    origin = f"; data: {source}" if source else ""
    raise BadExampleError(f"split {split!r}, line {first['id']}: {first['reason']}{more}{origin}")


@dataclasses.dataclass
class SequenceSet:
  """Examples as model inputs: variable-length features and labels, with their lengths.

  features[i]: float32 [lengths[i], num_features]; labels[i]: int32 [label_lengths[i]], class ids
  of the alphabet (1..N, 0 is the CTC blank). lengths is what bucketing sorts by.
  """

  ids: list[str]
  texts: list[str]
  features: list[np.ndarray]
  labels: list[np.ndarray]
  lengths: np.ndarray  # int32 [num_examples]
  label_lengths: np.ndarray  # int32 [num_examples]

  def __len__(self) -> int:
    return len(self.ids)

  def select(self, indices) -> "SequenceSet":
    """The examples at `indices`, in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    return SequenceSet(
      ids=[self.ids[i] for i in indices],
      texts=[self.texts[i] for i in indices],
      features=[self.features[i] for i in indices],
      labels=[self.labels[i] for i in indices],
      lengths=self.lengths[indices],
      label_lengths=self.label_lengths[indices],
    )


def featurize(
  examples: list[dict], feature_config: FeatureConfig, alphabet: Alphabet
) -> SequenceSet:
  """Examples -> a SequenceSet; an unknown character raises ValueError naming the example."""
  features = [ink_to_features(e["points"], e["stroke_end"], feature_config) for e in examples]
  labels = [alphabet.encode(example["text"], example["id"]) for example in examples]
  return SequenceSet(
    ids=[example["id"] for example in examples],
    texts=[example["text"] for example in examples],
    features=features,
    labels=labels,
    lengths=np.array([len(f) for f in features], dtype=np.int32),
    label_lengths=np.array([len(label) for label in labels], dtype=np.int32),
  )


def ctc_frames_needed(label: np.ndarray) -> int:
  """The fewest frames a CTC alignment of `label` takes: one per label, and one blank between
  every two equal neighbours ("ll" needs 3)."""
  return len(label) + int(np.count_nonzero(label[1:] == label[:-1]))


def validate_alignable(
  sequences: SequenceSet, split: str, policy: str = "error", source: str = ""
) -> tuple[SequenceSet, list[dict]]:
  """Check that CTC can align every line of `split`: its feature frames are at least
  `ctc_frames_needed` of its label.

  A line with fewer frames has no alignment at all: CTC's loss for it is about 1e5 instead of a
  few tens, which swamps its batch's mean and gradient, and nothing else would say so. Coarse
  resampling (`FeatureConfig.resample_spacing`) is what makes lines that short. policy "error"
  raises BadExampleError naming the split, the line and the fix; "skip" drops such lines and
  reports them as `validate_examples` does (same format, same policies).
  """
  _check_policy(policy)
  needed = np.array([ctc_frames_needed(label) for label in sequences.labels], dtype=np.int64)
  short = np.flatnonzero(sequences.lengths < needed)
  skipped = [
    {
      "id": sequences.ids[i],
      "split": split,
      "reason": (
        f"{sequences.lengths[i]} feature frames, but CTC needs at least {needed[i]} to align its "
        f"{sequences.label_lengths[i]}-character text (one frame per character, and a blank "
        "between equal neighbours): resample more finely (data.features.resample_spacing)"
      ),
    }
    for i in short
  ]
  _raise_under_error_policy(skipped, split, policy, source)
  if not skipped:
    return sequences, []
  return sequences.select(np.setdiff1d(np.arange(len(sequences)), short)), skipped


def skipped_examples(dataset: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
  """The lines a build left out, as {"id", "split", "reason"} (none for the synthetic set)."""
  if dataset == "synthetic":
    return []
  path = user_path(dataset) if dataset.endswith(".npz") else export_path(dataset, data_dir)
  if path.is_file():
    return read_export_metadata(path).get("skipped", [])
  return list(build_metadata(iam_ondb_builder(data_dir)).get("skipped", []))
