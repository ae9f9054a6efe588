"""Synthetic online handwriting: the default data on a machine without IAM-OnDB.

Random text lines are written with a single-line Hershey script font (`hershey-fonts`) by random
writers, and sampled like the IAM-OnDB whiteboard digitiser: sensor units with y downwards, a point
every ~0.02 s. Letters of a word whose strokes meet are joined into one pen-down stroke, as in
cursive. Each writer (one per form of 8 lines, never shared between splits, as in IAM-OnDB) has
its own font, size, slant, letter spacing, baseline drift, jitter and pen speed, so a model must
generalise across writers. The text length and pen speed distributions are set so that points
per line resemble IAM-OnDB's training set (median ~610, 5% above ~1,000, a tail past 1,500).

Everything is a pure function of (seed, split, line index): any subset regenerates identically.
"""

import functools

import numpy as np
from HersheyFonts import HersheyFonts

from handwriting.alphabet import IAM_ONDB_T1

FONTS = ("scripts", "cursive")
LINES_PER_FORM = 8
SAMPLE_INTERVAL_S = 0.02
SPLIT_CODES = {"train": 0, "validation": 1, "validation2": 2, "test": 3}

# Frequent English words, so that a language prior helps as on real text but lines still vary.
WORDS = tuple(
  """
  the of and to a in that is was he for it with as his on be at by had not are but from or have an
  they which one you were her all she there would their we him been has when who will more no if
  out so said what up its about into than them can only other new some could time these two may
  then do first any my now such like our over man me even most made after also did many before
  must through back years where much your way well down should because each just those people how
  too little state good very make world still own see men work long get here between both life
  being under never day same another know while last might us great old year off come since
  against go came right used take three himself few house use during without again place around
  however home small found thought went say part once general high upon school every does got
  united left number course war until always away something fact though water less public put
  think almost hand enough far took head yet government system better set told nothing night end
  why called find going look asked later knew point next program city business give group toward
  young days let room president side social given present several order national possible rather
  second face per among form important often things looked early white case john become large big
  need four within felt along children saw best church ever least power development light thing
  seemed family interest want members mind country area others done turned although open problem
  """.split()  # noqa: SIM905 (a block of text is the readable form of a word list)
)
# Capitalised words and tokens with IAM-like spacing (the transcriptions write "Mr ." and "I 'm").
PROPER_NOUNS = (
  "London", "Mr", "Mrs", "Britain", "Labour", "Sir", "Paris", "America", "Europe", "Kennedy",
  "Monday", "Friday", "March", "English", "Government", "Party", "Church", "John", "Mary", "Peter",
)  # fmt: skip
CLITICS = ("'s", "'t", "'ll", "'re", "'m", "n't")
SENTENCE_ENDS = (".", ".", ".", "?", "!", ";", ":")


@functools.cache
def _font_glyphs(font_name: str) -> dict[str, tuple[list[np.ndarray], float]]:
  """Font -> {character: (strokes [num_points, 2] in font units, y down, x from 0; advance)}."""
  font = HersheyFonts()
  font.load_default_font(font_name)
  glyphs = {}
  for character, glyph in font.all_glyphs.items():
    if character in IAM_ONDB_T1:
      strokes = [
        np.array(stroke, dtype=np.float64) - [glyph.left_offset, 0.0] for stroke in glyph.strokes
      ]
      glyphs[character] = ([s for s in strokes if len(s) > 0], float(glyph.char_width))
  missing = sorted(set(IAM_ONDB_T1) - set(glyphs))
  if missing:
    raise ValueError(f"Hershey font {font_name!r} lacks characters {missing}")
  return glyphs


def random_text(rng: np.random.Generator, target_length: int) -> str:
  """A line of about `target_length` characters: words, capitals, punctuation, numbers."""
  tokens: list[str] = []
  length = -1
  capitalise = rng.random() < 0.5
  while length < target_length:
    roll = rng.random()
    if roll < 0.05:
      token = rng.choice(PROPER_NOUNS)
    elif roll < 0.08:
      token = str(rng.integers(1, 2000))
    else:
      token = str(rng.choice(WORDS))
    if capitalise:
      token = token[0].upper() + token[1:]
    capitalise = False
    roll = rng.random()
    if roll < 0.04:
      tokens.append(token)
      token = str(rng.choice(CLITICS))
    elif roll < 0.07:
      token = f'"{token}"' if rng.random() < 0.6 else f"({token})"
    elif roll < 0.14:
      token += "," if rng.random() < 0.5 else " ,"
    elif roll < 0.22:
      mark = str(rng.choice(SENTENCE_ENDS))
      token += mark if rng.random() < 0.5 else " " + mark
      capitalise = mark in ".?!"
    elif roll < 0.24:
      token += " -"
    tokens.append(token)
    length += len(token) + 1
  return " ".join(tokens)


