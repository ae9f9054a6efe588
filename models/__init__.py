"""Flax recurrent models, CTC loss/decoding and error rates."""

from models.ctc import BLANK_ID, ctc_loss, decoded_to_lists, greedy_decode
from models.factory import make_model
from models.lstm import LstmCtcModel, LstmLayer, lengths_from_paddings, reverse_within_length
from models.metrics import (
  ErrorCounts,
  cer,
  char_error_counts,
  corpus_error_counts,
  edit_distance,
  edit_distances,
  wer,
  word_error_counts,
)

__all__ = [
  "BLANK_ID",
  "ErrorCounts",
  "LstmCtcModel",
  "LstmLayer",
  "cer",
  "char_error_counts",
  "corpus_error_counts",
  "ctc_loss",
  "decoded_to_lists",
  "edit_distance",
  "edit_distances",
  "greedy_decode",
  "lengths_from_paddings",
  "make_model",
  "reverse_within_length",
  "wer",
  "word_error_counts",
]
