"""The fused Pallas recurrence against the scan it replaces, run by the Pallas interpreter.

Every case compares values and gradients with `models.lstm.lstm_recurrence` on shapes the kernel
must pad (a batch that is not a multiple of the tile, hidden sizes that are not powers of two),
one frame, one and two directions, and every launch variant; the model-level tests check that the
kernel keeps padding invariance and that filler rows change nothing.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.ctc import ctc_loss
from models.factory import make_model
from models.lstm import LstmCtcModel, lstm_recurrence
from models.lstm_kernel import KernelConfig, lstm_recurrence_kernel, padded_hidden_size
from tests.test_models_batch_sharding import assert_kernels_run_per_device, data_mesh
from tests.test_models_ctc_kernel import cuda_lowering

INTERPRET = KernelConfig(interpret=True)


def random_operands(time, batch, hidden, directions, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  projected = tuple(
    jnp.asarray(rng.normal(size=(time, batch, 4 * hidden)), jnp.float32) for _ in range(directions)
  )
  kernel = jnp.asarray(rng.normal(size=(directions, hidden, 4 * hidden)) / np.sqrt(hidden), dtype)
  cotangents = tuple(
    jnp.asarray(rng.normal(size=(time, batch, hidden)), dtype) for _ in range(directions)
  )
  return projected, kernel, cotangents


def values_and_gradients(recurrence, projected, kernel, cotangents):
  outputs, vjp = jax.vjp(recurrence, projected, kernel)
  return outputs, vjp(cotangents)


def assert_trees_close(actual, expected, tolerance):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=tolerance, atol=tolerance
    ),
    actual,
    expected,
  )


@pytest.mark.parametrize(
  "time, batch, hidden, directions",
  [
    (1, 16, 16, 2),  # one frame
    (6, 20, 16, 2),  # batch padded from 20 to 32 rows
    (5, 3, 64, 1),  # fewer rows than one tile, one direction
    (4, 17, 128, 2),
    (3, 16, 256, 1),
    (5, 9, 24, 2),  # hidden padded from 24 to 32 units per gate
  ],
)
def test_kernel_matches_scan_values_and_gradients(time, batch, hidden, directions):
  projected, kernel, cotangents = random_operands(time, batch, hidden, directions)
  expected = values_and_gradients(
    lambda p, k: lstm_recurrence(p, k, 1), projected, kernel, cotangents
  )
  actual = values_and_gradients(
    lambda p, k: lstm_recurrence_kernel(p, k, INTERPRET), projected, kernel, cotangents
  )
  assert_trees_close(actual, expected, 1e-5)


@pytest.mark.parametrize(
  "config",
  [
    KernelConfig(batch_tile=32, interpret=True),
    KernelConfig(weights_resident=True, interpret=True),
    KernelConfig(prefetch=True, interpret=True),
    KernelConfig(prefetch=True, weights_resident=True, interpret=True),
    # sigmoid(x) = (1 + tanh(x / 2)) / 2; the GPU's tanh.approx is what the tuning table measures
    KernelConfig(approx_activations=True, interpret=True),
  ],
)
@pytest.mark.parametrize("time", [1, 2, 7])
def test_every_launch_variant_computes_the_same(config, time):
  projected, kernel, cotangents = random_operands(time, 19, 32, 2, seed=1)
  expected = values_and_gradients(
    lambda p, k: lstm_recurrence_kernel(p, k, INTERPRET), projected, kernel, cotangents
  )
  actual = values_and_gradients(
    lambda p, k: lstm_recurrence_kernel(p, k, config), projected, kernel, cotangents
  )
  assert_trees_close(actual, expected, 1e-6)


def test_bfloat16_kernel_matches_bfloat16_scan():
  projected, kernel, cotangents = random_operands(6, 16, 32, 2, seed=2, dtype=jnp.bfloat16)
  expected = values_and_gradients(
    lambda p, k: lstm_recurrence(p, k, 1), projected, kernel, cotangents
  )
  actual = values_and_gradients(
    lambda p, k: lstm_recurrence_kernel(p, k, INTERPRET), projected, kernel, cotangents
  )
  assert all(output.dtype == jnp.bfloat16 for output in actual[0])
  assert_trees_close(actual, expected, 2e-2)


def test_kernels_run_per_device_on_their_batch_shard():
  """Under an 8-device mesh each device runs both passes on its own 16 of the 128 rows. A Triton
  call has no sharding rule: left to XLA, every device would gather and compute the whole batch."""
  projected, kernel, _ = random_operands(4, 128, 16, 2)

  def total(projected, kernel):
    return sum(jnp.sum(states) for states in lstm_recurrence_kernel(projected, kernel, INTERPRET))

  with jax.set_mesh(data_mesh(8)):
    jaxpr = jax.make_jaxpr(jax.grad(total, argnums=(0, 1)))(projected, kernel)
  assert_kernels_run_per_device(
    jaxpr, {"lstm_forward": 2, "lstm_backward": 2}, rows=16, num_devices=8
  )


@pytest.mark.parametrize("num_devices", [1, 8])
def test_kernel_on_a_mesh_matches_the_unsharded_kernel_and_the_scan(num_devices):
  """Values and gradients on a batch-sharded mesh (3 rows per device, padded to a tile on each)
  equal the single-call kernel's and the scan's; the recurrent kernel's gradient, a sum over
  every row, is summed over the devices."""
  projected, kernel, cotangents = random_operands(5, 24, 24, 2, seed=4)
  scan = values_and_gradients(lambda p, k: lstm_recurrence(p, k, 1), projected, kernel, cotangents)

  def fused(projected, kernel, cotangents):
    return values_and_gradients(
      lambda p, k: lstm_recurrence_kernel(p, k, INTERPRET), projected, kernel, cotangents
    )

  unsharded = fused(projected, kernel, cotangents)
  mesh = data_mesh(num_devices)
  rows = NamedSharding(mesh, P(None, "data"))
  with jax.set_mesh(mesh):
    sharded = jax.jit(fused)(
      jax.device_put(projected, rows),
      jax.device_put(kernel, NamedSharding(mesh, P())),
      jax.device_put(cotangents, rows),
    )
  assert_trees_close(sharded, unsharded, 1e-5)
  assert_trees_close(sharded, scan, 1e-5)


@pytest.mark.parametrize(
  "config",
  [
    KernelConfig(),
    KernelConfig(weights_resident=True),
    KernelConfig(prefetch=True),
    KernelConfig(prefetch=True, weights_resident=True),
    KernelConfig(num_warps=4, num_stages=2),  # the interpreter ignores both: lowered only
    KernelConfig(prefetch=True, weights_resident=True, approx_activations=True),
  ],
  ids=["default", "resident", "prefetch", "prefetch, resident", "4 warps, 2 stages", "approx"],
)
def test_every_launch_variant_lowers_to_two_triton_calls_per_pass(config):
  """What the GPU compiles: a variant the Triton lowering rejects fails here, not on a lent GPU."""
  projected, kernel, _ = random_operands(6, 16, 16, 2, dtype=jnp.bfloat16)

  def total(projected, kernel):
    return sum(jnp.sum(states) for states in lstm_recurrence_kernel(projected, kernel, config))

  traced = jax.jit(jax.grad(total, argnums=(0, 1))).trace(projected, kernel)
  text = cuda_lowering(traced)
  assert re.findall(r'xla\.gpu\.triton.*?name = "(lstm_\w+)"', text) == [
    "lstm_forward",
    "lstm_backward",
  ]
  launches = {f"num_warps = {config.num_warps}", f"num_stages = {config.num_stages}"}
  assert set(re.findall(r"num_warps = \d+|num_stages = \d+", text)) == launches
  # approximate activations: the hardware's tanh, libdevice's tanhf and expf gone from the kernels
  libdevice = {"__nv_tanhf", "__nv_expf"} & set(re.findall(r"__nv_\w+", text))
  if config.approx_activations:
    assert "tanh.approx.f32" in text and not libdevice
  else:
    assert "tanh.approx" not in text and libdevice == {"__nv_tanhf", "__nv_expf"}


def loop_loads_and_dots(config: KernelConfig) -> dict[str, str]:
  """Per kernel, its time loop's reads and dots in program order (what Triton is given): W a read
  of the recurrent kernel, F a read of the frame's inputs, D a dot."""
  projected, kernel, _ = random_operands(3, 16, 16, 2)

  def total(projected, kernel):
    return sum(jnp.sum(states) for states in lstm_recurrence_kernel(projected, kernel, config))

  def letter(equation) -> str:
    if equation.primitive.name == "get":  # the recurrent kernel is the one 2-D operand
      return "W" if equation.invars[0].aval.ndim == 2 else "F"
    return "D" if equation.primitive.name == "dot_general" else ""

  orders = {}

  def visit(jaxpr):
    for equation in jaxpr.eqns:
      if equation.primitive.name == "pallas_call":
        (loop,) = (e for e in equation.params["jaxpr"].eqns if e.primitive.name == "scan")
        orders[equation.params["name"]] = "".join(map(letter, loop.params["jaxpr"].eqns))
      for param in equation.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          visit(inner)

  visit(jax.make_jaxpr(jax.grad(total, argnums=(0, 1)))(projected, kernel).jaxpr)
  return orders


