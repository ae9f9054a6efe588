"""LSTM layers and the LSTM-CTC acoustic model, written for speed on long padded sequences.

Layout: inputs are batch-major, `inputs [batch, time, features]` with `input_paddings [batch, time]`
(1.0 = padded). Every sequence is right-padded: its valid frames are `0 .. length - 1`.

Why a hand-written layer rather than `nn.RNN(nn.OptimizedLSTMCell)`:
- the input projection of all timesteps (and both directions) is one large matmul outside the
  recurrence, so the sequential scan body only does `h @ W_h` and the fused gate nonlinearities;
- both directions of a bidirectional layer run in the same scan, halving the sequential steps;
- no per-step masking: the backward direction reverses each sequence within its own length, so in
  both directions the padded frames come after every valid frame and cannot reach a valid output.

This layout is the one accelerators (and cuDNN) favour. On a small CPU it is not a win for a
single layer over narrow features: materialising the `[time, batch, 4 * hidden]` projection and
its gradient costs more memory traffic than the stock cell's per-step matmul, and the gap grows
with `time` (see `experiments/results/benchmark_lstm_cpu.md`); stacked layers break even.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def lengths_from_paddings(paddings: jax.Array) -> jax.Array:
  """Number of valid frames per row: `paddings [batch, time]` -> `[batch]` int32."""
  return jnp.sum(1.0 - paddings, axis=-1).astype(jnp.int32)


def reverse_within_length(sequences: jax.Array, lengths: jax.Array) -> jax.Array:
  """Reverses the first `lengths[b]` frames of each row and leaves its padding in place.

  `sequences [batch, time, ...]`, `lengths [batch]`. The map is its own inverse, so the same call
  puts the backward direction's outputs back in input order.
  """
  time = sequences.shape[1]
  steps = jnp.arange(time)[None, :]
  lengths = lengths[:, None]
  source = jnp.where(steps < lengths, lengths - 1 - steps, steps)
  source = source.reshape(source.shape + (1,) * (sequences.ndim - 2))
  return jnp.take_along_axis(sequences, source, axis=1)


def _per_direction(init: Initializer) -> Initializer:
  """Initialises a `[directions, ...]` parameter as independent per-direction matrices.

  Without this, fan-in and orthogonality would be computed across directions.
  """

  def stacked_init(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, shape[0])
    return jnp.stack([init(direction_key, shape[1:], dtype) for direction_key in keys])

  return stacked_init


class LstmLayer(nn.Module):
  """One LSTM layer, unidirectional or bidirectional, over right-padded sequences.

  Gates are ordered (input, forget, cell, output) as in `nn.OptimizedLSTMCell`; the parameters are
  that cell's, concatenated per direction: `input_kernel [directions, features, 4 * hidden]`,
  `recurrent_kernel [directions, hidden, 4 * hidden]`, `bias [directions, 4 * hidden]`.
  Matmuls run in `dtype` (e.g. bfloat16 on GPU) with float32 accumulation; the gate
  nonlinearities and the cell state stay float32 so long sequences do not drift.

  Attributes:
    hidden_size: units per direction.
    bidirectional: add a direction that reads each sequence backwards within its own length.
    unroll: scan steps unrolled per loop iteration (`jax.lax.scan(unroll=...)`).
    dtype: computation dtype of the matmuls and of the returned activations.
    param_dtype: storage dtype of the parameters.
    kernel_init, recurrent_kernel_init, bias_init: per-direction initialisers, defaulting to
      `nn.OptimizedLSTMCell`'s (lecun normal, orthogonal, zeros).
  """

  hidden_size: int
  bidirectional: bool = False
  unroll: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array, input_paddings: jax.Array) -> jax.Array:
    """`inputs [batch, time, features]`, `input_paddings [batch, time]` ->
    `[batch, time, directions * hidden]`, zero at padded frames."""
    directions = 2 if self.bidirectional else 1
    gates = 4 * self.hidden_size
    input_kernel = self.param(
      "input_kernel",
      _per_direction(self.kernel_init),
      (directions, inputs.shape[-1], gates),
      self.param_dtype,
    )
    recurrent_kernel = self.param(
      "recurrent_kernel",
      _per_direction(self.recurrent_kernel_init),
      (directions, self.hidden_size, gates),
      self.param_dtype,
    )
    bias = self.param("bias", self.bias_init, (directions, gates), self.param_dtype)

    # One matmul for every timestep and direction: [time, directions, batch, gates].
    projected = (
      jnp.einsum(
        "btf,dfg->tdbg",
        inputs.astype(self.dtype),
        input_kernel.astype(self.dtype),
        preferred_element_type=jnp.float32,
      )
      + bias.astype(jnp.float32)[None, :, None, :]
    )

    lengths = lengths_from_paddings(input_paddings)
    if self.bidirectional:
      backward = reverse_within_length(jnp.swapaxes(projected[:, 1], 0, 1), lengths)
      projected = projected.at[:, 1].set(jnp.swapaxes(backward, 0, 1))

    hidden_states = self._recurrence(projected, recurrent_kernel.astype(self.dtype))

    # [time, directions, batch, hidden] -> [batch, time, directions, hidden]
    hidden_states = jnp.transpose(hidden_states, (2, 0, 1, 3))
    if self.bidirectional:
      backward = reverse_within_length(hidden_states[:, :, 1], lengths)
      hidden_states = jnp.stack([hidden_states[:, :, 0], backward], axis=2)
    batch, time = inputs.shape[:2]
    outputs = hidden_states.reshape(batch, time, directions * self.hidden_size)
    return jnp.where(input_paddings[..., None] > 0, jnp.zeros_like(outputs), outputs)

  def _recurrence(self, projected: jax.Array, recurrent_kernel: jax.Array) -> jax.Array:
    """Runs the LSTM recurrence: `projected [time, directions, batch, 4 * hidden]` (float32) ->
    hidden states `[time, directions, batch, hidden]` in `dtype`."""
    _, directions, batch, _ = projected.shape
    zeros = jnp.zeros((directions, batch, self.hidden_size), jnp.float32)

    def step(carry, projected_step):
      cell, hidden = carry
      pre_activations = projected_step + jnp.einsum(
        "dbh,dhg->dbg",
        hidden.astype(self.dtype),
        recurrent_kernel,
        preferred_element_type=jnp.float32,
      )
      input_gate, forget_gate, cell_input, output_gate = jnp.split(pre_activations, 4, axis=-1)
      cell = jax.nn.sigmoid(forget_gate) * cell + jax.nn.sigmoid(input_gate) * jnp.tanh(cell_input)
      hidden = jax.nn.sigmoid(output_gate) * jnp.tanh(cell)
      return (cell, hidden), hidden.astype(self.dtype)

    _, hidden_states = jax.lax.scan(step, (zeros, zeros), projected, unroll=self.unroll)
    return hidden_states


class LstmCtcModel(nn.Module):
  """Stacked (B)LSTM with a per-frame projection to `num_classes` CTC logits (class 0 = blank).

  inputs -> [Dense(input_projection_size)] -> num_layers x (LstmLayer -> Dropout) -> Dense.
  Padded input frames are zeroed on entry and every LSTM layer zeroes its padded outputs, so no
  valid logit depends on what padding holds. Logits at padded frames are not meaningful; the CTC
  loss and decoder ignore them.

  Attributes:
    num_classes: alphabet size plus one for the blank.
    num_layers: stacked LSTM layers.
    hidden_size: units per direction in each layer.
    bidirectional: BLSTM layers (the paper's model) instead of forward-only LSTMs.
    dropout_rate: dropout on every LSTM layer's output when `train=True`.
    input_projection_size: width of an optional Dense layer applied to the features first.
    unroll: scan unroll of every LSTM layer.
    dtype: computation dtype; logits are always returned as float32.
  """

  num_classes: int
  num_layers: int
  hidden_size: int
  bidirectional: bool = True
  dropout_rate: float = 0.0
  input_projection_size: int | None = None
  unroll: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, inputs: jax.Array, input_paddings: jax.Array, train: bool = False
  ) -> jax.Array:
    """`inputs [batch, time, features]`, `input_paddings [batch, time]` ->
    logits `[batch, time, num_classes]` float32. `train=True` needs a `dropout` rng."""
    activations = jnp.where(input_paddings[..., None] > 0, 0.0, inputs)
    if self.input_projection_size is not None:
      activations = nn.Dense(self.input_projection_size, dtype=self.dtype, name="input_projection")(
        activations
      )
    for layer in range(self.num_layers):
      activations = LstmLayer(
        self.hidden_size,
        bidirectional=self.bidirectional,
        unroll=self.unroll,
        dtype=self.dtype,
        name=f"lstm_{layer}",
      )(activations, input_paddings)
      activations = nn.Dropout(self.dropout_rate, deterministic=not train)(activations)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="output_projection")(activations)
    return logits.astype(jnp.float32)
