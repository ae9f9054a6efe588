"""The LSTM cell's elementwise maths, written once: the scan (`models.lstm`) and the Pallas kernels
(`models.lstm_kernel`) both call it around their own matmuls and memory traffic.

Gates come in the recurrent kernel's column order: input, forget, cell input, output. The
backward pass is the hand-written one cuDNN also uses: it needs only the activated gates and the
previous cell, and recomputes tanh(cell) instead of saving it.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Gates = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def cell_forward(
  pre_activations: Sequence[jax.Array],
  cell: jax.Array,
  sigmoid: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid,
  tanh: Callable[[jax.Array], jax.Array] = jnp.tanh,
) -> tuple[Gates, jax.Array, jax.Array]:
  """One frame: the four gates' pre-activations and the previous cell -> the activated gates, the
  new cell and the new hidden state. `sigmoid` and `tanh` may be approximations (the kernels'
  `approx_activations`)."""
  activations = (sigmoid, sigmoid, tanh, sigmoid)
  gates = tuple(f(x) for f, x in zip(activations, pre_activations, strict=True))
  input_gate, forget_gate, cell_input, output_gate = gates
  cell = forget_gate * cell + input_gate * cell_input
  return gates, cell, output_gate * tanh(cell)


def cell_backward(
  gates: Gates,
  previous_cell: jax.Array,
  hidden_cotangent: jax.Array,
  cell_cotangent: jax.Array,
  tanh: Callable[[jax.Array], jax.Array] = jnp.tanh,
) -> tuple[Gates, jax.Array]:
  """One frame back through `cell_forward`: the activated gates and the previous cell it saw, and
  the cotangents of its new hidden state (the frame's output's plus the next frame's) and of its
  new cell -> the cotangents of the four pre-activations and of the previous cell."""
  input_gate, forget_gate, cell_input, output_gate = gates
  tanh_cell = tanh(forget_gate * previous_cell + input_gate * cell_input)  # the forward's
  cell_cotangent = cell_cotangent + hidden_cotangent * output_gate * (1 - tanh_cell * tanh_cell)
  pre_activation_cotangents = (
    cell_cotangent * cell_input * input_gate * (1 - input_gate),
    cell_cotangent * previous_cell * forget_gate * (1 - forget_gate),
    cell_cotangent * input_gate * (1 - cell_input * cell_input),
    hidden_cotangent * tanh_cell * output_gate * (1 - output_gate),
  )
  return pre_activation_cotangents, cell_cotangent * forget_gate
