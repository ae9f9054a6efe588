"""CTC loss whose time recursion runs in one Pallas (Triton) kernel launch per direction.

`optax.ctc_loss` is a `lax.scan` over frames: on a GPU every frame costs several small kernel
launches, forward and again in its autodiff backward, so a 608-frame bucket is latency-bound. Here
plain XLA does the cheap, parallel parts (log-softmax, the per-state emission gather, the
transition tables) and autodiffs them; a `jax.custom_vjp` hands the recursion to two kernels:

- `_alpha_kernel` runs the forward (alpha) recursion over every frame in one `fori_loop` and
  writes alpha `[batch, time + 1, _SLACK + states]` (the slack first: alpha reads states s - 1
  and s - 2) and the log-likelihood `[batch]`;
- `_beta_kernel` runs the backward (beta) recursion from the last frame down and writes the
  gradient w.r.t. the emissions, `cotangent * exp(alpha + beta - loglik)`, as it goes.

States are CTC's extended label sequence (blank, l1, blank, l2, ..., blank): state 2n is the blank
after n labels, state 2n+1 is label n+1; they are padded to a power of two (Triton needs
power-of-two register arrays). A Triton register array cannot be shifted, so each step stores its
row to global memory, synchronises the block (`debug_barrier`) and loads it back at offsets 1 and
2, masked at the edges.

The transition weights reproduce `optax.ctc_loss` exactly, `log_epsilon` included: optax starts
every state but the first at `log_epsilon` (so an unalignable target costs about
`-log_epsilon`), penalises the blank-skipping move between equal labels by `log_epsilon` instead
of forbidding it, and passes alpha through padded frames unchanged.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.batch_sharding import over_batch_shards

# "No transition" in log space: finite, so that `x - max` never meets inf - inf; exp() of it is 0.
_NEG = -1e30
# Extra columns beside each stored row, so that the shifted loads stay inside the array. Two are
# needed; four keep rows 16-byte aligned, so that Triton stores them in the layout it computes
# them in (with two it converted the layout through shared memory, two more barriers, every step).
_SLACK = 4


def _logsumexp3(first: jax.Array, second: jax.Array, third: jax.Array) -> jax.Array:
  largest = jnp.maximum(jnp.maximum(first, second), third)
  return largest + jnp.log(
    jnp.exp(first - largest) + jnp.exp(second - largest) + jnp.exp(third - largest)
  )


def _alpha_kernel(
  emissions_ref,
  frame_paddings_ref,
  initial_ref,
  from_previous_ref,
  from_second_previous_ref,
  final_ref,
  loglik_ref,
  alpha_ref,
  *,
  synchronise: bool,
):
  """One batch tile's forward recursion.

  Refs: `emissions [tile, time, states]`, `frame_paddings [tile, time]`, the per-state tables
  `[tile, states]`; out: `loglik [tile]`, `alpha [tile, time + 1, _SLACK + states]` where time
  slot 0 holds the initial alpha and slot t + 1 alpha after frame t, in columns `_SLACK:`.
  """
  tile, time, states = emissions_ref.shape
  state = lax.broadcasted_iota(jnp.int32, (tile, states), 1)
  from_previous = from_previous_ref[...]
  from_second_previous = from_second_previous_ref[...]
  alpha = initial_ref[...]
  alpha_ref[:, 0, pl.ds(_SLACK, states)] = alpha
  if synchronise:
    plgpu.debug_barrier()

  def frame_inputs(frame):
    return emissions_ref[:, frame, :], frame_paddings_ref[:, frame]

  def step(frame, carry):
    alpha, emission, padding = carry
    # Issued a frame ahead, so that their latency is off the chain of dependent steps.
    next_inputs = frame_inputs(jnp.minimum(frame + 1, time - 1))
    previous = plgpu.load(
      alpha_ref.at[:, frame, pl.ds(_SLACK - 1, states)], mask=state >= 1, other=_NEG
    )
    second_previous = plgpu.load(
      alpha_ref.at[:, frame, pl.ds(_SLACK - 2, states)], mask=state >= 2, other=_NEG
    )
    advanced = emission + _logsumexp3(
      alpha, previous + from_previous, second_previous + from_second_previous
    )
    alpha = jnp.where(padding[:, None] > 0, alpha, advanced)
    alpha_ref[:, frame + 1, pl.ds(_SLACK, states)] = alpha
    if synchronise:
      plgpu.debug_barrier()
    return alpha, *next_inputs

  alpha, _, _ = lax.fori_loop(0, time, step, (alpha, *frame_inputs(0)))
  ending = alpha + final_ref[...]
  largest = jnp.max(ending, axis=1)
  loglik_ref[...] = largest + jnp.log(jnp.sum(jnp.exp(ending - largest[:, None]), axis=1))


def _beta_kernel(
  emissions_ref,
  frame_paddings_ref,
  alpha_ref,
  to_next_ref,
  to_second_next_ref,
  final_ref,
  loglik_ref,
  cotangent_ref,
  emissions_grad_ref,
  scratch_ref,
  *,
  synchronise: bool,
):
  """One batch tile's backward recursion and the gradient w.r.t. the emissions.

  beta after frame t excludes frame t's emission, so `alpha + beta - loglik` is the log posterior
  of each state at frame t. Refs: as `_alpha_kernel`, plus `loglik, cotangent [tile]`; out:
  `emissions_grad [tile, time, states]` and `scratch [tile, 2, states + _SLACK]`, a double buffer
  for the shifted loads (a step never overwrites the row that others may still be reading).
  """
  tile, time, states = emissions_ref.shape
  state = lax.broadcasted_iota(jnp.int32, (tile, states), 1)
  to_next = to_next_ref[...]
  to_second_next = to_second_next_ref[...]
  loglik = loglik_ref[...][:, None]
  cotangent = cotangent_ref[...][:, None]

  def frame_inputs(frame):
    return (
      emissions_ref[:, frame, :],
      frame_paddings_ref[:, frame],
      alpha_ref[:, frame + 1, pl.ds(_SLACK, states)],
    )

  def step(step_index, carry):
    beta, emission, padding, alpha = carry
    frame = time - 1 - step_index
    # Issued a frame ahead, so that their latency is off the chain of dependent steps.
    next_inputs = frame_inputs(jnp.maximum(frame - 1, 0))
    padded = padding[:, None] > 0
    posterior = jnp.exp(alpha + beta - loglik)
    emissions_grad_ref[:, frame, :] = jnp.where(padded, 0.0, cotangent * posterior)
    entering = beta + emission
    buffer = lax.rem(step_index, 2)
    scratch_ref[:, buffer, pl.ds(0, states)] = entering
    if synchronise:
      plgpu.debug_barrier()
    following = plgpu.load(
      scratch_ref.at[:, buffer, pl.ds(1, states)], mask=state < states - 1, other=_NEG
    )
    second_following = plgpu.load(
      scratch_ref.at[:, buffer, pl.ds(2, states)], mask=state < states - 2, other=_NEG
    )
    receded = _logsumexp3(entering, following + to_next, second_following + to_second_next)
    return jnp.where(padded, beta, receded), *next_inputs

  lax.fori_loop(0, time, step, (final_ref[...], *frame_inputs(time - 1)))


def _tile_specs(tile: int, *trailing_shapes: tuple[int, ...]) -> list[pl.BlockSpec]:
  """BlockSpecs that give each program `tile` batch rows and the whole of the other axes."""

  def spec(shape):
    return pl.BlockSpec((tile, *shape), lambda row: (row,) + (0,) * len(shape))

  return [spec(shape) for shape in trailing_shapes]


class _Launch(NamedTuple):
  """How the kernels launch: `ctc_loss_kernel`'s keywords of these names (hashable, so static)."""

  batch_tile: int
  num_warps: int
  interpret: bool

  def pallas_call(self, kernel, *, num_rows: int, in_specs, out_specs, out_shape, name: str):
    """`pl.pallas_call` over a grid of `num_rows / batch_tile` programs, one batch tile each. On a
    GPU the kernels synchronise the block between storing a row and loading it shifted; the
    interpreter runs a program's steps in order and has no barrier."""
    return pl.pallas_call(
      functools.partial(kernel, synchronise=not self.interpret),
      grid=(num_rows // self.batch_tile,),
      in_specs=_tile_specs(self.batch_tile, *in_specs),
      out_specs=_tile_specs(self.batch_tile, *out_specs),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=self.num_warps, num_stages=1),
      interpret=self.interpret,
      name=name,
    )