def test_loads_sit_where_the_kernels_use_them_unless_prefetched():
  """On one H200 the float32 kernel that re-reads its weights ran 16.6 ms with each gate's
  projection read just before its dot, 38.6 ms with every frame read first, and 16.5 again with
  the loads this test keeps where they are used."""
  assert loop_loads_and_dots(INTERPRET) == {
    "lstm_forward": "WWWW" + "FD" * 4,
    "lstm_backward": "WWWW" + "F" * 6 + "D" * 4,
  }
  # with prefetch, a frame first reads the next frame's inputs
  assert loop_loads_and_dots(KernelConfig(prefetch=True, interpret=True)) == {
    "lstm_forward": "F" * 4 + "WWWW" + "D" * 4,
    "lstm_backward": "F" * 6 + "WWWW" + "D" * 4,
  }


@pytest.mark.parametrize(
  "config, words",
  [
    (KernelConfig(), "tile 16, 8 warps, weights re-read, 1 stage(s)"),
    (KernelConfig(prefetch=True), "tile 16, 8 warps, weights re-read, 1 stage(s), prefetch"),
    (
      KernelConfig(batch_tile=32, num_warps=4, weights_resident=True, num_stages=2),
      "tile 32, 4 warps, weights resident, 2 stage(s)",
    ),
    (
      KernelConfig(approx_activations=True),
      "tile 16, 8 warps, weights re-read, 1 stage(s), approx. activations",
    ),
  ],
)
def test_describe_names_each_launch_parameter_from_its_own_field(config, words):
  """Each switch on its own, so that one printed from another's field shows."""
  assert config.describe() == words


