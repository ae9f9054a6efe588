"""The Pallas CTC kernel against `optax.ctc_loss` and brute force, in interpret mode on the CPU."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.ctc_kernel import ctc_loss_kernel
from tests.test_models_batch_sharding import assert_kernels_run_per_device, data_mesh
from tests.test_models_ctc import NUM_CLASSES, brute_force_losses, labels_batch, paddings_for


def kernel_loss(batch_tile=2):
  def loss(logits, logit_paddings, labels, label_paddings):
    return ctc_loss_kernel(
      logits, logit_paddings, labels, label_paddings, batch_tile=batch_tile, interpret=True
    )

  return loss


def values_and_logit_grads(loss, *args):
  """`(per_example [batch], d sum(per_example) / d logits [batch, time, classes])`."""
  per_example, vjp = jax.vjp(lambda logits: loss(logits, *args[1:]), args[0])
  return per_example, vjp(jnp.ones_like(per_example))[0]


def awkward_batch(rng, num_classes=6, time=7):
  """Five rows: label lengths 0, 1 and max, repeats that need a blank between them, padded
  label slots holding garbage equal to the last label, frames padded at the end or in the
  middle, a row whose target fits its frames exactly."""
  frame_lengths = [7, 5, 7, 3, 6]
  label_lists = [[1, 1, 2], [], [3], [2, 5, 4], [4, 4]]
  logits = rng.normal(0.0, 2.0, size=(5, time, num_classes)).astype(np.float32)
  logit_paddings = paddings_for(frame_lengths, time)
  logit_paddings[2, 3] = 1.0
  labels, label_paddings = labels_batch(label_lists, 3)
  labels[4, 2] = 4
  labels[1, :] = [3, 3, 3]
  return logits, logit_paddings, labels, label_paddings


@pytest.mark.parametrize("batch_tile", [1, 4])
def test_matches_optax_values_and_gradients(batch_tile):
  args = awkward_batch(np.random.default_rng(0))
  expected, expected_grad = values_and_logit_grads(optax.ctc_loss, *args)
  per_example, grad = values_and_logit_grads(kernel_loss(batch_tile), *args)
  assert per_example.shape == (5,)
  assert np.all(np.asarray(expected) < 50.0), "every row of this batch can be aligned"
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_matches_optax_with_a_mild_log_epsilon():
  """With log_epsilon = -2 optax's penalised moves and epsilon-started states carry real weight,
  so this checks that the kernel's graph is optax's, move for move."""
  args = awkward_batch(np.random.default_rng(6))

  def optax_loss(*args):
    return optax.ctc_loss(*args, log_epsilon=-2.0)

  def loss(*args):
    return ctc_loss_kernel(*args, log_epsilon=-2.0, interpret=True)

  expected, expected_grad = values_and_logit_grads(optax_loss, *args)
  per_example, grad = values_and_logit_grads(loss, *args)
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_matches_brute_force_over_alignments():
  frame_lengths = [4, 5, 3, 4, 2]
  label_lists = [[1, 1], [1, 2], [2], [2, 1, 2], []]
  time = 5
  logits = np.random.default_rng(1).normal(size=(5, time, NUM_CLASSES)).astype(np.float32)
  labels, label_paddings = labels_batch(label_lists, 3)
  per_example = kernel_loss()(logits, paddings_for(frame_lengths, time), labels, label_paddings)
  expected = brute_force_losses(logits, frame_lengths, label_lists)
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)


def test_unalignable_targets_cost_about_minus_log_epsilon_as_in_optax():
  """Targets too long for their frames (a repeat needs an extra frame; no frames at all) cost
  about 1e5, as optax's do. Near 1e5 float32 values are 0.008 apart, so both implementations'
  gradients there are only good to about 1e-2."""
  rng = np.random.default_rng(2)
  time = 4
  logits = rng.normal(size=(3, time, 4)).astype(np.float32)
  logit_paddings = paddings_for([3, 4, 0], time)
  labels, label_paddings = labels_batch([[1, 2, 3, 1], [2, 2, 2], [1]], 4)
  args = (logits, logit_paddings, labels, label_paddings)
  expected, expected_grad = values_and_logit_grads(optax.ctc_loss, *args)
  per_example, grad = values_and_logit_grads(kernel_loss(), *args)
  assert np.all(np.asarray(expected) > 9e4)
  np.testing.assert_allclose(per_example, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, atol=2e-2)


def test_single_frame():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 1, 4)).astype(np.float32)
  labels, label_paddings = labels_batch([[], [2], [3]], 1)
  args = (logits, np.zeros((3, 1), np.float32), labels, label_paddings)
  expected, expected_grad = values_and_logit_grads(optax.ctc_loss, *args)
  per_example, grad = values_and_logit_grads(kernel_loss(), *args)
  np.testing.assert_allclose(per_example, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_padded_frames_change_nothing_and_get_no_gradient():
  rng = np.random.default_rng(4)
  args = awkward_batch(rng)
  logits, logit_paddings, labels, label_paddings = args
  garbage = np.where(logit_paddings[..., None] > 0, rng.normal(0.0, 50.0, logits.shape), logits)
  longer_logits = np.concatenate([garbage, rng.normal(0.0, 50.0, (5, 3, logits.shape[2]))], 1)
  longer_paddings = np.concatenate([logit_paddings, np.ones((5, 3), np.float32)], 1)
  loss = kernel_loss()
  per_example, grad = values_and_logit_grads(loss, *args)
  longer_per_example, longer_grad = values_and_logit_grads(
    loss, longer_logits.astype(np.float32), longer_paddings, labels, label_paddings
  )
  np.testing.assert_allclose(longer_per_example, per_example, rtol=1e-6)
  valid = (logit_paddings == 0)[..., None]
  np.testing.assert_allclose(longer_grad[:, :7] * valid, grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(longer_grad[:, :7] * ~valid, 0.0)
  np.testing.assert_array_equal(longer_grad[:, 7:], 0.0)


def test_kernels_run_per_device_on_their_batch_shard():
  """Under an 8-device mesh each device runs both recursions on its own 2 of the 16 rows. A Triton
  call has no sharding rule: left to XLA, every device would gather and compute the whole batch."""
  batch, time, label_time = 16, 6, 3
  args = (
    jnp.zeros((batch, time, NUM_CLASSES)),
    jnp.zeros((batch, time)),
    jnp.ones((batch, label_time), jnp.int32),
    jnp.zeros((batch, label_time)),
  )

  def total(logits, *rest):
    return jnp.sum(kernel_loss(batch_tile=2)(logits, *rest))

  with jax.set_mesh(data_mesh(8)):
    jaxpr = jax.make_jaxpr(jax.value_and_grad(total))(*args)
  assert_kernels_run_per_device(jaxpr, {"ctc_alpha": 0, "ctc_beta": 0}, rows=2, num_devices=8)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_kernel_on_a_mesh_matches_the_unsharded_kernel_and_optax(num_devices):
  """Values and gradients on a batch-sharded mesh (2 rows per device, each shard padded with
  filler rows to a tile of 4) equal the single-call kernel's and optax's."""
  rng = np.random.default_rng(7)
  batches = [awkward_batch(rng) for _ in range(4)]
  args = tuple(np.concatenate(parts)[:16] for parts in zip(*batches, strict=True))
  expected = values_and_logit_grads(optax.ctc_loss, *args)
  unsharded = values_and_logit_grads(kernel_loss(batch_tile=4), *args)
  mesh = data_mesh(num_devices)
  with jax.set_mesh(mesh):
    sharded = jax.jit(functools.partial(values_and_logit_grads, kernel_loss(batch_tile=4)))(
      *jax.device_put(args, NamedSharding(mesh, P("data")))
    )
  for actual in (unsharded, expected):
    np.testing.assert_allclose(sharded[0], actual[0], rtol=1e-5)
    np.testing.assert_allclose(sharded[1], actual[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_tile, num_warps", [(1, 1), (8, 4)])
def test_lowers_to_triton(batch_tile, num_warps):
  """The GPU path (no interpret) lowers through Pallas' Triton lowering, which checks the
  power-of-two shapes and the ops it supports; Triton's own compiler runs only on a GPU."""
  batch, time, num_classes, label_time = 3, 10, 5, 9

  def total_loss(logits, *rest):
    return ctc_loss_kernel(
      logits, *rest, batch_tile=batch_tile, num_warps=num_warps, interpret=False
    ).sum()

  traced = jax.jit(jax.value_and_grad(total_loss)).trace(
    jnp.zeros((batch, time, num_classes)),
    jnp.zeros((batch, time)),
    jnp.zeros((batch, label_time), jnp.int32),
    jnp.zeros((batch, label_time)),
  )
  assert cuda_lowering(traced).count("xla.gpu.triton") == 2


