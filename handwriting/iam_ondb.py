"""Reading IAM-OnDB as users download it: the two archives (or their extracted folders) and the
four IAM-OnDB-t1 split files, into examples of the shared format (see `handwriting.dataset`).

Bad input policy. Whatever says the download itself is broken or incomplete fails the build with
an `IamOnDbError` naming the file: a missing or empty manual dir, a missing split or transcription
file, a form without line files, a form listed in two split files, truncated or malformed XML, a
non-numeric or non-finite point. Whatever makes only one line unusable while the download is fine
skips that line with a recorded reason: a line without ink (no points), a transcription with a
character outside the alphabet, or a form whose transcription lines cannot be matched to its line
files.

Known quirks, handled on purpose:
- `a08-551z` has 8 CSR lines for 9 line files: its last CSR line holds a `%%%%%%%%%%%` mark where
  the writer broke the line ("... ankle bone" | "pinned."), as the ink shows. A run of `%` in a CSR
  line is such a break; splitting there is used when it makes the line counts agree.
- `z01-000z` has the placeholder "Please Enter Transcription here" for 8 line files: skipped as a
  count mismatch (it is in no t1 split, so no split loses a line).
- `#` (an unreadable word) is kept as a class, see `handwriting.alphabet`.
- CRLF line ends (most transcription files) are normalised; surrounding blanks are stripped.
- `""` (an escaped quote in the source texts) is kept as two `"`: the writers copied it, and the
  ink shows two quotation marks (e.g. `m05-463z-02`).
"""

import collections
import dataclasses
import gzip
import os
import pathlib
import re
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import tqdm

import cli_errors
from handwriting.alphabet import Alphabet

# Split name -> the official IAM-OnDB-t1 file listing its form ids.
SPLIT_FILES = {
  "train": "trainset.txt",
  "validation": "testset_v.txt",
  "validation2": "testset_t.txt",
  "test": "testset_f.txt",
}
STROKES_ARCHIVE = "lineStrokes-all.tar.gz"
ASCII_ARCHIVE = "ascii-all.tar.gz"
_LINE_BREAK_MARK = re.compile(r"\s*%+\s*")
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # points are stored as float32


class IamOnDbError(ValueError):
  """The download is broken or incomplete; the message names the file and what is wrong."""


class UnusableLineError(ValueError):
  """One line (or form) cannot be used; the build skips it and records this message as reason."""


