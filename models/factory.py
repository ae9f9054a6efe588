"""Builds the model from plain keyword arguments, so `models` never sees a config object.

The trainer calls `make_model(**config.model)`; a misspelt or missing key is a TypeError here, and
a value out of range a ValueError, before anything is traced or compiled.
"""

import flax.linen as nn
import jax.numpy as jnp

from models.lstm import LstmCtcModel


def make_model(
  *,
  num_classes: int,
  num_layers: int,
  hidden_size: int,
  bidirectional: bool = True,
  dropout_rate: float = 0.0,
  input_projection_size: int | None = None,
  unroll: int = 1,
  dtype: str | jnp.dtype = "float32",
) -> nn.Module:
  """Returns an `LstmCtcModel`; see its docstring for the meaning of each argument.

  `dtype` may be a name ("float32", "bfloat16") so that configs stay plain Python values.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must count the blank plus at least one label, got {num_classes}")
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if hidden_size < 1:
    raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if input_projection_size is not None and input_projection_size < 1:
    raise ValueError(f"input_projection_size must be None or >= 1, got {input_projection_size}")
  if unroll < 1:
    raise ValueError(f"unroll must be >= 1, got {unroll}")
  return LstmCtcModel(
    num_classes=num_classes,
    num_layers=num_layers,
    hidden_size=hidden_size,
    bidirectional=bidirectional,
    dropout_rate=dropout_rate,
    input_projection_size=input_projection_size,
    unroll=unroll,
    dtype=jnp.dtype(dtype),
  )
