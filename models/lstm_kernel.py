"""The LSTM recurrence as two fused Pallas kernels (GPU, Triton lowering): one launch per pass.

`lstm_recurrence_kernel(projected, recurrent_kernel, config)` computes what
`models.lstm.lstm_recurrence` computes, and has the same gradient structure, but each pass over
time is one kernel launch instead of a `lax.scan` whose every step is several small launches plus
the loop's own overhead (on an H200 that overhead, not arithmetic, is what a step costs: the
persistent-RNN idea of Diamos et al., ICML 2016, and FlashRNN, Beck et al. 2024).

- Forward: the grid is (direction, batch tile). A program loops over all frames holding `h` and
  `c` on chip, with its direction's four `[hidden, hidden]` gate blocks of the recurrent kernel
  loaded once before the loop (`weights_resident`) or read at every frame; per frame it reads the
  precomputed input projection, does four `[tile, hidden] @ [hidden, hidden]` dots and the gate
  nonlinearities, and writes the hidden state, the activated gates and the previous cell (the
  residuals of the backward pass).
- Backward: the same grid, frames in reverse; per frame the gate-preactivation cotangents and one
  `dz @ W^T` per gate. The recurrent kernel's gradient is one matmul over all frames afterwards, as
  in `lstm_recurrence`'s hand-written gradient.

`KernelConfig` holds the launch variants the tuning table times (experiments/benchmark_step.py
`--tune`): weights held on chip or re-read, the next frame's inputs prefetched, the activations as
the hardware's approximate tanh.

Shapes Triton cannot tile are padded in the wrapper: the batch to a multiple of the tile, the
hidden size to a power of two (at least 16). Padded hidden units have zero weights, projections
and cotangents, so they stay exactly zero and change nothing. On the CPU the kernels run with
`interpret=True` (the tests compare them with the scan there).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.batch_sharding import over_batch_shards
from models.lstm_cell import cell_backward, cell_forward

NUM_GATES = 4


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch parameters of the recurrence kernels (static: each value compiles its own kernel).

  Attributes:
    batch_tile: sequences per program (a power of two, >= 16: Triton's smallest dot).
    num_warps: warps per program.
    weights_resident: load the recurrent kernel once before the time loop (True) or re-read it
      from memory (L1/L2) at every frame.
    num_stages: Triton's software-pipelining depth of the loop's loads.
    prefetch: read the next frame's inputs (projections; gates, cells and cotangents backward) at
      the start of a frame, so their memory latency overlaps this frame's dots instead of adding
      to every frame's (registers, not Triton's shared-memory stages, which the resident weights
      leave no room for).
    approx_activations: the gates' sigmoids and tanhs each as one hardware `tanh.approx.f32`
      (relative error about 2^-11; the sigmoid's, sigmoid(x) = (1 + tanh(x / 2)) / 2, about
      2^-12 absolute), instead of libdevice's `tanhf` and an exp and an exact division per
      sigmoid: fewer instructions on every frame's critical path (`_activations`).
    interpret: run the kernels with Pallas's interpreter (CPU tests).
  """

  batch_tile: int = 16
  num_warps: int = 8
  weights_resident: bool = False
  num_stages: int = 1
  prefetch: bool = False
  approx_activations: bool = False
  interpret: bool = False

  def describe(self) -> str:
    """The launch in words, as the tuning table and the trainer's plan print name it."""
    return (
      f"tile {self.batch_tile}, {self.num_warps} warps, weights "
      f"{'resident' if self.weights_resident else 're-read'}, {self.num_stages} stage(s)"
      f"{', prefetch' if self.prefetch else ''}"
      f"{', approx. activations' if self.approx_activations else ''}"
    )

  def __post_init__(self):
    tile = self.batch_tile
    if tile < 16 or tile & (tile - 1):
      raise ValueError(f"kernel batch_tile must be a power of two of at least 16, got {tile}")


# The fields a config sets (`config.model.kernel`), as against `interpret`, which the backend sets.
LAUNCH_FIELDS = tuple(
  field.name for field in dataclasses.fields(KernelConfig) if field.name != "interpret"
)


def padded_hidden_size(hidden_size: int) -> int:
  """The hidden size the kernels run at: a power of two, at least 16."""
  return max(16, pl.next_power_of_2(hidden_size))


