"""Tests for handwriting.synthetic: the default data must be deterministic and IAM-OnDB-like."""

import itertools
import re

import numpy as np
import pytest

from handwriting import synthetic
from handwriting.alphabet import IAM_ONDB_T1, Alphabet
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


def _still_style(**changes) -> dict:
  """A writer without slant, drift, wobble, jitter or pen noise: ink that can be reasoned about."""
  style = synthetic.writer_style(np.random.default_rng(0))
  return (
    style | {"slant": 0.0, "drift": 0.0, "wobble": 0.0, "jitter": 0.0, "pen_noise": 0.0} | changes
  )


def test_points_come_every_sample_interval_and_the_pen_lifts_between_strokes():
  for example in synthetic.generate_examples("train", 8):
    steps = np.diff(example["points"][:, 2])
    lifted = example["stroke_end"][:-1]  # the step after a stroke's last point
    np.testing.assert_allclose(steps[~lifted], synthetic.SAMPLE_INTERVAL_S, atol=1e-4)
    assert lifted.any() and np.all(steps[lifted] >= 0.05 - 1e-4) and np.all(steps[lifted] <= 0.3)


def test_slant_shifts_each_point_by_its_height_above_the_baseline():
  def ink(slant):
    points, _ = synthetic.write_line("Hl", _still_style(slant=slant), np.random.default_rng(1))
    return points

  upright, slanted = ink(0.0), ink(0.3)
  np.testing.assert_array_equal(slanted[:, 1], upright[:, 1])
  height_above_baseline = 1000.0 - upright[:, 1]  # sensor y grows downwards from the baseline
  assert height_above_baseline.max() > 100  # the letters do rise above it
  np.testing.assert_allclose(slanted[:, 0] - upright[:, 0], 0.3 * height_above_baseline, atol=0.05)


def test_letters_of_a_word_are_joined_where_their_strokes_meet_but_not_across_words():
  def strokes(text):
    _, stroke_end = synthetic.write_line(text, _still_style(), np.random.default_rng(1))
    return int(stroke_end.sum())

  # a script "n" ends where the next one starts: their strokes are written as one
  assert strokes("nn") == 2 * strokes("n") - 1
  assert strokes("n n") == 2 * strokes("n")


def test_glyphs_start_at_their_pen_position_and_mostly_fit_their_advance():
  for font in synthetic.FONTS:
    glyphs = synthetic._font_glyphs(font)
    spans = {
      c: (min(s[:, 0].min() for s in strokes), max(s[:, 0].max() for s in strokes), advance)
      for c, (strokes, advance) in glyphs.items()
      if strokes
    }
    inside = [c for c, (low, high, advance) in spans.items() if low >= 0 and high <= advance]
    assert len(inside) > 0.75 * len(spans), font  # descenders like f, j, p may reach outside


def test_a_font_lacking_a_character_of_the_alphabet_is_refused(monkeypatch):
  monkeypatch.setattr(synthetic, "IAM_ONDB_T1", IAM_ONDB_T1 + "\u20ac")
  synthetic._font_glyphs.cache_clear()
  try:
    with pytest.raises(ValueError, match=r"Hershey font 'cursive' lacks characters \['\u20ac'\]"):
      synthetic._font_glyphs("cursive")
  finally:
    synthetic._font_glyphs.cache_clear()


def test_writers_use_every_font():
  fonts = {synthetic.writer_style(np.random.default_rng(form))["font"] for form in range(40)}
  assert fonts == set(synthetic.FONTS)


def test_the_same_form_of_two_splits_has_two_different_writers(monkeypatch):
  styles = []
  writer_style = synthetic.writer_style
  monkeypatch.setattr(
    synthetic, "writer_style", lambda rng: styles.append(writer_style(rng)) or styles[-1]
  )
  synthetic.generate_examples("train", 1)
  synthetic.generate_examples("test", 1)
  train, test = styles
  assert train["height"] != test["height"] and train["speed"] != test["speed"]


def test_texts_have_numbers_brackets_sentences_and_clitics_as_iam_writes_them(train_lines):
  texts = [e["text"] for e in train_lines[:500]]
  text = " ".join(texts)
  assert set("0123456789()-?!;:") <= set(text)
  starts = [line[0] for line in texts if line[0].isalpha()]
  assert 0.3 < np.mean([c.isupper() for c in starts]) < 0.7  # about half the lines start a sentence
  # other words are capitalised only as names or after a sentence's end: ~17% of words in all
  words = [word.lstrip('"(') for line in texts for word in line.split()]
  initials = [word[0] for word in words if word and word[0].isalpha()]
  assert np.mean([c.isupper() for c in initials]) < 0.3
  # after a sentence's end the next word is capitalised (inside a quote or bracket too)
  assert re.search(r"[.?!] [\"(]?[A-Z]", text)
  assert not any(re.search(r"[.?!] [\"(]?[a-z]", line) for line in texts)
  # a clitic ("I 'm") follows the word it belongs to, never a punctuation mark or a line start
  clitics = "|".join(re.escape(c) for c in synthetic.CLITICS)
  assert re.search(rf"[A-Za-z0-9] ({clitics})( |$)", text)
  assert not any(re.search(rf"(^|[^A-Za-z0-9 ] )({clitics})( |$)", line) for line in texts)


def test_strokes_start_on_the_glyphs_at_the_pen_position_of_their_letter():
  """Without jitter or noise, a stroke starts exactly where its glyph's stroke does, the second
  letter one advance plus the writer's letter spacing to the right, scaled to sensor units."""
  style = _still_style(spacing=2.5)
  points, stroke_end = synthetic.write_line("n.", style, np.random.default_rng(1))
  starts = points[np.r_[0, np.flatnonzero(stroke_end[:-1]) + 1], :2]
  glyphs = synthetic._font_glyphs(style["font"])
  n_strokes, n_advance = glyphs["n"]
  pen_x = n_advance + style["spacing"]
  expected = [s[0] for s in n_strokes] + [s[0] + [pen_x, 0.0] for s in glyphs["."][0]]
  np.testing.assert_allclose(starts, np.array(expected) * style["height"] + [700, 1000], atol=0.01)
