"""Edit distance and corpus-level character / word error rates (host-side, numpy).

Rates are summed edits over summed reference lengths across the whole evaluation set, as the
handwriting-recognition literature reports them, not a mean of per-line rates (which would let a
two-character line weigh as much as a sixty-character one).
"""

import dataclasses
from collections.abc import Hashable, Iterable, Sequence

import numpy as np


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
  """Levenshtein distance (unit-cost insertions, deletions, substitutions) between two sequences.

  Strings compare by character, lists of words by word. The dynamic programme keeps one row and
  computes it with numpy: substitutions and deletions are elementwise, and the chain of insertions
  along the row is a running minimum, so a line costs O(len) numpy calls rather than O(len^2)
  Python steps.
  """
  if len(reference) < len(hypothesis):
    reference, hypothesis = hypothesis, reference  # the distance is symmetric; loop the longer
  if not hypothesis:
    return len(reference)
  vocabulary: dict[Hashable, int] = {}
  reference_ids = np.array([vocabulary.setdefault(token, len(vocabulary)) for token in reference])
  hypothesis_ids = np.array([vocabulary.setdefault(token, len(vocabulary)) for token in hypothesis])
  columns = np.arange(len(hypothesis) + 1)
  row = columns.copy()
  for i, token in enumerate(reference_ids, start=1):
    substitution = row[:-1] + (hypothesis_ids != token)
    deletion = row[1:] + 1
    best = np.empty_like(row)
    best[0] = i
    best[1:] = np.minimum(substitution, deletion)
    # row[j] = min_k (best[k] + j - k): k..j are insertions.
    row = np.minimum.accumulate(best - columns) + columns
  return int(row[-1])


@dataclasses.dataclass(frozen=True)
class ErrorCounts:
  """Edits against a reference and the reference's length; add them up over a corpus."""

  edits: int = 0
  reference_length: int = 0

  def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
    return ErrorCounts(self.edits + other.edits, self.reference_length + other.reference_length)

  @property
  def rate(self) -> float:
    """Edits per reference token; 0.0 for nothing against an empty reference, inf otherwise."""
    if self.reference_length == 0:
      return 0.0 if self.edits == 0 else float("inf")
    return self.edits / self.reference_length


def char_error_counts(reference: str, hypothesis: str) -> ErrorCounts:
  """Character edits of one line (spaces count as characters)."""
  return ErrorCounts(edit_distance(reference, hypothesis), len(reference))


def word_error_counts(reference: str, hypothesis: str) -> ErrorCounts:
  """Word edits of one line; words are split on whitespace."""
  reference_words = reference.split()
  return ErrorCounts(edit_distance(reference_words, hypothesis.split()), len(reference_words))


def cer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
  """Corpus character error rate: total character edits / total reference characters."""
  pairs = zip(references, hypotheses, strict=True)
  return sum((char_error_counts(ref, hyp) for ref, hyp in pairs), ErrorCounts()).rate


def wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
  """Corpus word error rate: total word edits / total reference words."""
  pairs = zip(references, hypotheses, strict=True)
  return sum((word_error_counts(ref, hyp) for ref, hyp in pairs), ErrorCounts()).rate
