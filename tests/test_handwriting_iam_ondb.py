"""Tests for handwriting.iam_ondb: parsing the download, its quirks, and bad input.

Every bad-input case is a small download this test writes, in the real layout.
"""

import gzip
import io
import pathlib
import tarfile
import zlib

import numpy as np
import pytest

import cli_errors
from handwriting import iam_ondb
from handwriting.alphabet import IAM_ONDB_T1, Alphabet
from handwriting.iam_ondb import IamOnDbError, UnusableLineError

FORMS = {  # form id -> split, transcription lines (one per line file)
  "a01-000u": ("train", ["A MOVE to stop Mr . Gaitskell", 'same. "" They \'re # badly']),
  "b02-010": ("validation", ["from nominating any more"]),
  "c03-020x": ("validation2", ["Labour life Peers"]),
  "d04-030z": ("test", ["is to be made", "at a meeting"]),
}


def line_xml(strokes: list[list[tuple]]) -> str:
  """A line file like the real ones: strokes of (x, y, time) points."""
  body = []
  for stroke in strokes:
    body.append('    <Stroke colour="black" start_time="0" end_time="0">')
    body.extend(f'      <Point x="{x}" y="{y}" time="{t}"/>' for x, y, t in stroke)
    body.append("    </Stroke>")
  return "\n".join(
    [
      '<?xml version="1.0" encoding="ISO-8859-1"?>',
      "<WhiteboardCaptureSession>",
      "  <WhiteboardDescription>",
      '    <SensorLocation corner="top_left"/>',
      "  </WhiteboardDescription>",
      "  <StrokeSet>",
      *body,
      "  </StrokeSet>",
      "</WhiteboardCaptureSession>",
    ]
  )


DEFAULT_INK = [[(10, 20, 1000.00), (12, 25, 1000.02), (15, 30, 1000.04)], [(40, 20, 1000.5)]]


def write_download(root: pathlib.Path, forms=FORMS, archives: bool = False) -> pathlib.Path:
  """Write a tiny IAM-OnDB download (extracted folders, or the two archives) under `root`."""
  files = {}
  for form_id, (_, lines) in forms.items():
    folder = f"{form_id[:3]}/{form_id[:7]}"
    csr = "\r\n".join(["OCR:", "", "whatever", "", "CSR:", "", *lines, ""])
    files[f"ascii/{folder}/{form_id}.txt"] = csr.encode("latin-1")
    for i in range(len(lines)):
      files[f"lineStrokes/{folder}/{form_id}-{i + 1:02d}.xml"] = line_xml(DEFAULT_INK).encode()
  root.mkdir(parents=True, exist_ok=True)
  if archives:
    for folder, archive in (
      ("lineStrokes", iam_ondb.STROKES_ARCHIVE),
      ("ascii", iam_ondb.ASCII_ARCHIVE),
    ):
      with tarfile.open(root / archive, "w:gz") as tar:
        for name, data in files.items():
          if name.startswith(folder):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
  else:
    for name, data in files.items():
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(data)
  for split, split_file in iam_ondb.SPLIT_FILES.items():
    ids = [f for f, (s, _) in forms.items() if s == split]
    (root / split_file).write_text("".join(f" {form_id}\n" for form_id in ids))
  return root


def line_path(root: pathlib.Path, line_id: str) -> pathlib.Path:
  return root / "lineStrokes" / line_id[:3] / line_id[:7] / f"{line_id}.xml"


def test_reads_extracted_download(tmp_path):
  parsed = iam_ondb.read_iam_ondb(write_download(tmp_path), progress=False)
  assert {split: len(examples) for split, examples in parsed.examples.items()} == {
    "train": 2,
    "validation": 1,
    "validation2": 1,
    "test": 2,
  }
  assert parsed.skipped == []
  first, second = parsed.examples["train"]
  assert first["id"] == "a01-000u-01" and first["form_id"] == "a01-000u"
  assert first["writer_id"] == ""
  assert first["text"] == "A MOVE to stop Mr . Gaitskell"  # no CR left from the CRLF file
  assert second["text"] == 'same. "" They \'re # badly'  # escaped quote and `#` kept as written
  np.testing.assert_allclose(
    first["points"], [[10, 20, 0], [12, 25, 0.02], [15, 30, 0.04], [40, 20, 0.5]], atol=1e-4
  )
  assert first["points"].dtype == np.float32
  np.testing.assert_array_equal(first["stroke_end"], [False, False, True, True])


