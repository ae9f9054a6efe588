"""The TFDS dataset builder `iam_ondb`: IAM-OnDB-t1 as ArrayRecord files, no TensorFlow needed.

Written as `array_record` and read with `builder.as_data_source()` (random access, numpy out).
TFDS 4.9 generates and reads this format through its own bundled protos, so neither building nor
reading imports TensorFlow. Records keep the order of generation (`disable_shuffling`), which is
by line id, so `limit` in `handwriting.dataset.load_examples` takes whole forms in a fixed order.
"""

import datetime
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from handwriting import iam_ondb

_CITATION = """\
@inproceedings{liwicki2005iamondb,
  author = {Liwicki, Marcus and Bunke, Horst},
  title = {{IAM-OnDB} - an On-Line {E}nglish Sentence Database Acquired from Handwritten Text on
           a Whiteboard},
  booktitle = {Eighth International Conference on Document Analysis and Recognition (ICDAR)},
  year = {2005},
}
"""


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """`DatasetInfo` that never looks for pre-computed info in TFDS's GCS bucket.

  TFDS 4.9.10 does that at every builder made for a folder that holds no build yet, and first makes
  a temporary folder for the files it would copy; with the bucket out of reach (our case: this
  dataset is not there) it returns and leaves the empty `/tmp/tmp...tfds` folder behind, one per
  `handwriting build` or data-source lookup.
  """

  def initialize_from_bucket(self) -> None:
    pass


class IamOndb(tfds.core.GeneratorBasedBuilder):
  """IAM-OnDB text lines (pen points + transcription) in the IAM-OnDB-t1 splits."""

  name = "iam_ondb"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
    "1.0.0": "IAM-OnDB-t1 splits; a08-551z repaired at its line-break mark."
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  IAM-OnDB is free for non-commercial research but needs registration, so it cannot be downloaded
  for you. Register at https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database,
  download these six files and put them, unchanged, in one folder (the manual dir):
    {iam_ondb.STROKES_ARCHIVE}  {iam_ondb.ASCII_ARCHIVE}
    {"  ".join(iam_ondb.SPLIT_FILES.values())}
  The two archives may also be extracted there (folders lineStrokes/ and ascii/).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This module's file, where TFDS would look for download checksums (we download nothing).

    TFDS 4.9.10 finds it via the `importlib_resources` backport, which it declares only for
    Python < 3.9, so on 3.11 the build fails without this (tensorflow/datasets#11212).
    """
    return epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
      builder=self,
      description=(
        "Online handwriting: pen trajectories of English text lines written on a whiteboard. "
        "points are (x, y, seconds since the line's first point), y downwards, in sensor units; "
        "stroke_end marks the last point of each pen-down stroke. metadata['skipped'] lists "
        "the lines of the splits that were left out, with the reason; metadata['manual_dir'] and "
        "metadata['built_at'] say where and when it was built."
      ),
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "form_id": tfds.features.Text(),
          "writer_id": tfds.features.Text(),
          "text": tfds.features.Text(),
          "points": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
          "stroke_end": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        }
      ),
      homepage="https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database",
      citation=_CITATION,
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    parsed = iam_ondb.read_iam_ondb(dl_manager.manual_dir)
    self.info.metadata["skipped"] = parsed.skipped
    # Where and when this build came from, so a run reading it can say so (`dataset.data_source`).
    self.info.metadata["manual_dir"] = os.path.abspath(os.fspath(dl_manager.manual_dir))
    self.info.metadata["built_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    return {split: self._generate_examples(examples) for split, examples in parsed.examples.items()}

  def _generate_examples(self, examples: list[dict]):
    for example in examples:
      yield example["id"], example