def _pad_gate_axis(array: jax.Array, hidden: int, padded: int) -> jax.Array:
  """`[..., 4 * hidden]` -> `[..., 4 * padded]`, each gate's block zero-padded on its own."""
  if hidden == padded:
    return array
  blocks = array.reshape(*array.shape[:-1], NUM_GATES, hidden)
  widths = [(0, 0)] * (blocks.ndim - 1) + [(0, padded - hidden)]
  return jnp.pad(blocks, widths).reshape(*array.shape[:-1], NUM_GATES * padded)


def _unpad_gate_axis(array: jax.Array, hidden: int, padded: int) -> jax.Array:
  if hidden == padded:
    return array
  blocks = array.reshape(*array.shape[:-1], NUM_GATES, padded)[..., :hidden]
  return blocks.reshape(*array.shape[:-1], NUM_GATES * hidden)


def _gate_weights(kernel_ref, hidden: int) -> list:
  """The four `[hidden, hidden]` gate blocks of one direction's recurrent kernel."""
  return [kernel_ref[:, gate * hidden : (gate + 1) * hidden] for gate in range(NUM_GATES)]


def _gate_block(ref, t: int, gate: int) -> jax.Array:
  """Frame t's block of one gate in `ref [time, tile, 4 * hidden]`: `[tile, hidden]`."""
  hidden = ref.shape[-1] // NUM_GATES
  return ref[t, :, gate * hidden : (gate + 1) * hidden]


def _activations(config: KernelConfig) -> tuple[Callable, Callable]:
  """The kernels' (sigmoid, tanh). Pallas lowers `jnp.tanh` to libdevice's `tanhf` and a sigmoid
  to an exp and an exact division; `approx_activations` computes both through one tanh each, the
  GPU's `tanh.approx.f32` (the interpreter, which has no PTX, computes the same formulas with
  `jnp.tanh`)."""
  if not config.approx_activations:
    return jax.nn.sigmoid, jnp.tanh
  tanh = jnp.tanh if config.interpret else plgpu.approx_tanh
  return (lambda x: 0.5 + 0.5 * tanh(0.5 * x)), tanh


def _time_loop(time: int, read, body, init, *, reverse: bool, prefetch: bool) -> None:
  """`carry = body(t, loads, carry)` for every frame t, in reverse if asked, where `read(t)` is
  the frame's input loads as functions of no arguments and `loads` returns them by index.

  Without `prefetch` a load runs where `body` asks for it, in the order the kernel is written in.
  On one H200 the float32 kernel that re-reads its weights ran a layer in 16.6 ms with its loads
  there, in 38.6 ms the next day with every frame read first (nothing else it gave Triton had
  changed), and in 16.5 again once they were back there. With `prefetch`, frame t's loads run at
  the start of the frame before it, carried to t's `body`."""

  def frame(i):
    return time - 1 - i if reverse else i

  if not prefetch:

    def step(i, carry):
      t = frame(i)
      loads = read(t)
      return body(t, lambda part: loads[part](), carry)

    jax.lax.fori_loop(0, time, step, init)
    return

  def load_all(t):
    return [load() for load in read(t)]

  def prefetching_step(i, carry):
    state, inputs = carry
    upcoming = load_all(frame(jnp.minimum(i + 1, time - 1)))  # the last frame reads itself again
    return body(frame(i), inputs.__getitem__, state), upcoming

  jax.lax.fori_loop(0, time, prefetching_step, (init, load_all(frame(0))))


def _forward_kernel(
  projected_ref,
  kernel_ref,
  hidden_ref,
  gates_ref,
  previous_cell_ref,
  *,
  config: KernelConfig,
):
  """One (direction, batch tile): `projected_ref [time, tile, 4 * hidden]` -> hidden states
  `[time, tile, hidden]`, activated gates `[time, tile, 4 * hidden]`, previous cells."""
  time, tile, hidden = hidden_ref.shape
  resident = _gate_weights(kernel_ref, hidden) if config.weights_resident else None
  sigmoid, tanh = _activations(config)

  def read(t):
    return [functools.partial(_gate_block, projected_ref, t, gate) for gate in range(NUM_GATES)]

  def step(t, projection, carry):
    cell, hidden_state = carry
    weights = resident if config.weights_resident else _gate_weights(kernel_ref, hidden)
    recurrent_input = hidden_state.astype(kernel_ref.dtype)
    pre_activations = [
      projection(gate) + plgpu.dot(recurrent_input, weights[gate]) for gate in range(NUM_GATES)
    ]
    previous_cell_ref[t] = cell
    gates, cell, hidden_state = cell_forward(pre_activations, cell, sigmoid, tanh)
    hidden_ref[t] = hidden_state.astype(hidden_ref.dtype)
    for gate, value in enumerate(gates):
      gates_ref[t, :, gate * hidden : (gate + 1) * hidden] = value
    return cell, hidden_state

  zeros = jnp.zeros((tile, hidden), jnp.float32)
  _time_loop(time, read, step, (zeros, zeros), reverse=False, prefetch=config.prefetch)


