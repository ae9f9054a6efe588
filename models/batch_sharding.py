"""Runs a row-independent Pallas kernel on each device's own rows of a data-parallel batch.

A Pallas kernel lowers to a custom call (Triton on a GPU) that has no sharding rule, so under `jit`
over a mesh GSPMD replicates it: every device gathers the whole batch and computes every row, and
the kernel loses the data-parallel speed-up. `over_batch_shards` wraps such a kernel in
`jax.shard_map`, so each device runs it on its own rows.

The mesh is the one in context (`jax.set_mesh`; `training.compilation.trace_step` traces the
trainer's steps inside one), since the models know nothing of the trainer's mesh; the rows are
split over every axis of it that is not already manual. With no mesh, one device, or rows that do
not split evenly, the kernel runs on the whole batch as it would without this module.
"""

import math
from collections.abc import Callable

import jax
from jax.sharding import AxisType, PartitionSpec

# `None` in an operand's place: the operand has no batch dimension and every device gets all of it.
BatchDims = int | None | tuple


def _batch_mesh_axes(batch_size: int) -> tuple[str, ...]:
  """The context mesh's axes that `batch_size` rows are split over; () when there is nothing to
  split (no mesh, one device) or the rows do not divide evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(
    name
    for name, axis_type in zip(mesh.axis_names, mesh.axis_types, strict=True)
    if axis_type != AxisType.Manual
  )
  num_shards = math.prod(mesh.shape[name] for name in axes)
  if num_shards == 1 or batch_size % num_shards:
    return ()
  return axes


def over_batch_shards(
  function: Callable, *, batch_size: int, in_batch_dims: BatchDims, out_batch_dims: BatchDims
) -> Callable:
  """`function`, run by each device on its own rows when the context mesh splits the batch.

  `function` must treat rows independently. `in_batch_dims` and `out_batch_dims` give the batch
  dimension of each operand and result (pytree prefixes of them, as `shard_map`'s specs); an
  operand marked `None` is replicated, and `shard_map`'s transpose sums its cotangent over the
  devices, so a gradient that is a sum over rows (a weight's) comes out whole. Returns `function`
  itself when there is nothing to split.

  `check_vma=False`: with the check on, a `pallas_call`'s output shapes would have to declare how
  they vary over the mesh (a `jax.ShapeDtypeStruct` argument that JAX versions name differently);
  with it off, the transpose sums the replicated operands' cotangents with an explicit `psum`.
  """
  axes = _batch_mesh_axes(batch_size)
  if not axes:
    return function

  def specs(batch_dims):
    return jax.tree.map(
      lambda dim: PartitionSpec() if dim is None else PartitionSpec(*[None] * dim, axes),
      batch_dims,
      is_leaf=lambda dim: dim is None,
    )

  return jax.shard_map(
    function,
    mesh=jax.sharding.get_abstract_mesh(),
    in_specs=specs(in_batch_dims),
    out_specs=specs(out_batch_dims),
    check_vma=False,
  )
