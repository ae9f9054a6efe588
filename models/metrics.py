"""Edit distance and corpus-level character / word error rates (host-side, numpy).

Rates are summed edits over summed reference lengths across the whole evaluation set, as the
handwriting-recognition literature reports them, not a mean of per-line rates (which would let a
two-character line weigh as much as a sixty-character one).
"""

import dataclasses
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

# Pairs per numpy pass of `edit_distances`: bounds its arrays to CHUNK x (longest hypothesis + 1).
CHUNK = 512


def edit_distances(
  references: Sequence[Sequence[Hashable]], hypotheses: Sequence[Sequence[Hashable]]
) -> np.ndarray:
  """Levenshtein distance (unit-cost insertions, deletions, substitutions) of each pair.

  Strings compare by character, lists of words by word. The dynamic programme keeps one row per
  pair and computes all pairs' rows together, one numpy pass per reference position (the pairs
  sorted by reference length and taken `CHUNK` at a time): substitutions and deletions are
  elementwise, and the chain of insertions along a row is a running minimum. A corpus costs
  O(longest reference) numpy calls per chunk, where a loop over its lines cost O(total length).
  """
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
  vocabulary: dict[Hashable, int] = {}

  def ids(tokens: Sequence[Hashable]) -> list[int]:
    return [vocabulary.setdefault(token, len(vocabulary)) for token in tokens]

  reference_ids = [ids(tokens) for tokens in references]
  hypothesis_ids = [ids(tokens) for tokens in hypotheses]
  distances = np.zeros(len(references), np.int64)
  order = np.argsort([len(tokens) for tokens in reference_ids], kind="stable")
  for start in range(0, len(order), CHUNK):
    chunk = order[start : start + CHUNK]
    distances[chunk] = _chunk_distances(
      [reference_ids[k] for k in chunk], [hypothesis_ids[k] for k in chunk]
    )
  return distances


def _padded(sequences: list[list[int]], fill: int) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.array([len(tokens) for tokens in sequences], np.int64)
  padded = np.full((len(sequences), max(lengths, default=0)), fill, np.int64)
  for row, tokens in enumerate(sequences):
    padded[row, : len(tokens)] = tokens
  return padded, lengths


def _chunk_distances(references: list[list[int]], hypotheses: list[list[int]]) -> np.ndarray:
  # Padding never equals a token (ids are >= 0). A hypothesis's padded columns come after its
  # own and cannot change them: a row's column j depends on columns up to j only.
  reference, reference_lengths = _padded(references, -1)
  hypothesis, hypothesis_lengths = _padded(hypotheses, -2)
  columns = np.arange(hypothesis.shape[1] + 1)
  row = np.tile(columns, (len(references), 1))  # the distances from an empty reference prefix
  for i in range(1, reference.shape[1] + 1):
    substitution = row[:, :-1] + (hypothesis != reference[:, i - 1 : i])
    deletion = row[:, 1:] + 1
    best = np.empty_like(row)
    best[:, 0] = i
    best[:, 1:] = np.minimum(substitution, deletion)
    # row[j] = min_k (best[k] + j - k): k..j are insertions.
    new_row = np.minimum.accumulate(best - columns, axis=1) + columns
    row = np.where((i <= reference_lengths)[:, None], new_row, row)  # past its end: done
  return row[np.arange(len(references)), hypothesis_lengths]


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
  """`edit_distances` of one pair."""
  return int(edit_distances([reference], [hypothesis])[0])


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


def corpus_error_counts(
  references: Sequence[Sequence[Hashable]], hypotheses: Sequence[Sequence[Hashable]]
) -> ErrorCounts:
  """Edits and reference tokens summed over a corpus of token sequences (`edit_distances`)."""
  edits = int(edit_distances(references, hypotheses).sum())
  return ErrorCounts(edits, sum(len(tokens) for tokens in references))


def cer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
  """Corpus character error rate: total character edits / total reference characters."""
  return corpus_error_counts(list(references), list(hypotheses)).rate


def wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
  """Corpus word error rate: total word edits / total reference words."""
  return corpus_error_counts(
    [line.split() for line in references], [line.split() for line in hypotheses]
  ).rate