def parse_line_strokes(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
  """One line file's XML -> (points float32 [num_points, 3], stroke_end bool [num_points]).

  Points are (x, y, time) in sensor units (y grows downwards) and seconds since the line's first
  point: absolute times reach 1.7e7 s, which float32 cannot hold to the 0.01 s they carry.
  Strokes without points are dropped; a line with no points at all raises UnusableLineError.
  """
  try:
    root = ET.fromstring(data)
  except (ET.ParseError, ValueError, LookupError) as error:  # the latter two: its encoding
    raise IamOnDbError(f"{source}: malformed or truncated XML ({error})") from None
  stroke_set = root.find("StrokeSet")
  if stroke_set is None:
    raise IamOnDbError(f"{source}: no <StrokeSet> element")
  rows, stroke_end = [], []
  for stroke_index, stroke in enumerate(stroke_set.iter("Stroke")):
    points = stroke.findall("Point")
    for point_index, point in enumerate(points):
      try:
        row = [float(point.attrib[name]) for name in ("x", "y", "time")]
        if not all(abs(value) <= _FLOAT32_MAX for value in row):  # NaN compares False too
          raise ValueError
      except (KeyError, ValueError):
        raise IamOnDbError(
          f"{source}: point {point_index} of stroke {stroke_index} has a missing, non-numeric or "
          f"non-finite coordinate: {dict(point.attrib)}"
        ) from None
      rows.append(row)
      stroke_end.append(point_index == len(points) - 1)
  if not rows:
    raise UnusableLineError(f"{source}: the stroke set has no points")
  points = np.array(rows, dtype=np.float64)
  points[:, 2] -= points[0, 2]
  return points.astype(np.float32), np.array(stroke_end, dtype=np.bool_)


def parse_transcription(text: str, source: str) -> list[str]:
  """A form's transcription file -> its non-blank CSR lines, in order (CRLF tolerated)."""
  lines = text.splitlines()
  starts = [i for i, line in enumerate(lines) if line.strip().startswith("CSR:")]
  if not starts:
    raise IamOnDbError(f"{source}: no 'CSR:' block in the transcription file")
  return [line.strip() for line in lines[starts[0] + 1 :] if line.strip()]


def align_transcription(form_id: str, csr_lines: list[str], num_line_files: int) -> list[str]:
  """The text of each line file `<form_id>-01..NN`, splitting `%`-marked line breaks if needed."""
  if len(csr_lines) < num_line_files:
    split_lines = [part for line in csr_lines for part in _LINE_BREAK_MARK.split(line) if part]
    if len(split_lines) == num_line_files:
      return split_lines
  if len(csr_lines) != num_line_files:
    raise UnusableLineError(
      f"form {form_id}: {len(csr_lines)} CSR transcription lines for {num_line_files} line files"
    )
  return csr_lines


def read_split_file(path: pathlib.Path) -> list[str]:
  """A split file (one form id per line, leading space) -> its form ids."""
  if not path.is_file():
    raise IamOnDbError(f"{path}: split file not found")
  form_ids = path.read_text(encoding="latin-1").split()
  if not form_ids:
    raise IamOnDbError(f"{path}: split file lists no forms")
  return form_ids


def _form_dir(form_id: str) -> str:
  """`a01-000u` -> `a01/a01-000`, the folder layout of both archives."""
  return f"{form_id[:3]}/{form_id[:7]}"


def _iter_members(manual_dir: pathlib.Path, folder: str, archive: str, suffix: str):
  """Yield (path inside the download, bytes) of files `folder/**/*suffix`.

  Reads the extracted folder `manual_dir/folder` when it exists, else streams the archive
  (one sequential pass, so a 450 MB extracted size never sits in memory at once).
  """
  extracted = manual_dir / folder
  if extracted.is_dir():
    for path in sorted(extracted.rglob(f"*{suffix}")):
      yield f"{folder}/{path.relative_to(extracted).as_posix()}", path.read_bytes()
    return
  archive_path = manual_dir / archive
  if not archive_path.is_file():
    raise IamOnDbError(f"{manual_dir}: neither {archive} nor an extracted {folder}/ folder found")
  try:
    with gzip.open(archive_path) as stream:
      reader = _TailKeepingReader(stream)
      with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
          if member.isfile() and member.name.endswith(suffix):
            yield f"{archive}:{member.name}", tar.extractfile(member).read()
        # tarfile ends quietly at the first header it cannot read, as if the archive ended
        # there: from that header on, all must be the end-of-archive zeros, up to the gzip
        # stream's checked end (a download cut short raises EOFError), or lines would be lost.
        rest = iter(lambda: stream.read(1 << 20), b"")
        if any(block.strip(b"\0") for block in (reader.read_since(tar.offset), *rest)):
          raise tarfile.ReadError(f"a member header at byte {tar.offset} cannot be read")
  except (tarfile.TarError, EOFError, OSError) as error:
    raise IamOnDbError(f"{archive_path}: unreadable or truncated archive ({error})") from None


class _TailKeepingReader:
  """Reads a file, keeping the chunks of its last `keep` bytes read (or more; not copied): what
  tarfile, which reads ahead in records, had read past the header where it stopped."""

  def __init__(self, file, keep: int = 1 << 16):
    self.file, self.keep = file, keep
    self.position, self.chunks, self.kept = 0, collections.deque(), 0

  def read(self, size: int = -1) -> bytes:
    data = self.file.read(size)
    self.position += len(data)
    self.chunks.append(data)
    self.kept += len(data)
    while self.kept - len(self.chunks[0]) >= self.keep:
      self.kept -= len(self.chunks.popleft())
    return data

  def read_since(self, offset: int) -> bytes:
    """The bytes read from `offset` on (within those kept)."""
    if not 0 <= self.position - offset <= self.kept:
      raise ValueError(f"offset {offset} is not within the last {self.kept} bytes read")
    return b"".join(self.chunks)[self.kept - (self.position - offset) :]


def check_manual_dir(manual_dir: str | os.PathLike) -> pathlib.Path:
  """Fail early, naming what is missing, unless `manual_dir` has the split files and the data."""
  path = pathlib.Path(manual_dir)
  if path.exists() and not path.is_dir():
    raise IamOnDbError(f"{path}: the manual dir is a file; name the folder of the IAM-OnDB files")
  if not path.is_dir() or not any(path.iterdir()):
    raise IamOnDbError(
      f"{path}: the manual dir is missing or empty; put the IAM-OnDB files there "
      f"({STROKES_ARCHIVE}, {ASCII_ARCHIVE}, {', '.join(SPLIT_FILES.values())})"
    )
  for name in SPLIT_FILES.values():
    read_split_file(path / name)
  for folder, archive in (("lineStrokes", STROKES_ARCHIVE), ("ascii", ASCII_ARCHIVE)):
    if not (path / folder).is_dir() and not (path / archive).is_file():
      raise IamOnDbError(f"{path}: neither {archive} nor an extracted {folder}/ folder found")
  return path


@dataclasses.dataclass
class ParsedSplits:
  """All t1 splits: split name -> examples (ordered by line id), and the skipped lines."""

  examples: dict[str, list[dict]]
  skipped: list[dict]  # {"id": line or form id, "split": name, "reason": why}


def read_iam_ondb(
  manual_dir: str | os.PathLike, alphabet: Alphabet | None = None, progress: bool = True
) -> ParsedSplits:
  """Parse the download in `manual_dir` into examples of the four t1 splits.

  One pass over each archive, with a progress bar (`progress`) where stderr is a terminal or a
  notebook's. Errors and skips follow the module's bad-input policy.
  """
  manual_dir = check_manual_dir(manual_dir)
  alphabet = alphabet or Alphabet()
  split_of_form = {}
  for split, name in SPLIT_FILES.items():
    for form_id in read_split_file(manual_dir / name):
      other = split_of_form.setdefault(form_id, split)
      if other != split:  # one form in two splits would test on what was trained on
        raise IamOnDbError(
          f"{manual_dir / name}: form {form_id} is also listed in {SPLIT_FILES[other]}"
        )

  transcriptions = {}
  for source, data in _iter_members(manual_dir, "ascii", ASCII_ARCHIVE, ".txt"):
    form_id = pathlib.PurePosixPath(source).stem
    if form_id in split_of_form:
      transcriptions[form_id] = (data.decode("latin-1"), source)
  missing = sorted(set(split_of_form) - set(transcriptions))
  if missing:
    raise IamOnDbError(
      f"{manual_dir}: transcription file ascii/{_form_dir(missing[0])}/{missing[0]}.txt not found"
      f" ({len(missing)} forms of the splits lack one)"
    )

  ink = collections.defaultdict(dict)  # form id -> line id -> (points, stroke_end) or skip reason
  files = tqdm.tqdm(
    _iter_members(manual_dir, "lineStrokes", STROKES_ARCHIVE, ".xml"),
    desc="Parsing IAM-OnDB line files",
    unit=" files",
    disable=not (progress and cli_errors.shows_progress_bars()),
  )
  for source, data in files:
    line_id = pathlib.PurePosixPath(source).stem
    form_id = line_id.rsplit("-", 1)[0]
    if form_id in split_of_form:
      try:
        ink[form_id][line_id] = parse_line_strokes(data, source)
      except UnusableLineError as error:
        ink[form_id][line_id] = str(error)

  examples = {split: [] for split in SPLIT_FILES}
  skipped = []
  for form_id, split in sorted(split_of_form.items()):
    if not ink[form_id]:
      raise IamOnDbError(
        f"{manual_dir}: no line files lineStrokes/{_form_dir(form_id)}/{form_id}-NN.xml for form "
        f"{form_id} of split {split}"
      )
    text, source = transcriptions[form_id]
    line_ids = sorted(ink[form_id])
    try:
      texts = align_transcription(form_id, parse_transcription(text, source), len(line_ids))
    except UnusableLineError as error:
      skipped.extend({"id": i, "split": split, "reason": str(error)} for i in line_ids)
      continue
    for line_id, line_text in zip(line_ids, texts, strict=True):
      parsed = ink[form_id][line_id]
      try:
        if isinstance(parsed, str):
          raise UnusableLineError(parsed)
        alphabet.encode(line_text, line_id)
      except ValueError as error:
        skipped.append({"id": line_id, "split": split, "reason": str(error)})
        continue
      points, stroke_end = parsed
      examples[split].append(
        {
          "id": line_id,
          "form_id": form_id,
          "writer_id": "",
          "text": line_text,
          "points": points,
          "stroke_end": stroke_end,
        }
      )
  for split, split_examples in examples.items():
    if not split_examples:  # a split of skipped lines only: nothing to train or score on
      first = next(line for line in skipped if line["split"] == split)
      raise IamOnDbError(
        f"{manual_dir}: every line of split {split} ({SPLIT_FILES[split]}) is unusable; the "
        f"first, {first['id']}: {first['reason']}"
      )
  return ParsedSplits(examples=examples, skipped=skipped)
