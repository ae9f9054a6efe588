"""Tests for handwriting.alphabet: the CTC class mapping the model's outputs are read through."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handwriting.alphabet import IAM_ONDB_T1, Alphabet


def test_iam_ondb_t1_has_80_characters_plus_space_and_a_blank():
  alphabet = Alphabet()
  assert len(IAM_ONDB_T1) == 81
  assert " " in IAM_ONDB_T1 and "#" in IAM_ONDB_T1
  assert alphabet.size == 82
  assert alphabet.blank_id == 0


@given(st.text(alphabet=IAM_ONDB_T1, max_size=80))
def test_encode_decode_round_trip(text):
  alphabet = Alphabet()
  ids = alphabet.encode(text)
  assert ids.dtype == np.int32
  assert ids.shape == (len(text),)
  assert (ids >= 1).all() and (ids < alphabet.size).all()
  assert alphabet.decode(ids) == text


def test_decode_drops_blanks():
  alphabet = Alphabet()
  ids = alphabet.encode("ab")
  assert alphabet.decode([0, ids[0], 0, 0, ids[1], 0]) == "ab"


def test_unknown_character_names_character_and_example():
  with pytest.raises(ValueError, match=r"'%'.*position 5.*'a08-551z-08'"):
    Alphabet().encode("bone %%% pinned", "a08-551z-08")


def test_out_of_range_id_is_rejected():
  with pytest.raises(ValueError, match="outside"):
    Alphabet().decode([82])


def test_repeated_characters_are_rejected():
  with pytest.raises(ValueError, match="unique"):
    Alphabet("abca")


def test_an_empty_alphabet_is_rejected():
  # It would have the blank as its only class: a model that can only ever output nothing.
  with pytest.raises(ValueError, match="at least one character"):
    Alphabet("")
