"""LSTM layers and the LSTM-CTC acoustic model, written for speed on long padded sequences.

Layout: inputs are batch-major, `inputs [batch, time, features]` with `input_paddings [batch, time]`
(1.0 = padded). Every sequence is right-padded: its valid frames are `0 .. length - 1`.

Why a hand-written layer rather than `nn.RNN(nn.OptimizedLSTMCell)`:
- the input projection of all timesteps is one large matmul per direction outside the
  recurrence, so the sequential scan body only does `h @ W_h` and the fused gate nonlinearities;
- both directions of a bidirectional layer run in the same scan, halving the sequential steps;
- no per-step masking: the backward direction reverses each sequence within its own length, so in
  both directions the padded frames come after every valid frame and cannot reach a valid output.

On a 2-core CPU it is level with the stock cell for one layer and faster for three (0.91-1.20x in
`experiments/results/benchmark_lstm_cpu.md`).
A first version lost to the stock cell (0.43x at 1,200 steps): reversing the `[batch, time,
4 * hidden]` projection with a gather (whose autodiff gradient is a scatter-add), a batched
projection einsum whose output XLA transposed twice, and autodiff of the scan, which stores about
twice the needed residuals and adds a `[hidden, batch] @ [batch, 4 * hidden]` weight-gradient
matmul to every backward step. Now: the narrow inputs are reversed instead, and the reversal is
its own gradient (a gather); each direction's projection is a plain time-major matmul; the
recurrence has a hand-written gradient (see `lstm_recurrence`), and on the CPU its scan steps read
inputs sliced by the step before (`_scan`). A static flip of the time axis
with a masked carry was slower than reversing within length in one loaded run, so it is not used.
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.lstm_cell import cell_backward, cell_forward
from models.lstm_kernel import KernelConfig, lstm_recurrence_kernel

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def lengths_from_paddings(paddings: jax.Array) -> jax.Array:
  """Number of valid frames per row: `paddings [batch, time]` -> `[batch]` int32, counted in
  int32 whatever the paddings' dtype (bfloat16 cannot hold a count above 256 exactly)."""
  return jnp.sum(paddings == 0, axis=-1, dtype=jnp.int32)


@jax.custom_vjp
def reverse_within_length(sequences: jax.Array, lengths: jax.Array) -> jax.Array:
  """Reverses the first `lengths[b]` frames of each row and leaves its padding in place.

  `sequences [batch, time, ...]`, `lengths [batch]`. The map is a permutation that is its own
  inverse, so the same call puts the backward direction's outputs back in input order and is its
  own gradient: a gather, not the scatter-add XLA would derive (slow on CPU).
  """
  time = sequences.shape[1]
  steps = jnp.arange(time)[None, :]
  lengths = lengths[:, None]
  source = jnp.where(steps < lengths, lengths - 1 - steps, steps)
  source = source.reshape(source.shape + (1,) * (sequences.ndim - 2))
  return jnp.take_along_axis(sequences, source, axis=1)


def _reverse_within_length_forward(sequences, lengths):
  return reverse_within_length(sequences, lengths), lengths


def _reverse_within_length_backward(lengths, cotangent):
  return reverse_within_length(cotangent, lengths), None


reverse_within_length.defvjp(_reverse_within_length_forward, _reverse_within_length_backward)