def _backward_kernel(
  kernel_ref,
  gates_ref,
  previous_cell_ref,
  hidden_cotangent_ref,
  projected_cotangent_ref,
  *,
  config: KernelConfig,
):
  """One (direction, batch tile), frames in reverse: -> `[time, tile, 4 * hidden]` cotangents of
  the gate pre-activations (the input projections)."""
  time, tile, hidden = previous_cell_ref.shape
  resident = _gate_weights(kernel_ref, hidden) if config.weights_resident else None
  _, tanh = _activations(config)

  def read(t):
    gates = [functools.partial(_gate_block, gates_ref, t, gate) for gate in range(NUM_GATES)]
    return [*gates, lambda: previous_cell_ref[t], lambda: hidden_cotangent_ref[t]]

  def step(t, load, carry):
    hidden_cotangent, cell_cotangent = carry
    weights = resident if config.weights_resident else _gate_weights(kernel_ref, hidden)
    gates = tuple(load(gate) for gate in range(NUM_GATES))
    previous_cell = load(NUM_GATES)
    hidden_cotangent = hidden_cotangent + load(NUM_GATES + 1).astype(jnp.float32)
    pre_activation_cotangents, previous_cell_cotangent = cell_backward(
      gates, previous_cell, hidden_cotangent, cell_cotangent, tanh
    )
    previous_hidden_cotangent = jnp.zeros((tile, hidden), jnp.float32)
    for gate, value in enumerate(pre_activation_cotangents):
      projected_cotangent_ref[t, :, gate * hidden : (gate + 1) * hidden] = value
      previous_hidden_cotangent += plgpu.dot(
        value.astype(kernel_ref.dtype), weights[gate], trans_b=True
      )
    return previous_hidden_cotangent, previous_cell_cotangent

  zeros = jnp.zeros((tile, hidden), jnp.float32)
  _time_loop(time, read, step, (zeros, zeros), reverse=True, prefetch=config.prefetch)


