"""Flax recurrent models, CTC loss/decoding and error rates."""