def test_archives_give_the_same_examples(tmp_path):
  extracted = iam_ondb.read_iam_ondb(write_download(tmp_path / "x"), progress=False)
  archived = iam_ondb.read_iam_ondb(write_download(tmp_path / "a", archives=True), progress=False)
  for split, examples in extracted.examples.items():
    assert [e["id"] for e in examples] == [e["id"] for e in archived.examples[split]]
    for a, b in zip(examples, archived.examples[split], strict=True):
      np.testing.assert_array_equal(a["points"], b["points"])


@pytest.mark.parametrize("damage", ["truncate", "unknown encoding", "multi-byte encoding"])
def test_truncated_xml_fails_naming_the_file(tmp_path, damage):
  root = write_download(tmp_path)
  path = line_path(root, "b02-010-01")
  data = path.read_bytes()
  path.write_bytes(
    {
      "truncate": data[:200],
      "unknown encoding": data.replace(b"ISO-8859-1", b"ISO-8859-Q"),
      "multi-byte encoding": data.replace(b"ISO-8859-1", b"EUC-JP"),
    }[damage]
  )
  with pytest.raises(IamOnDbError, match=r"b02-010-01\.xml: malformed or truncated XML"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_non_numeric_coordinate_fails_naming_file_and_point(tmp_path):
  root = write_download(tmp_path)
  line_path(root, "c03-020x-01").write_text(line_xml([[(1, 2, 3.0), (4, "5a", 3.02)]]))
  with pytest.raises(IamOnDbError, match=r"c03-020x-01\.xml: point 1 of stroke 0 .*non-numeric"):
    iam_ondb.read_iam_ondb(root, progress=False)


@pytest.mark.parametrize("value", ["nan", "inf", "-1e999", "1e39"])
def test_non_finite_coordinate_fails_naming_file_and_point(tmp_path, value):
  # float() reads "nan" and "inf"; 1e39 is finite but not as float32, the points' dtype.
  root = write_download(tmp_path)
  line_path(root, "c03-020x-01").write_text(line_xml([[(1, 2, 3.0), (4, value, 3.02)]]))
  with pytest.raises(IamOnDbError, match=r"c03-020x-01\.xml: point 1 of stroke 0 .*non-finite"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_a_form_in_two_split_files_fails_naming_both(tmp_path):
  root = write_download(tmp_path)
  with (root / "testset_f.txt").open("a") as split_file:
    split_file.write(" a01-000u\n")  # a training form
  with pytest.raises(
    IamOnDbError, match=r"testset_f\.txt: form a01-000u is also listed in trainset"
  ):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_empty_stroke_set_skips_the_line_with_a_reason(tmp_path):
  root = write_download(tmp_path)
  line_path(root, "d04-030z-02").write_text(line_xml([]))
  parsed = iam_ondb.read_iam_ondb(root, progress=False)
  assert [e["id"] for e in parsed.examples["test"]] == ["d04-030z-01"]
  assert [(s["id"], s["split"]) for s in parsed.skipped] == [("d04-030z-02", "test")]
  assert "no points" in parsed.skipped[0]["reason"]


def test_missing_transcription_fails_naming_the_file(tmp_path):
  root = write_download(tmp_path)
  (root / "ascii/b02/b02-010/b02-010.txt").unlink()
  with pytest.raises(IamOnDbError, match=r"ascii/b02/b02-010/b02-010\.txt not found"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_character_outside_alphabet_skips_the_line(tmp_path):
  forms = dict(FORMS, **{"b02-010": ("validation", ["price: 5 @ 3", "from nominating"])})
  parsed = iam_ondb.read_iam_ondb(write_download(tmp_path, forms), progress=False)
  assert [example["id"] for example in parsed.examples["validation"]] == ["b02-010-02"]
  assert parsed.skipped[0]["id"] == "b02-010-01"
  assert "'@'" in parsed.skipped[0]["reason"]


def test_a_split_with_every_line_skipped_fails_naming_it(tmp_path):
  forms = dict(FORMS, **{"b02-010": ("validation", ["price: 5 @ 3"])})
  with pytest.raises(
    IamOnDbError,
    match=r"every line of split validation \(testset_v\.txt\) is unusable; the first, b02-010-01: "
    r"character '@'",
  ):
    iam_ondb.read_iam_ondb(write_download(tmp_path, forms), progress=False)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_manual_dir_fails(tmp_path, make):
  root = tmp_path / "manual"
  if make == "empty":
    root.mkdir()
  with pytest.raises(IamOnDbError, match=r"manual dir is missing or empty.*lineStrokes-all"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_parsing_into_a_log_file_draws_no_progress_bar(tmp_path, capfd):
  """stderr captured, as in a log file: no redraws of the bar, one line each."""
  parsed = iam_ondb.read_iam_ondb(write_download(tmp_path), progress=True)
  assert parsed.examples["train"]
  assert "Parsing IAM-OnDB" not in capfd.readouterr().err


def test_a_manual_dir_that_is_a_file_is_called_a_file(tmp_path):
  root = tmp_path / "manual"
  root.write_text("")
  with pytest.raises(IamOnDbError, match=r"manual: the manual dir is a file; name the folder"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_missing_split_file_and_archive_fail(tmp_path):
  root = write_download(tmp_path)
  (root / "testset_t.txt").unlink()
  with pytest.raises(IamOnDbError, match=r"testset_t\.txt: split file not found"):
    iam_ondb.read_iam_ondb(root, progress=False)
  root = write_download(tmp_path / "b", archives=True)
  (root / iam_ondb.ASCII_ARCHIVE).unlink()
  with pytest.raises(IamOnDbError, match=r"neither ascii-all\.tar\.gz nor an extracted ascii/"):
    iam_ondb.read_iam_ondb(root, progress=False)


def last_member_cut(archive: pathlib.Path, how: str) -> None:
  """Rewrites a .tar.gz with its last member's header damaged: one flipped bit ("flip"), or the
  download cut short just past the start of that header ("cut")."""
  tar_bytes = bytearray(gzip.decompress(archive.read_bytes()))
  with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
    header = tar.getmembers()[-1].offset
  if how == "flip":
    tar_bytes[header + 100] ^= 1  # the mode field: the header's checksum no longer matches
    archive.write_bytes(gzip.compress(bytes(tar_bytes)))
    return
  compressed = gzip.compress(bytes(tar_bytes))
  decompressor, size = zlib.decompressobj(31), 0
  for end in range(len(compressed)):  # the shortest prefix that gets past the header's start
    size += len(decompressor.decompress(compressed[end : end + 1]))
    if size > header:
      break
  archive.write_bytes(compressed[: end + 1])


@pytest.mark.parametrize("how", ["head", "cut", "flip"])
def test_truncated_archive_fails_naming_it(tmp_path, how):
  """tarfile takes a header it cannot read for the archive's end: cut just there, or damaged,
  the lines after it would be missing from a build that otherwise succeeds."""
  root = write_download(tmp_path, archives=True)
  archive = root / iam_ondb.STROKES_ARCHIVE
  if how == "head":
    archive.write_bytes(archive.read_bytes()[:300])
  else:
    last_member_cut(archive, how)
  with pytest.raises(IamOnDbError, match=r"lineStrokes-all\.tar\.gz: unreadable or truncated"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_form_without_line_files_fails(tmp_path):
  root = write_download(tmp_path)
  line_path(root, "b02-010-01").unlink()
  with pytest.raises(IamOnDbError, match=r"no line files lineStrokes/b02/b02-010/b02-010-NN"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_line_count_mismatch_skips_the_form(tmp_path):
  root = write_download(tmp_path, dict(FORMS, **{"e05-040": ("test", ["another form"])}))
  (root / "ascii/d04/d04-030/d04-030z.txt").write_text("CSR:\n\nonly one line\n")
  parsed = iam_ondb.read_iam_ondb(root, progress=False)
  assert [example["id"] for example in parsed.examples["test"]] == ["e05-040-01"]
  assert [(s["id"], s["split"]) for s in parsed.skipped] == [
    ("d04-030z-01", "test"),
    ("d04-030z-02", "test"),
  ]
  assert "1 CSR transcription lines for 2 line files" in parsed.skipped[0]["reason"]


def test_percent_mark_splits_a_line_only_when_counts_need_it():
  lines = ["first", "weeks to have a broken ankle bone %%%%%%%%%%% pinned."]
  assert iam_ondb.align_transcription("a08-551z", lines, 3) == [
    "first",
    "weeks to have a broken ankle bone",
    "pinned.",
  ]
  with pytest.raises(UnusableLineError, match="2 CSR transcription lines for 4 line files"):
    iam_ondb.align_transcription("a08-551z", lines, 4)


def test_no_csr_block_fails_naming_the_file():
  with pytest.raises(IamOnDbError, match=r"x\.txt: no 'CSR:' block"):
    iam_ondb.parse_transcription("OCR:\r\n\r\nsome text\r\n", "x.txt")


def _real_transcription(iam_ondb_dir, form_id):
  with tarfile.open(iam_ondb_dir / iam_ondb.ASCII_ARCHIVE) as tar:
    name = f"ascii/{form_id[:3]}/{form_id[:7]}/{form_id}.txt"
    return tar.extractfile(name).read().decode("latin-1")


def test_real_quirky_forms(iam_ondb_dir):
  """a08-551z (8 CSR lines, 9 line files) is repaired; z01-000z (placeholder) is unusable."""
  a08 = _real_transcription(iam_ondb_dir, "a08-551z")
  texts = iam_ondb.align_transcription("a08-551z", iam_ondb.parse_transcription(a08, "a08"), 9)
  assert texts[-2:] == ["weeks to have a broken ankle bone", "pinned."]
  z01 = _real_transcription(iam_ondb_dir, "z01-000z")
  with pytest.raises(UnusableLineError, match="1 CSR transcription lines for 8 line files"):
    iam_ondb.align_transcription("z01-000z", iam_ondb.parse_transcription(z01, "z01"), 8)


def test_a_line_file_without_a_stroke_set_fails_naming_the_file(tmp_path):
  root = write_download(tmp_path)
  line_path(root, "b02-010-01").write_text("<WhiteboardCaptureSession></WhiteboardCaptureSession>")
  with pytest.raises(IamOnDbError, match=r"b02-010-01\.xml: no <StrokeSet> element"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_a_point_without_its_time_fails_naming_file_and_point(tmp_path):
  root = write_download(tmp_path)
  xml = line_xml([[(1, 2, 3.0), (4, 5, 3.02)]])
  line_path(root, "c03-020x-01").write_text(xml.replace(' time="3.02"', ""))
  with pytest.raises(IamOnDbError, match=r"c03-020x-01\.xml: point 1 of stroke 0 has a missing"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_the_largest_float32_coordinate_is_accepted():
  largest = float(np.finfo(np.float32).max)  # finite as float32: the bound itself is allowed
  points, _ = iam_ondb.parse_line_strokes(line_xml([[(1, largest, 0.0)]]).encode(), "x.xml")
  assert points[0, 1] == np.float32(largest)


def test_times_late_in_a_session_keep_their_hundredths():
  """Absolute times reach 1.7e7 s, where float32 steps by 2 s: the start is taken off first."""
  stroke = [(1, 2, 17_000_000.0 + 0.01 * k) for k in range(4)]
  points, _ = iam_ondb.parse_line_strokes(line_xml([stroke]).encode(), "x.xml")
  np.testing.assert_allclose(points[:, 2], [0.0, 0.01, 0.02, 0.03], atol=1e-4)


def test_a_percent_mark_at_a_line_end_adds_no_empty_line():
  # The mark after "second" breaks the line before nothing: three texts, not four.
  assert iam_ondb.align_transcription("f", ["first %%% second %%%", "third"], 3) == [
    "first",
    "second",
    "third",
  ]
  with pytest.raises(UnusableLineError, match="2 CSR transcription lines for 3 line files"):
    iam_ondb.align_transcription("f", ["first %%%", "second"], 3)


def test_percent_marks_that_give_more_lines_than_line_files_are_not_split():
  with pytest.raises(UnusableLineError, match="1 CSR transcription lines for 2 line files"):
    iam_ondb.align_transcription("f", ["one %% two %% three"], 2)


def test_more_transcription_lines_than_line_files_skips_the_form(tmp_path):
  root = write_download(tmp_path, dict(FORMS, **{"e05-040": ("test", ["another form"])}))
  (root / "ascii/d04/d04-030/d04-030z.txt").write_text("CSR:\n\none\ntwo\nthree\n")
  parsed = iam_ondb.read_iam_ondb(root, progress=False)
  assert [example["id"] for example in parsed.examples["test"]] == ["e05-040-01"]
  assert [s["id"] for s in parsed.skipped] == ["d04-030z-01", "d04-030z-02"]
  assert "3 CSR transcription lines for 2 line files" in parsed.skipped[0]["reason"]


def test_an_empty_split_file_fails_naming_it(tmp_path):
  root = write_download(tmp_path)
  (root / "testset_t.txt").write_text(" \n")
  with pytest.raises(IamOnDbError, match=r"testset_t\.txt: split file lists no forms"):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_missing_transcriptions_name_the_first_file_and_count_them_all(tmp_path):
  root = write_download(tmp_path, dict(FORMS, **{"e05-040": ("test", ["another form"])}))
  (root / "ascii/d04/d04-030/d04-030z.txt").unlink()
  (root / "ascii/c03/c03-020/c03-020x.txt").unlink()
  # The folder is the form id without its suffix letter, the file name the whole form id.
  with pytest.raises(
    IamOnDbError,
    match=r"ascii/c03/c03-020/c03-020x\.txt not found \(2 forms of the splits lack one\)",
  ):
    iam_ondb.read_iam_ondb(root, progress=False)


def test_line_files_of_forms_in_no_split_are_not_read(tmp_path):
  root = write_download(tmp_path)
  unlisted = line_path(root, "z01-000z-01")  # a form of the download that no t1 split lists
  unlisted.parent.mkdir(parents=True)
  unlisted.write_bytes(b"<WhiteboardCaptureSession><Stroke")
  parsed = iam_ondb.read_iam_ondb(root, progress=False)
  assert sum(len(examples) for examples in parsed.examples.values()) == 6


def test_an_archive_in_any_member_order_gives_each_line_its_own_text(tmp_path):
  root = write_download(tmp_path, archives=True)
  archive = root / iam_ondb.STROKES_ARCHIVE
  with tarfile.open(archive) as tar:
    members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
  with tarfile.open(archive, "w:gz") as tar:
    for member, data in reversed(members):
      tar.addfile(member, io.BytesIO(data))
  parsed = iam_ondb.read_iam_ondb(root, progress=False)
  train = [(example["id"], example["text"]) for example in parsed.examples["train"]]
  assert train == [
    ("a01-000u-01", FORMS["a01-000u"][1][0]),
    ("a01-000u-02", FORMS["a01-000u"][1][1]),
  ]


def test_lines_are_checked_against_the_alphabet_given(tmp_path):
  no_capital_g = Alphabet(IAM_ONDB_T1.replace("G", ""))
  parsed = iam_ondb.read_iam_ondb(write_download(tmp_path), no_capital_g, progress=False)
  assert [example["id"] for example in parsed.examples["train"]] == ["a01-000u-02"]
  assert [s["id"] for s in parsed.skipped] == ["a01-000u-01"]  # "... Mr . Gaitskell"
  assert "'G'" in parsed.skipped[0]["reason"]


def test_progress_false_draws_no_bar_even_on_a_terminal(tmp_path, capfd, monkeypatch):
  monkeypatch.setattr(cli_errors, "shows_progress_bars", lambda: True)
  root = write_download(tmp_path)
  iam_ondb.read_iam_ondb(root, progress=True)
  assert "Parsing IAM-OnDB" in capfd.readouterr().err  # the terminal, as the bar sees it
  iam_ondb.read_iam_ondb(root, progress=False)
  assert "Parsing IAM-OnDB" not in capfd.readouterr().err


def test_check_manual_dir_names_missing_ink_before_anything_is_parsed(tmp_path):
  root = write_download(tmp_path, archives=True)
  assert iam_ondb.check_manual_dir(root) == root
  (root / iam_ondb.STROKES_ARCHIVE).unlink()
  with pytest.raises(
    IamOnDbError, match=r"neither lineStrokes-all\.tar\.gz nor an extracted lineStrokes/ folder"
  ):
    iam_ondb.check_manual_dir(root)