def test_lowers_to_triton_calls_over_one_devices_rows_on_a_mesh():
  """On 8 devices each Triton call's grid covers one device's 2 rows, not all 16: the split
  reaches the GPU lowering, not only the interpreter."""
  mesh = data_mesh(8)

  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))

  def total_loss(logits, *rest):
    return ctc_loss_kernel(logits, *rest, batch_tile=1, interpret=False).sum()

  with jax.set_mesh(mesh):
    traced = jax.jit(jax.value_and_grad(total_loss)).trace(
      spec((16, 10, 5)), spec((16, 10)), spec((16, 9), jnp.int32), spec((16, 9))
    )
    text = cuda_lowering(traced)
  assert re.findall(r"xla\.gpu\.triton.*?grid_x = (\d+)", text) == ["2", "2"]


def cuda_lowering(traced) -> str:
  """The StableHLO text of `traced` lowered for CUDA; skips where that needs a GPU."""
  try:
    return traced.lower(lowering_platforms=("cuda",)).as_text()
  except RuntimeError as error:
    # jaxlib > 0.10.2 runs Triton's compiler while lowering, which needs the CUDA plugin.
    if "Triton compilation handler" in str(error):
      pytest.skip("this jaxlib compiles Triton kernels while lowering: needs a GPU")
    raise


@pytest.mark.parametrize("batch_tile", [3, 0])
def test_rejects_a_batch_tile_that_is_not_a_power_of_two(batch_tile):
  args = awkward_batch(np.random.default_rng(5))
  with pytest.raises(ValueError, match="power of two"):
    ctc_loss_kernel(*args, batch_tile=batch_tile, interpret=True)