def _lstm_step(
  cell: jax.Array, hidden: jax.Array, projected_step: jax.Array, recurrent_kernel: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One step of every direction: `cell, hidden [directions, batch, hidden]` (float32),
  `projected_step [directions, batch, 4 * hidden]` -> new cell, new hidden and the activated gates
  `[directions, batch, 4 * hidden]` (sigmoid, sigmoid, tanh, sigmoid)."""
  pre_activations = projected_step + jnp.einsum(
    "dbh,dhg->dbg",
    hidden.astype(recurrent_kernel.dtype),
    recurrent_kernel,
    preferred_element_type=jnp.float32,
  )
  gates, cell, hidden = cell_forward(tuple(jnp.split(pre_activations, 4, axis=-1)), cell)
  return cell, hidden, jnp.concatenate(gates, axis=-1)


def _initial_state(projected: tuple[jax.Array, ...]) -> jax.Array:
  _, batch, gates = projected[0].shape
  return jnp.zeros((len(projected), batch, gates // 4), jnp.float32)


def _scan(step, init, xs, *, unroll: int, prefetch: bool, reverse: bool = False):
  """`jax.lax.scan(step, init, xs, reverse=reverse, unroll=unroll)`; with `prefetch`, each step
  also slices the next step's `xs` into the carry, and `step` reads the ones sliced before it.

  Why: sliced where they are used, XLA's CPU fuses the slice into the step's elementwise work, and
  on the 2-core CPU that fusion took 53 us a step instead of 7 (one LSTM 128, batch 32, profiled);
  fed from the carry, the slice is a copy of its own (5 us)."""
  if not prefetch:
    return jax.lax.scan(step, init, xs, reverse=reverse, unroll=unroll)
  length = jax.tree.leaves(xs)[0].shape[0]

  def prefetching_step(carry, index):
    inner, current = carry
    next_index = jnp.clip(index - 1 if reverse else index + 1, 0, length - 1)
    next_inputs = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, next_index, 0, False), xs)
    inner, outputs = step(inner, current)
    return (inner, next_inputs), outputs

  first = jax.tree.map(lambda x: x[length - 1 if reverse else 0], xs)
  (final, _), outputs = jax.lax.scan(
    prefetching_step, (init, first), jnp.arange(length), reverse=reverse, unroll=unroll
  )
  return final, outputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lstm_recurrence(
  projected: tuple[jax.Array, ...],
  recurrent_kernel: jax.Array,
  unroll: int,
  prefetch: bool = False,
) -> tuple[jax.Array, ...]:
  """The LSTM recurrence of every direction from zero state, in one scan.

  `projected`: per direction, the input projections plus bias `[time, batch, 4 * hidden]`
  (float32); `recurrent_kernel [directions, hidden, 4 * hidden]` -> per direction, the hidden
  states `[time, batch, hidden]` in the kernel's dtype. Directions travel as separate time-major
  arrays so that neither the input projection nor its gradient needs a transpose.

  The gradient is written by hand, as cuDNN does: the reverse scan does one `[batch, 4 * hidden] @
  [4 * hidden, hidden]` matmul per step and keeps only the activated gates and the previous state;
  the recurrent kernel's gradient is one matmul over all steps afterwards. Autodiff of the scan
  adds a small weight-gradient matmul to every step and stores about twice the residuals.
  Being a `custom_vjp`, it has no forward-mode derivative (`jax.jvp`, Hessian-vector products).
  `unroll` and `prefetch` shape both scans' loops (`_scan`), not what they compute.
  """

  # Undifferentiated, XLA drops the residuals the forward pass also returns.
  return _lstm_recurrence_forward(projected, recurrent_kernel, unroll, prefetch)[0]


def _lstm_recurrence_forward(projected, recurrent_kernel, unroll, prefetch):
  def step(carry, projected_step):
    previous_cell, _ = carry
    cell, hidden, gates = _lstm_step(*carry, jnp.stack(projected_step), recurrent_kernel)
    outputs = tuple(hidden.astype(recurrent_kernel.dtype))
    return (cell, hidden), (outputs, gates, previous_cell)

  zeros = _initial_state(projected)
  _, (hidden_states, gates, previous_cells) = _scan(
    step, (zeros, zeros), projected, unroll=unroll, prefetch=prefetch
  )
  return hidden_states, (recurrent_kernel, hidden_states, gates, previous_cells)


def _lstm_recurrence_backward(unroll, prefetch, residuals, hidden_cotangents):
  recurrent_kernel, hidden_states, gates, previous_cells = residuals
  transposed_kernel = jnp.swapaxes(recurrent_kernel, 1, 2)

  def step(carry, inputs):
    hidden_cotangent, cell_cotangent = carry
    output_cotangent, step_gates, previous_cell = inputs
    hidden_cotangent = hidden_cotangent + jnp.stack(output_cotangent).astype(jnp.float32)
    gate_cotangents, previous_cell_cotangent = cell_backward(
      tuple(jnp.split(step_gates, 4, axis=-1)), previous_cell, hidden_cotangent, cell_cotangent
    )
    pre_activation_cotangents = jnp.concatenate(gate_cotangents, axis=-1)
    previous_hidden_cotangent = jnp.einsum(
      "dbg,dgh->dbh",
      pre_activation_cotangents.astype(recurrent_kernel.dtype),
      transposed_kernel,
      preferred_element_type=jnp.float32,
    )
    carry = (previous_hidden_cotangent, previous_cell_cotangent)
    return carry, tuple(pre_activation_cotangents)

  zeros = jnp.zeros_like(previous_cells[0])
  _, projected_cotangents = _scan(
    step,
    (zeros, zeros),
    (hidden_cotangents, gates, previous_cells),
    unroll=unroll,
    prefetch=prefetch,
    reverse=True,
  )
  # Step t's pre-activations saw the hidden state of step t - 1 (zero at t = 0): the kernel's
  # gradient pairs each step's cotangent with the state before it, a prefix of the saved states.
  kernel_cotangent = jnp.stack(
    [
      jnp.einsum(
        "tbh,tbg->hg",
        states[:-1],
        projected_cotangent[1:].astype(recurrent_kernel.dtype),
        preferred_element_type=jnp.float32,
      )
      for states, projected_cotangent in zip(hidden_states, projected_cotangents, strict=True)
    ]
  )
  return projected_cotangents, kernel_cotangent.astype(recurrent_kernel.dtype)


lstm_recurrence.defvjp(_lstm_recurrence_forward, _lstm_recurrence_backward)


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
    implementation: how the recurrence runs: "scan" (`lstm_recurrence`, `jax.lax.scan`) or
      "pallas" (`models.lstm_kernel`, one fused kernel launch per pass; GPU, or the Pallas
      interpreter elsewhere). Both compute the same function and gradient.
    unroll: scan steps unrolled per loop iteration (`jax.lax.scan(unroll=...)`); "scan" only.
    prefetch: each scan step slices the next step's inputs (see `_scan`; faster on the CPU);
      "scan" only.
    kernel_config: launch parameters of the "pallas" kernels.
    dtype: computation dtype of the matmuls and of the returned activations.
    param_dtype: storage dtype of the parameters.
    kernel_init, recurrent_kernel_init, bias_init: per-direction initialisers: lecun normal,
      orthogonal and zeros. Orthogonal applies to a direction's whole `[hidden, 4 * hidden]`
      recurrent kernel, whose rows come out orthonormal (Keras's LSTM does the same); every
      committed result trained from it. `nn.OptimizedLSTMCell` instead makes each gate's
      `[hidden, hidden]` block orthogonal, entries twice as large.
  """

  hidden_size: int
  bidirectional: bool = False
  implementation: str = "scan"
  unroll: int = 1
  prefetch: bool = False
  kernel_config: KernelConfig = KernelConfig()
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

    # The backward direction reads each sequence reversed within its length; reversing the narrow
    # inputs is cheaper than reversing their 4 * hidden wide projection.
    lengths = lengths_from_paddings(input_paddings)
    inputs = inputs.astype(self.dtype)
    directional_inputs = [inputs]
    if self.bidirectional:
      directional_inputs.append(reverse_within_length(inputs, lengths))
    # One matmul for every timestep of a direction: [time, batch, gates].
    projected = tuple(
      jnp.einsum(
        "tbf,fg->tbg",
        jnp.swapaxes(direction_inputs, 0, 1),
        input_kernel[direction].astype(self.dtype),
        preferred_element_type=jnp.float32,
      )
      + bias[direction].astype(jnp.float32)
      for direction, direction_inputs in enumerate(directional_inputs)
    )
    recurrent_kernel = recurrent_kernel.astype(self.dtype)
    if self.implementation == "pallas":
      time_major_states = lstm_recurrence_kernel(projected, recurrent_kernel, self.kernel_config)
    elif self.implementation == "scan":
      time_major_states = lstm_recurrence(projected, recurrent_kernel, self.unroll, self.prefetch)
    else:
      raise ValueError(f'implementation must be "scan" or "pallas", got {self.implementation!r}')
    hidden_states = [jnp.swapaxes(states, 0, 1) for states in time_major_states]
    if self.bidirectional:
      hidden_states[1] = reverse_within_length(hidden_states[1], lengths)
    outputs = jnp.concatenate(hidden_states, axis=-1)
    return jnp.where(input_paddings[..., None] > 0, jnp.zeros_like(outputs), outputs)


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
    lstm_implementation: "scan" or "pallas" (see `LstmLayer`).
    unroll: scan unroll of every LSTM layer.
    scan_prefetch: every LSTM layer's scan steps slice the next step's inputs (`LstmLayer`).
    kernel_config: launch parameters of the "pallas" recurrence.
    dtype: computation dtype; logits are always returned as float32.
  """

  num_classes: int
  num_layers: int
  hidden_size: int
  bidirectional: bool = True
  dropout_rate: float = 0.0
  input_projection_size: int | None = None
  lstm_implementation: str = "scan"
  unroll: int = 1
  scan_prefetch: bool = False
  kernel_config: KernelConfig = KernelConfig()
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
        implementation=self.lstm_implementation,
        unroll=self.unroll,
        prefetch=self.scan_prefetch,
        kernel_config=self.kernel_config,
        dtype=self.dtype,
        name=f"lstm_{layer}",
      )(activations, input_paddings)
      activations = nn.Dropout(self.dropout_rate, deterministic=not train)(activations)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="output_projection")(activations)
    return logits.astype(jnp.float32)