def _alpha_call(emissions, frame_paddings, tables, launch: _Launch):
  batch, time, states = emissions.shape
  return launch.pallas_call(
    _alpha_kernel,
    num_rows=batch,
    in_specs=[(time, states), (time,), *[(states,)] * 4],
    out_specs=[(), (time + 1, _SLACK + states)],
    out_shape=[
      jax.ShapeDtypeStruct((batch,), jnp.float32),
      jax.ShapeDtypeStruct((batch, time + 1, _SLACK + states), jnp.float32),
    ],
    name="ctc_alpha",
  )(
    emissions,
    frame_paddings,
    tables.initial,
    tables.from_previous,
    tables.from_second_previous,
    tables.final,
  )


def _beta_call(emissions, frame_paddings, alpha, tables, loglik, cotangent, launch: _Launch):
  batch, time, states = emissions.shape
  emissions_grad, _ = launch.pallas_call(
    _beta_kernel,
    num_rows=batch,
    in_specs=[(time, states), (time,), (time + 1, _SLACK + states), *[(states,)] * 3, (), ()],
    out_specs=[(time, states), (2, states + _SLACK)],
    out_shape=[
      jax.ShapeDtypeStruct((batch, time, states), jnp.float32),
      jax.ShapeDtypeStruct((batch, 2, states + _SLACK), jnp.float32),
    ],
    name="ctc_beta",
  )(
    emissions,
    frame_paddings,
    alpha,
    tables.to_next,
    tables.to_second_next,
    tables.final,
    loglik,
    cotangent,
  )
  return emissions_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loglik(emissions, frame_paddings, tables, launch: _Launch):
  """`log p(labels)` per row, `[batch]`, from `emissions [batch, time, states]`."""
  return _loglik_fwd(emissions, frame_paddings, tables, launch)[0]