@pytest.mark.parametrize("hidden, padded", [(1, 16), (16, 16), (17, 32), (128, 128), (200, 256)])
def test_padded_hidden_size(hidden, padded):
  assert padded_hidden_size(hidden) == padded


def test_model_with_kernel_matches_scan_model_including_filler_rows():
  """A bucket-shaped batch: padded frames with garbage, and two filler rows of weight 0."""
  rng = np.random.default_rng(3)
  lengths = np.array([11, 4, 9, 1, 7])
  time, features = 12, 3
  inputs = jnp.asarray(rng.normal(0.0, 50.0, (5, time, features)), jnp.float32)
  paddings = jnp.asarray(np.arange(time)[None, :] >= lengths[:, None], jnp.float32)
  labels = jnp.asarray([[1, 2, 3], [4, 0, 0], [5, 5, 0], [1, 0, 0], [2, 3, 0]], jnp.int32)
  label_paddings = jnp.asarray(labels == 0, jnp.float32)
  weights = jnp.asarray([1.0, 1.0, 1.0, 0.0, 0.0])

  def loss_and_grads(implementation):
    model = LstmCtcModel(
      num_classes=6,
      num_layers=2,
      hidden_size=20,
      lstm_implementation=implementation,
      kernel_config=INTERPRET,
    )
    params = model.init(jax.random.key(0), inputs, paddings)["params"]

    def loss_fn(params):
      logits = model.apply({"params": params}, inputs, paddings)
      return ctc_loss(logits, paddings, labels, label_paddings, weights)[0]

    return jax.value_and_grad(loss_fn)(params)

  assert_trees_close(loss_and_grads("pallas"), loss_and_grads("scan"), 1e-4)


def test_the_bfloat16_model_auto_runs_on_a_gpu_matches_the_bfloat16_scan_model():
  """What `auto` now runs for a bfloat16 model on a GPU, the kernel at its measured launch
  (weights on chip, next frame prefetched), here in the interpreter: a bucket-shaped batch's
  loss and gradients are the bfloat16 scan model's, to bfloat16's precision."""
  rng = np.random.default_rng(4)
  lengths = np.array([10, 3, 8, 12])
  time, features = 12, 3
  inputs = jnp.asarray(rng.normal(0.0, 1.0, (4, time, features)), jnp.float32)
  paddings = jnp.asarray(np.arange(time)[None, :] >= lengths[:, None], jnp.float32)
  labels = jnp.asarray([[1, 2, 3], [4, 0, 0], [5, 5, 0], [2, 3, 1]], jnp.int32)
  label_paddings = jnp.asarray(labels == 0, jnp.float32)
  weights = jnp.ones(4)
  settings = {"num_classes": 6, "num_layers": 2, "hidden_size": 20, "dtype": "bfloat16"}
  assert make_model(**settings, backend="gpu").lstm_implementation == "pallas"
  kernel_model = make_model(**settings, lstm_impl="pallas", backend="cpu")
  assert kernel_model.kernel_config == KernelConfig(
    weights_resident=True, prefetch=True, interpret=True
  )
  scan_model = make_model(**settings, lstm_impl="scan", backend="cpu")
  params = scan_model.init(jax.random.key(0), inputs, paddings)["params"]

  def loss_and_grads(model):
    def loss_fn(params):
      logits = model.apply({"params": params}, inputs, paddings)
      return ctc_loss(logits, paddings, labels, label_paddings, weights)[0]

    return jax.value_and_grad(loss_fn)(params)

  (kernel_loss, kernel_grads), (scan_loss, scan_grads) = map(
    loss_and_grads, (kernel_model, scan_model)
  )
  np.testing.assert_allclose(kernel_loss, scan_loss, rtol=1e-2)
  deviation = max(
    float(jnp.max(jnp.abs(k - s)) / jnp.max(jnp.abs(s)))
    for k, s in zip(jax.tree.leaves(kernel_grads), jax.tree.leaves(scan_grads), strict=True)
  )
  assert deviation < 1e-2  # the largest gradient deviation, relative to the parameter's largest
