"""Tests for handwriting.synthetic: the default data must be deterministic and IAM-OnDB-like."""

import itertools

import numpy as np
import pytest

from handwriting import synthetic
from handwriting.alphabet import Alphabet
from handwriting.dataset import check_example


@pytest.fixture(scope="module")
def train_lines():
  """2,000 training lines: enough for stable length percentiles, ~4 s."""
  return synthetic.generate_examples("train", 2000, seed=0)


def test_deterministic_from_seed_and_index():
  first = synthetic.generate_examples("train", 10, seed=5)
  again = synthetic.generate_examples("train", 10, seed=5)
  tail = synthetic.generate_examples("train", 4, seed=5, first_line=6)
  other_seed = synthetic.generate_examples("train", 10, seed=6)
  for a, b in zip(first, again, strict=True):
    assert a["id"] == b["id"] and a["text"] == b["text"]
    np.testing.assert_array_equal(a["points"], b["points"])
    np.testing.assert_array_equal(a["stroke_end"], b["stroke_end"])
  for a, b in zip(first[6:], tail, strict=True):
    np.testing.assert_array_equal(a["points"], b["points"])
  assert [e["text"] for e in first] != [e["text"] for e in other_seed]


def test_examples_pass_the_checks_real_ones_pass(train_lines):
  alphabet = Alphabet()
  for example in train_lines[:300]:
    check_example(example, alphabet)


def test_length_distribution_resembles_iam_ondb(train_lines):
  lengths = np.array([len(e["points"]) for e in train_lines])
  # IAM-OnDB-t1 train: median 610 points, max 1,540.
  assert 540 <= np.median(lengths) <= 680
  assert np.percentile(lengths, 95) >= 950
  assert (lengths > 1500).sum() >= 1
  assert lengths.min() >= 30


def test_writers_are_split_specific_and_vary():
  train = synthetic.generate_examples("train", 16)
  test = synthetic.generate_examples("test", 16)
  assert not {e["writer_id"] for e in train} & {e["writer_id"] for e in test}
  assert len({e["writer_id"] for e in train}) == 16 // synthetic.LINES_PER_FORM
  heights = [np.ptp(e["points"][:, 1]) for e in train]
  assert max(heights) > 1.2 * min(heights)


def test_every_split_has_texts_and_ink_of_its_own():
  splits = {split: synthetic.generate_examples(split, 8) for split in synthetic.SPLIT_CODES}
  for split, examples in splits.items():
    for other, others in splits.items():
      if other != split:
        assert not {e["text"] for e in examples} & {e["text"] for e in others}, (split, other)
        for a, b in zip(examples, others, strict=True):
          assert a["points"].shape != b["points"].shape or not np.allclose(a["points"], b["points"])


def test_every_character_of_a_line_leaves_ink():
  still = synthetic.writer_style(np.random.default_rng(0))
  still |= {"slant": 0.0, "drift": 0.0, "wobble": 0.0, "jitter": 0.0, "pen_noise": 0.0}

  def width(text):
    points, _ = synthetic.write_line(text, still, np.random.default_rng(1))
    return np.ptp(points[:, 0])

  # Each letter added at the end widens the ink by at least a stroke's width.
  widths = [width("n" * count) for count in range(1, 5)]
  assert all(later > earlier + still["height"] for earlier, later in itertools.pairwise(widths))


def test_texts_use_words_punctuation_and_capitals(train_lines):
  text = " ".join(e["text"] for e in train_lines[:500])
  assert any(c.isupper() for c in text)
  assert set(".,'\"") <= set(text)


def test_unknown_split_is_rejected():
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.generate_examples("dev", 1)