def _loglik_fwd(emissions, frame_paddings, tables, launch):
  loglik, alpha = _alpha_call(emissions, frame_paddings, tables, launch)
  return loglik, (emissions, frame_paddings, tables, alpha, loglik)


def _loglik_bwd(launch, residuals, cotangent):
  emissions, frame_paddings, tables, alpha, loglik = residuals
  emissions_grad = _beta_call(emissions, frame_paddings, alpha, tables, loglik, cotangent, launch)
  return emissions_grad, None, None


_loglik.defvjp(_loglik_fwd, _loglik_bwd)


class _Transitions(NamedTuple):
  """Per-row, per-state log weights of the CTC graph, each `[batch, states]`."""

  initial: jax.Array  # alpha before the first frame
  from_previous: jax.Array  # the move into state s from s - 1
  from_second_previous: jax.Array  # ... and from s - 2
  final: jax.Array  # 0 where a path may end, `_NEG` elsewhere
  to_next: jax.Array  # the move out of s to s + 1 (from_previous indexed by where it starts)
  to_second_next: jax.Array  # ... and to s + 2: the beta recursion's view of the same moves


def _transition_tables(labels, label_paddings, states, log_epsilon) -> _Transitions:
  """The CTC graph's `_Transitions` for these labels, as `optax.ctc_loss` weighs its moves."""
  batch, label_time = labels.shape
  label_lengths = label_time - jnp.sum(label_paddings, axis=1).astype(jnp.int32)
  state = jnp.arange(states)[None, :]
  is_label = state % 2 == 1
  # optax compares raw label slots, padded ones included; those only reach unusable states.
  repeats = jnp.pad((labels[:, :-1] == labels[:, 1:]).astype(jnp.float32), ((0, 0), (1, 0)))
  label_index = jnp.minimum(state // 2, label_time - 1)
  repeat_before = jnp.take_along_axis(repeats, jnp.broadcast_to(label_index, (batch, states)), 1)
  log_epsilon = jnp.asarray(log_epsilon, jnp.float32)
  # optax reaches a blank from the label before it by two moves, one of them penalised.
  from_previous = jnp.where(is_label, 0.0, jax.nn.softplus(log_epsilon))
  from_previous = jnp.where(state >= 1, from_previous, _NEG) * jnp.ones((batch, 1))
  from_second_previous = jnp.where(is_label & (state >= 3), log_epsilon * repeat_before, _NEG)
  initial = jnp.where(state == 0, 0.0, log_epsilon) * jnp.ones((batch, 1))
  last = 2 * label_lengths[:, None]
  final = jnp.where((state == last) | (state == last - 1), 0.0, _NEG)

  def moved_back(table):
    return jnp.pad(table[:, 1:], ((0, 0), (0, 1)), constant_values=_NEG)

  return _Transitions(
    initial=initial,
    from_previous=from_previous,
    from_second_previous=from_second_previous,
    final=final,
    to_next=moved_back(from_previous),
    to_second_next=moved_back(moved_back(from_second_previous)),
  )


def _state_classes(labels, states, blank_id):
  """Class of each extended state, `[batch, states]`: the blank at even states and past the end."""
  batch, label_time = labels.shape
  state = jnp.arange(states)[None, :]
  label_index = jnp.minimum(state // 2, label_time - 1)
  at_state = jnp.take_along_axis(labels, jnp.broadcast_to(label_index, (batch, states)), 1)
  return jnp.where((state % 2 == 1) & (state < 2 * label_time + 1), at_state, blank_id)


def ctc_loss_kernel(
  logits: jax.Array,
  logit_paddings: jax.Array,
  labels: jax.Array,
  label_paddings: jax.Array,
  *,
  blank_id: int = 0,
  log_epsilon: float = -1e5,
  batch_tile: int = 1,
  num_warps: int = 2,
  interpret: bool = False,
) -> jax.Array:
  """`optax.ctc_loss` with the recursion over time in two Pallas kernels (forward, backward).

  Same arguments and result as `optax.ctc_loss`, computed in float32: `logits [batch, time,
  num_classes]`, `logit_paddings [batch, time]` (1.0 = padded frame, skipped wherever it lies),
  `labels [batch, label_time]` int32 and right-padded `label_paddings [batch, label_time]`;
  returns the per-example negative log-likelihood `[batch]`. Differentiable w.r.t. `logits`.

  `batch_tile` (a power of two) rows share one program of the grid and `num_warps` warps: fewer
  rows per program means more programs in flight and less work per step of the sequential loop;
  the batch is padded to a multiple of the tile. `interpret=True` runs on any backend (tests).
  Under a mesh (`jax.set_mesh`) each device computes its own rows (`models.batch_sharding`).
  """
  if batch_tile < 1 or batch_tile & (batch_tile - 1):
    raise ValueError(f"batch_tile must be a power of two, got {batch_tile}")
  per_example_loss = over_batch_shards(
    functools.partial(
      _ctc_loss_kernel,
      blank_id=blank_id,
      log_epsilon=log_epsilon,
      launch=_Launch(batch_tile, num_warps, interpret),
    ),
    batch_size=logits.shape[0],
    in_batch_dims=(0, 0, 0, 0),
    out_batch_dims=0,
  )
  return per_example_loss(logits, logit_paddings, labels, label_paddings)


def _ctc_loss_kernel(
  logits,
  logit_paddings,
  labels,
  label_paddings,
  *,
  blank_id,
  log_epsilon,
  launch: _Launch,
):
  """`ctc_loss_kernel` on the rows it is given."""
  batch, _, _ = logits.shape
  label_time = labels.shape[1]
  filler = -batch % launch.batch_tile
  if filler:
    # Filler rows: every frame padded and no labels, so loglik 0 and no gradient.
    logits = jnp.pad(logits, ((0, filler), (0, 0), (0, 0)))
    logit_paddings = jnp.pad(logit_paddings, ((0, filler), (0, 0)), constant_values=1.0)
    labels = jnp.pad(labels, ((0, filler), (0, 0)))
    label_paddings = jnp.pad(label_paddings, ((0, filler), (0, 0)), constant_values=1.0)
  states = pl.next_power_of_2(2 * label_time + 1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  num_classes = logits.shape[-1]
  state_one_hot = jax.nn.one_hot(_state_classes(labels, states, blank_id), num_classes)
  # A one-hot matmul, not a gather: its transpose is another matmul instead of a scatter-add.
  # HIGHEST keeps the selected log-probabilities exact (no TF32 rounding on GPUs).
  emissions = jnp.einsum("btk,bsk->bts", log_probs, state_one_hot, precision=lax.Precision.HIGHEST)
  tables = _transition_tables(labels, label_paddings, states, log_epsilon)
  loglik = _loglik(emissions, logit_paddings.astype(jnp.float32), tables, launch)
  return -loglik[:batch]
