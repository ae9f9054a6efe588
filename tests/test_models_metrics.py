"""Edit distance against a textbook implementation, and corpus-level error rates."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models import metrics
from models.metrics import (
  ErrorCounts,
  cer,
  char_error_counts,
  edit_distance,
  edit_distances,
  wer,
  word_error_counts,
)


def textbook_edit_distance(reference, hypothesis):
  """The full O(n*m) table, cell by cell."""
  table = [[0] * (len(hypothesis) + 1) for _ in range(len(reference) + 1)]
  for i in range(len(reference) + 1):
    for j in range(len(hypothesis) + 1):
      if i == 0 or j == 0:
        table[i][j] = i + j
      else:
        table[i][j] = min(
          table[i - 1][j] + 1,
          table[i][j - 1] + 1,
          table[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]),
        )
  return table[-1][-1]


@given(st.text(alphabet="abc ", max_size=12), st.text(alphabet="abc ", max_size=12))
def test_edit_distance_matches_textbook_on_random_strings(reference, hypothesis):
  assert edit_distance(reference, hypothesis) == textbook_edit_distance(reference, hypothesis)


@given(
  st.lists(st.sampled_from(["the", "a", "cat", "sat"]), max_size=8),
  st.lists(st.sampled_from(["the", "a", "cat", "mat"]), max_size=8),
)
def test_edit_distance_matches_textbook_on_word_lists(reference, hypothesis):
  assert edit_distance(reference, hypothesis) == textbook_edit_distance(reference, hypothesis)


@given(
  st.lists(
    st.tuples(st.text(alphabet="abc ", max_size=9), st.text(alphabet="abcd", max_size=9)),
    max_size=12,
  )
)
def test_a_corpus_at_once_gives_each_pairs_distance(pairs):
  """All pairs in one pass, their lengths mixed, taken 3 at a time so that chunks of different
  lengths and the order they are sorted in are exercised too."""
  references, hypotheses = [ref for ref, _ in pairs], [hyp for _, hyp in pairs]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(metrics, "CHUNK", 3)
    distances = edit_distances(references, hypotheses)
  assert distances.tolist() == [textbook_edit_distance(ref, hyp) for ref, hyp in pairs]


@pytest.mark.parametrize(
  ("reference", "hypothesis", "distance"),
  [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("", "", 0), ("flaw", "lawn", 2)],
)
def test_edit_distance_known_values(reference, hypothesis, distance):
  assert edit_distance(reference, hypothesis) == distance


def test_word_counts_split_on_whitespace():
  assert word_error_counts("the cat  sat", "the hat sat down") == ErrorCounts(2, 3)
  assert char_error_counts("the cat", "the hat") == ErrorCounts(1, 7)


def test_char_counts_are_against_the_references_length_not_the_hypothesis():
  assert char_error_counts("abc", "abcde") == ErrorCounts(2, 3)
  assert char_error_counts("abcde", "ab") == ErrorCounts(3, 5)


def test_rates_are_corpus_level_not_a_mean_of_line_rates():
  """One wrong character in a 2-character line and none in an 8-character line: 1/10 = 0.1,
  where averaging the line rates would say 0.25."""
  references = ["ab", "abcdefgh"]
  hypotheses = ["ax", "abcdefgh"]
  assert cer(references, hypotheses) == pytest.approx(0.1)
  assert wer(["a b", "c d e f"], ["a x", "c d e f"]) == pytest.approx(1 / 6)


def test_rates_divide_by_the_references_length_not_the_hypothesis():
  assert cer(["ab"], ["abcd"]) == pytest.approx(1.0)  # two insertions in two characters
  assert cer(["abcd"], ["ab"]) == pytest.approx(0.5)
  assert wer(["a"], ["a b c"]) == pytest.approx(2.0)
  assert wer(["a b c"], ["a"]) == pytest.approx(2 / 3)


def test_cer_counts_spaces_and_wer_splits_on_any_whitespace():
  assert cer(["ab"], ["a b"]) == pytest.approx(0.5)  # an inserted space is an edit
  assert cer(["a b"], ["ab"]) == pytest.approx(1 / 3)
  assert wer([" the  cat "], ["the cat"]) == 0.0
  assert wer(["the cat"], ["the\tcat\n"]) == 0.0


def test_error_counts_add_up_and_handle_empty_references():
  total = sum([ErrorCounts(1, 4), ErrorCounts(2, 6)], ErrorCounts())
  assert total == ErrorCounts(3, 10)
  assert total.rate == pytest.approx(0.3)
  assert ErrorCounts(0, 0).rate == 0.0
  assert ErrorCounts(2, 0).rate == float("inf")


def test_mismatched_corpus_sizes_are_an_error():
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    cer(["a", "b"], ["a"])
  # More hypotheses than references too: the extra ones must not be dropped silently.
  with pytest.raises(ValueError, match="1 references but 2 hypotheses"):
    cer(["a"], ["a", "b"])