def writer_style(rng: np.random.Generator) -> dict:
  """One writer's habits: the knobs that make lines of different writers look different."""
  return {
    "font": str(rng.choice(FONTS)),
    "height": rng.uniform(12.0, 21.0),  # sensor units per font unit
    "slant": rng.normal(0.15, 0.15),  # x shift per unit of height above the baseline
    "spacing": rng.uniform(-1.0, 3.0),  # extra font units between letters
    "word_gap": rng.uniform(2.0, 7.0),  # extra font units between words
    "drift": rng.uniform(0.0, 0.04),  # baseline slope
    "wobble": rng.uniform(0.0, 0.6),  # baseline wave amplitude, in font units
    "jitter": rng.uniform(0.05, 0.25),  # per-letter size/offset noise, relative
    "pen_noise": rng.uniform(0.0, 0.08),  # per-point noise, in font units
    "speed": np.exp(rng.normal(np.log(2.05), 0.25)),  # font units per sample
  }


def _layout(text: str, style: dict, rng: np.random.Generator) -> list[np.ndarray]:
  """Text -> pen-down strokes [num_points, 2] in font units (y down), letters joined in words."""
  glyphs = _font_glyphs(style["font"])
  strokes: list[np.ndarray] = []
  pen_x = 0.0
  joinable = False
  for character in text:
    glyph_strokes, advance = glyphs[character]
    if character == " ":
      pen_x += advance + style["word_gap"]
      joinable = False
      continue
    size = 1.0 + style["jitter"] * rng.normal(0.0, 0.5)
    dy = style["jitter"] * rng.normal(0.0, 1.5)
    for glyph_stroke in glyph_strokes:
      stroke = glyph_stroke * size + [pen_x, dy]
      if joinable and np.hypot(*(stroke[0] - strokes[-1][-1])) < 2.5:
        strokes[-1] = np.concatenate([strokes[-1], stroke[1:]])
      else:
        strokes.append(stroke)
      joinable = True
    pen_x += advance * size + style["spacing"]
  return strokes


def write_line(text: str, style: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Text -> (points float32 [num_points, 3] as (x, y, s), stroke_end bool [num_points])."""
  strokes = _layout(text, style, rng)
  phase = rng.uniform(0.0, 2.0 * np.pi)
  points, stroke_end = [], []
  time = 0.0
  for stroke in strokes:
    steps = np.hypot(*np.diff(stroke, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    speed = style["speed"] * np.exp(rng.normal(0.0, 0.1))
    count = max(int(arc[-1] / speed), 1) + 1
    targets = np.linspace(0.0, arc[-1], count)
    xy = np.stack([np.interp(targets, arc, stroke[:, 0]), np.interp(targets, arc, stroke[:, 1])], 1)
    xy += rng.normal(0.0, style["pen_noise"], xy.shape)
    times = time + SAMPLE_INTERVAL_S * np.arange(count)
    time = times[-1] + rng.uniform(0.05, 0.3)  # the pen in the air
    points.append(np.column_stack([xy, times]))
    ends = np.zeros(count, dtype=np.bool_)
    ends[-1] = True
    stroke_end.append(ends)
  points = np.concatenate(points)
  x, y = points[:, 0], points[:, 1]
  y += style["drift"] * x + style["wobble"] * np.sin(2.0 * np.pi * x / 300.0 + phase)
  x -= style["slant"] * y
  points[:, :2] = points[:, :2] * style["height"] + [700.0, 1000.0]
  return points.astype(np.float32), np.concatenate(stroke_end)


def _line_length(rng: np.random.Generator) -> int:
  """Characters per line, shaped like IAM-OnDB-t1 train (median 30, 5%..95% about 15..41)."""
  return int(np.clip(rng.normal(29.0, 8.0), 3, 64))


def generate_examples(split: str, num_lines: int, seed: int = 0, first_line: int = 0) -> list[dict]:
  """Lines `first_line .. first_line + num_lines - 1` of a synthetic split, as example dicts."""
  if split not in SPLIT_CODES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
  examples = []
  for index in range(first_line, first_line + num_lines):
    form, line = divmod(index, LINES_PER_FORM)
    style = writer_style(np.random.default_rng([seed, SPLIT_CODES[split], form]))
    rng = np.random.default_rng([seed, SPLIT_CODES[split], form, line + 1])
    text = random_text(rng, _line_length(rng))
    points, stroke_end = write_line(text, style, rng)
    form_id = f"syn-{split}-{form:04d}"
    examples.append(
      {
        "id": f"{form_id}-{line + 1:02d}",
        "form_id": form_id,
        "writer_id": f"syn-{split}-w{form:04d}",
        "text": text,
        "points": points,
        "stroke_end": stroke_end,
      }
    )
  return examples