def _call(kernel, inputs, outputs, config: KernelConfig, name: str):
  """Runs `kernel` over the (direction, batch tile) grid. Every operand is `[directions, time,
  batch, width]` except the recurrent kernel `[directions, hidden, 4 * hidden]`."""
  directions, _, batch, _ = outputs[0].shape
  tile = config.batch_tile

  def spec(shape):
    if len(shape) == 3:  # the recurrent kernel: the whole matrix of the program's direction
      return pl.BlockSpec((None, *shape[1:]), lambda direction, _: (direction, 0, 0))
    return pl.BlockSpec(
      (None, shape[1], tile, shape[3]), lambda direction, tile_index: (direction, 0, tile_index, 0)
    )

  return pl.pallas_call(
    kernel,
    grid=(directions, batch // tile),
    in_specs=[spec(x.shape) for x in inputs],
    out_specs=[spec(x.shape) for x in outputs],
    out_shape=outputs,
    compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
    interpret=config.interpret,
    name=name,
  )(*inputs)


def _forward(projected, recurrent_kernel, config: KernelConfig):
  """Stacked, padded operands -> hidden states, activated gates, previous cells (all padded)."""
  directions, time, batch, gates = projected.shape
  hidden = gates // NUM_GATES
  outputs = (
    jax.ShapeDtypeStruct((directions, time, batch, hidden), recurrent_kernel.dtype),
    jax.ShapeDtypeStruct((directions, time, batch, gates), jnp.float32),
    jax.ShapeDtypeStruct((directions, time, batch, hidden), jnp.float32),
  )
  kernel = functools.partial(_forward_kernel, config=config)
  return _call(kernel, (projected, recurrent_kernel), outputs, config, "lstm_forward")


def _backward(recurrent_kernel, gates, previous_cells, hidden_cotangents, config: KernelConfig):
  outputs = (jax.ShapeDtypeStruct(gates.shape, jnp.float32),)
  kernel = functools.partial(_backward_kernel, config=config)
  inputs = (recurrent_kernel, gates, previous_cells, hidden_cotangents)
  return _call(kernel, inputs, outputs, config, "lstm_backward")[0]


def _pad_operands(projected, recurrent_kernel, config: KernelConfig):
  """Tuple of `[time, batch, 4 * hidden]` -> `[directions, time, padded batch, 4 * padded]`."""
  hidden = recurrent_kernel.shape[1]
  padded = padded_hidden_size(hidden)
  batch = projected[0].shape[1]
  extra_rows = -batch % config.batch_tile
  stacked = _pad_gate_axis(jnp.stack(projected), hidden, padded)
  stacked = jnp.pad(stacked, ((0, 0), (0, 0), (0, extra_rows), (0, 0)))
  padded_kernel = _pad_gate_axis(recurrent_kernel, hidden, padded)
  padded_kernel = jnp.pad(padded_kernel, ((0, 0), (0, padded - hidden), (0, 0)))
  return stacked, padded_kernel


def lstm_recurrence_kernel(
  projected: tuple[jax.Array, ...], recurrent_kernel: jax.Array, config: KernelConfig
) -> tuple[jax.Array, ...]:
  """`models.lstm.lstm_recurrence` with its scan replaced by one kernel launch per pass.

  `projected`: per direction `[time, batch, 4 * hidden]` float32 (input projections plus bias);
  `recurrent_kernel [directions, hidden, 4 * hidden]` -> per direction `[time, batch, hidden]`
  in the kernel's dtype. Under a mesh (`jax.set_mesh`) each device runs both passes on its own
  rows (`models.batch_sharding`), and the recurrent kernel's gradient is summed over devices.
  Reverse-mode only, as `lstm_recurrence`: a `custom_vjp` has no `jax.jvp`.
  """
  batch_dims = (1,) * len(projected)  # time-major
  recurrence = over_batch_shards(
    lambda projected, recurrent_kernel: _lstm_recurrence_kernel(
      projected, recurrent_kernel, config
    ),
    batch_size=projected[0].shape[1],
    in_batch_dims=(batch_dims, None),
    out_batch_dims=batch_dims,
  )
  return recurrence(projected, recurrent_kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lstm_recurrence_kernel(projected, recurrent_kernel, config):
  """`lstm_recurrence_kernel` on the rows it is given, with the hand-written gradient."""
  return _lstm_recurrence_kernel_forward(projected, recurrent_kernel, config)[0]


def _lstm_recurrence_kernel_forward(projected, recurrent_kernel, config):
  batch, hidden = projected[0].shape[1], recurrent_kernel.shape[1]
  stacked, padded_kernel = _pad_operands(projected, recurrent_kernel, config)
  hidden_states, gates, previous_cells = _forward(stacked, padded_kernel, config)
  outputs = tuple(hidden_states[:, :, :batch, :hidden])
  return outputs, (padded_kernel, hidden_states, gates, previous_cells)


def _lstm_recurrence_kernel_backward(config, residuals, hidden_cotangents):
  padded_kernel, hidden_states, gates, previous_cells = residuals
  _, _, padded_batch, padded = hidden_states.shape
  _, batch, hidden = hidden_cotangents[0].shape
  cotangents = jnp.pad(
    jnp.stack(hidden_cotangents).astype(hidden_states.dtype),
    ((0, 0), (0, 0), (0, padded_batch - batch), (0, padded - hidden)),
  )
  projected_cotangents = _backward(padded_kernel, gates, previous_cells, cotangents, config)
  # dW = sum_t h_{t-1}^T dz_t: the state before frame 0 is zero, so frame 0 adds nothing.
  kernel_cotangent = jnp.einsum(
    "dtbh,dtbg->dhg",
    hidden_states[:, :-1],
    projected_cotangents[:, 1:].astype(hidden_states.dtype),
    preferred_element_type=jnp.float32,
  )
  kernel_cotangent = _unpad_gate_axis(kernel_cotangent[:, :hidden], hidden, padded)
  projected_cotangents = _unpad_gate_axis(projected_cotangents[:, :, :batch], hidden, padded)
  return tuple(projected_cotangents), kernel_cotangent.astype(padded_kernel.dtype)


_lstm_recurrence_kernel.defvjp(_lstm_recurrence_kernel_forward, _lstm_recurrence_kernel_backward)
