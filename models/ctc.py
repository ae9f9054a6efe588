"""CTC loss over weighted, padded batches, and greedy (best-path) CTC decoding.

Conventions: class 0 is the blank; `labels [batch, label_time]` int32 hold 1..num_classes-1 and are
right-padded (`label_paddings`, 1.0 = padded); `weights [batch]` are 1.0 for real examples and 0.0
for filler rows that only keep a bucket's shape static.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.ctc_kernel import ctc_loss_kernel

BLANK_ID = 0
CTC_IMPLEMENTATIONS = ("auto", "optax", "pallas")


def ctc_loss(
  logits: jax.Array,
  logit_paddings: jax.Array,
  labels: jax.Array,
  label_paddings: jax.Array,
  weights: jax.Array,
  implementation: str = "optax",
  **kernel_options,
) -> tuple[jax.Array, jax.Array]:
  """Mean CTC loss over real examples, and the per-example losses.

  Args:
    logits: `[batch, time, num_classes]` unnormalised scores.
    logit_paddings: `[batch, time]`, 1.0 = padded frame.
    labels: `[batch, label_time]` int32 targets (no blanks).
    label_paddings: `[batch, label_time]`, 1.0 = padded label.
    weights: `[batch]`, 0.0 for filler rows.
    implementation: "optax" (`optax.ctc_loss`, a scan over time) or "pallas"
      (`models.ctc_kernel.ctc_loss_kernel`, the same function with its time recursion in one
      kernel launch per pass; `kernel_options` are its launch parameters).

  Returns:
    `(loss, per_example)`: `per_example [batch]` is each sequence's negative log-likelihood
    `-log p(labels | inputs)`, not divided by label length: that is the plain CTC loss the paper
    reports, and dividing would make long lines count less. Filler rows get 0. `loss` is
    `sum(weights * per_example) / sum(weights)`, so filler rows change neither the loss nor its
    gradient, however many a bucket holds. A target that cannot be aligned (too long for its
    frames) costs about `-log_epsilon` = 1e5 instead of infinity, as in `optax.ctc_loss`.
  """
  implementations = {"optax": optax.ctc_loss, "pallas": ctc_loss_kernel}
  if implementation not in implementations:
    raise ValueError(f"implementation must be 'optax' or 'pallas', got {implementation!r}")
  per_example_loss = implementations[implementation]
  per_example = per_example_loss(
    logits.astype(jnp.float32),
    logit_paddings,
    labels,
    label_paddings,
    blank_id=BLANK_ID,
    **kernel_options,
  )
  per_example = jnp.where(weights > 0, per_example, 0.0)
  total_weight = jnp.sum(weights)
  loss = jnp.sum(weights * per_example) / jnp.maximum(total_weight, jnp.finfo(jnp.float32).tiny)
  return loss, per_example


def make_ctc_loss(
  *, impl: str = "auto", batch_tile: int = 1, num_warps: int = 2, backend: str | None = None
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """`ctc_loss` with its implementation chosen: "auto" takes the Pallas kernel on a GPU and
  `optax.ctc_loss` elsewhere; the kernel runs in the Pallas interpreter off the GPU (tests).

  The returned function's `implementation` keyword says what was chosen.
  """
  if impl not in CTC_IMPLEMENTATIONS:
    raise ValueError(f"ctc impl must be one of {CTC_IMPLEMENTATIONS}, got {impl!r}")
  backend = backend or jax.default_backend()
  if impl == "auto":
    impl = "pallas" if backend == "gpu" else "optax"
  if impl == "optax":
    return functools.partial(ctc_loss, implementation="optax")
  return functools.partial(
    ctc_loss,
    implementation="pallas",
    batch_tile=batch_tile,
    num_warps=num_warps,
    interpret=backend != "gpu",
  )


def greedy_decode(logits: jax.Array, paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Best-path CTC decoding, jit-able with static shapes.

  Takes the most likely class per valid frame, collapses repeats, drops blanks and moves the kept
  ids to the front of each row.

  Args:
    logits: `[batch, time, num_classes]`.
    paddings: `[batch, time]`, 1.0 = padded frame (ignored).

  Returns:
    `(ids, lengths)`: `ids [batch, time]` int32, the decoded labels of row b in
    `ids[b, :lengths[b]]` and 0 (the blank, never a label) after them, mirroring the `labels` /
    `label_paddings` layout; `lengths [batch]` int32.
  """
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=BLANK_ID)
  keep = (best != BLANK_ID) & (best != previous) & (paddings == 0)
  positions = jnp.cumsum(keep, axis=1) - 1
  time = best.shape[1]
  # Dropped frames are sent out of bounds and discarded by the scatter.
  target = jnp.where(keep, positions, time)
  rows = jnp.arange(best.shape[0])[:, None]
  ids = jnp.zeros_like(best).at[rows, target].set(best, mode="drop")
  return ids, jnp.sum(keep, axis=1, dtype=jnp.int32)


def decoded_to_lists(
  ids: jax.Array | np.ndarray, lengths: jax.Array | np.ndarray
) -> list[list[int]]:
  """Host-side: `greedy_decode`'s `(ids [batch, time], lengths [batch])` -> one id list per row."""
  ids = np.asarray(ids)
  lengths = np.asarray(lengths)
  return [row[:length].tolist() for row, length in zip(ids, lengths, strict=True)]
