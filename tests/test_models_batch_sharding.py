"""`over_batch_shards`: per-device rows under a mesh, the function itself when nothing splits.

`assert_kernels_run_per_device` finds where the Pallas kernels of a traced function run, for the
kernels' tests (`test_models_lstm_kernel`, `test_models_ctc_kernel`) and the trainer's.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import train
from models.batch_sharding import over_batch_shards


def data_mesh(num_devices: int) -> jax.sharding.Mesh:
  """The trainer's mesh over the first `num_devices` devices."""
  return train.make_data_mesh(jax.devices()[:num_devices])


def _nested_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, tuple | list) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def kernel_calls(jaxpr, shard_map=None) -> list:
  """`(pallas_call equation, the shard_map equation it runs in or None)` for every kernel call in
  `jaxpr` (a `jax.make_jaxpr` or `Traced.jaxpr` result) and the jaxprs nested in it."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  calls = []
  for equation in jaxpr.eqns:
    if equation.primitive.name == "pallas_call":
      calls.append((equation, shard_map))
      continue
    enclosing = equation if equation.primitive.name == "shard_map" else shard_map
    for nested in _nested_jaxprs(equation.params):
      calls.extend(kernel_calls(nested, enclosing))
  return calls


def assert_kernels_run_per_device(jaxpr, batch_dims: dict[str, int], rows: int, num_devices: int):
  """The kernels named in `batch_dims`, and no others, are called in `jaxpr`, each inside a
  `shard_map` over `num_devices` devices and on `rows` rows: the length of dim `batch_dims[name]`
  of its first output."""
  calls = kernel_calls(jaxpr)
  assert {equation.params["name"] for equation, _ in calls} == set(batch_dims)
  for equation, shard_map in calls:
    name = equation.params["name"]
    assert shard_map is not None, f"{name} runs on the whole batch, outside any shard_map"
    assert shard_map.params["mesh"].size == num_devices, name
    assert equation.outvars[0].aval.shape[batch_dims[name]] == rows, name


def row_products(rows, weights):
  """`rows [batch, features] @ weights [features]` -> `[batch]`: rows independent, as a kernel's."""
  return rows @ weights


def over_rows(batch_size):
  return over_batch_shards(
    row_products, batch_size=batch_size, in_batch_dims=(0, None), out_batch_dims=0
  )


@pytest.mark.parametrize(
  "num_devices, batch_size",
  [(None, 16), (1, 16), (8, 12)],
  ids=["no mesh", "one device", "rows that do not split evenly"],
)
def test_runs_the_function_itself_when_nothing_splits(num_devices, batch_size):
  mesh = contextlib.nullcontext() if num_devices is None else jax.set_mesh(data_mesh(num_devices))
  with mesh:
    assert over_rows(batch_size) is row_products


def test_runs_the_function_itself_inside_a_shard_map():
  """Rows that are already one device's (the mesh axes manual) are not split again. Each device's
  8 rows would split evenly over the 8 devices, so only the manual axes keep them whole."""
  wrapped = []

  def per_device(rows):
    wrapped.append(over_rows(rows.shape[0]))
    return rows

  jax.shard_map(per_device, mesh=data_mesh(8), in_specs=P("data"), out_specs=P("data"))(
    jnp.zeros((64, 3))
  )
  assert wrapped == [row_products]


def test_a_replicated_operands_gradient_sums_every_devices_rows():
  """d sum(rows @ weights) / d weights is the sum of all 16 rows, not of one device's 2."""
  mesh = data_mesh(8)
  rows = jnp.arange(48.0).reshape(16, 3)
  weights = jnp.asarray([1.0, -2.0, 0.5])

  def total(rows, weights):
    return jnp.sum(over_rows(16)(rows, weights))

  with jax.set_mesh(mesh):
    gradients = jax.grad(total, argnums=(0, 1))
    jaxpr = jax.make_jaxpr(gradients)(rows, weights)
    rows_gradient, weights_gradient = jax.jit(gradients)(
      jax.device_put(rows, NamedSharding(mesh, P("data"))), weights
    )
  assert "shard_map" in str(jaxpr)
  np.testing.assert_allclose(weights_gradient, rows.sum(axis=0))
  np.testing.assert_allclose(rows_gradient, np.broadcast_to(weights, rows.shape))


def shapes_per_device(jaxpr) -> list[int]:
  """The shape of each operand inside the one `shard_map` of `jaxpr`: what one device gets."""
  (shard_map,) = [
    equation for equation in jaxpr.jaxpr.eqns if equation.primitive.name == "shard_map"
  ]
  return [variable.aval.shape for variable in shard_map.params["jaxpr"].invars]


def test_rows_split_over_every_axis_of_a_two_axis_mesh():
  """On a 4 x 2 mesh the rows split 8 ways: 16 rows are 2 a device, 12 do not split evenly
  (though they would over the first axis alone)."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  rows = jnp.arange(48.0).reshape(16, 3)
  weights = jnp.asarray([1.0, -2.0, 0.5])
  with jax.set_mesh(mesh):
    assert over_rows(12) is row_products
    jaxpr = jax.make_jaxpr(over_rows(16))(rows, weights)
    products = jax.jit(over_rows(16))(rows, weights)
  assert shapes_per_device(jaxpr) == [(2, 3), (3,)]
  np.testing.assert_allclose(products, rows @ weights)


def test_operands_split_along_the_batch_dimension_they_name():
  """Time-major operands [time, batch, features] split along dim 1, 2 of 16 rows a device, and a
  result marked `None` comes back whole."""

  def scaled(sequences, scale):
    return sequences * scale, scale * 2

  sequences = jnp.arange(5 * 16 * 3, dtype=jnp.float32).reshape(5, 16, 3)
  scale = jnp.asarray([1.0, -2.0, 0.5])
  with jax.set_mesh(data_mesh(8)):
    function = over_batch_shards(
      scaled, batch_size=16, in_batch_dims=(1, None), out_batch_dims=(1, None)
    )
    jaxpr = jax.make_jaxpr(function)(sequences, scale)
    products, doubled = jax.jit(function)(sequences, scale)
  assert shapes_per_device(jaxpr) == [(5, 2, 3), (3,)]
  np.testing.assert_allclose(products, sequences * scale)
  np.testing.assert_allclose(doubled, scale * 2)
