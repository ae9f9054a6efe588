"""The label alphabet: characters <-> CTC class ids, with id 0 reserved for the CTC blank.

`#` policy: IAM-OnDB marks a word its transcribers could not read with `#`. The ink of that word is
still there, so `#` stays an ordinary class ("some unreadable word") rather than being dropped: a
model that deletes it would leave ink unexplained. Error rates can still exclude it at scoring time.
"""

import dataclasses
import functools
from collections.abc import Iterable

import numpy as np

# The 80 characters of IAM-OnDB-t1's labels (including `#`) plus space: 81 symbols, 82 classes with
# the blank. These are exactly the characters of the transcriptions of the four t1 split files.
IAM_ONDB_T1 = " !\"#&'()*+,-./0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Alphabet:
  """Maps text to int32 class ids 1..N (the order of `characters`) and back; 0 is the CTC blank."""

  characters: str = IAM_ONDB_T1
  blank_id: int = dataclasses.field(default=0, init=False)

  def __post_init__(self):
    duplicates = sorted({c for c in self.characters if self.characters.count(c) > 1})
    if duplicates:
      raise ValueError(f"Alphabet characters must be unique; repeated: {duplicates}")
    if not self.characters:
      raise ValueError("Alphabet needs at least one character")

  @property
  def size(self) -> int:
    """Number of classes, including the blank: the width of the model's output layer."""
    return len(self.characters) + 1

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {c: i + 1 for i, c in enumerate(self.characters)}

  def encode(self, text: str, example_id: str | None = None) -> np.ndarray:
    """`text` -> int32 ids [len(text)]; a character outside the alphabet raises ValueError."""
    ids = self._ids
    try:
      return np.array([ids[c] for c in text], dtype=np.int32)
    except KeyError as error:
      character = error.args[0]
      where = f" in example {example_id!r}" if example_id else ""
      raise ValueError(
        f"character {character!r} (U+{ord(character):04X}) at position {text.index(character)}"
        f"{where} is not in the alphabet; text: {text!r}"
      ) from None

  def decode(self, ids: Iterable[int]) -> str:
    """Class ids -> text. Blanks are dropped (CTC outputs contain them); other ids must be valid."""
    characters = []
    for class_id in np.asarray(ids, dtype=np.int64).reshape(-1):
      if class_id == self.blank_id:
        continue
      if not 0 < class_id < self.size:
        raise ValueError(f"class id {class_id} is outside 0..{self.size - 1}")
      characters.append(self.characters[class_id - 1])
    return "".join(characters)
