"""Tests for models.lstm_cell: the hand-written backward pass is the forward pass's derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.lstm_cell import cell_backward, cell_forward


def random_frame(seed: int, shape=(3, 5)):
  """Pre-activations of the four gates, a previous cell, and the cotangents of the new hidden
  state and cell; spread wide enough to reach the activations' curved parts."""
  values = jax.random.normal(jax.random.key(seed), (7, *shape)) * 2.0
  return tuple(values[:4]), values[4], values[5], values[6]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_backward_is_the_derivative_of_cell_forward(seed):
  pre_activations, cell, hidden_cotangent, cell_cotangent = random_frame(seed)

  def new_cell_and_hidden(pre_activations, cell):
    _, new_cell, hidden = cell_forward(pre_activations, cell)
    return new_cell, hidden

  _, vjp = jax.vjp(new_cell_and_hidden, pre_activations, cell)
  expected_gates, expected_cell = vjp((cell_cotangent, hidden_cotangent))
  gates, _, _ = cell_forward(pre_activations, cell)
  got_gates, got_cell = cell_backward(gates, cell, hidden_cotangent, cell_cotangent)
  for got, expected in zip((*got_gates, got_cell), (*expected_gates, expected_cell), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cell_forward_takes_the_activations_it_is_given():
  # Stand-ins easy to follow by hand: sigmoid(x) = x, tanh(x) = 2x.
  pre_activations = tuple(jnp.array([value]) for value in (1.0, 2.0, 3.0, 4.0))
  gates, cell, hidden = cell_forward(
    pre_activations, jnp.array([5.0]), sigmoid=lambda x: x, tanh=lambda x: 2 * x
  )
  assert [float(gate[0]) for gate in gates] == [1.0, 2.0, 6.0, 4.0]
  assert float(cell[0]) == 2.0 * 5.0 + 1.0 * 6.0  # forget * cell + input * cell input
  assert float(hidden[0]) == 4.0 * 2 * 16.0  # output * tanh(cell)


def test_cell_backward_uses_the_tanh_it_is_given():
  gates = tuple(jnp.array([value]) for value in (0.5, 0.25, 0.5, 0.75))
  previous_cell, hidden_cotangent, cell_cotangent = (jnp.array([v]) for v in (2.0, 1.0, 0.0))
  # With tanh(x) = x the new cell 0.25 * 2 + 0.5 * 0.5 = 0.75 is its own tanh: the cell's
  # cotangent is 1 * 0.75 * (1 - 0.75^2) and the output gate's 1 * 0.75 * 0.75 * (1 - 0.75).
  pre_activation_cotangents, previous_cell_cotangent = cell_backward(
    gates, previous_cell, hidden_cotangent, cell_cotangent, tanh=lambda x: x
  )
  cell_cotangent = 0.75 * (1 - 0.75**2)
  assert float(pre_activation_cotangents[3][0]) == pytest.approx(0.75 * 0.75 * 0.25)
  assert float(pre_activation_cotangents[0][0]) == pytest.approx(cell_cotangent * 0.5 * 0.5 * 0.5)
  assert float(previous_cell_cotangent[0]) == pytest.approx(cell_cotangent * 0.25)
