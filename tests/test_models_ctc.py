"""CTC loss against brute force, filler-row weighting, and greedy decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.ctc import BLANK_ID, ctc_loss, decoded_to_lists, greedy_decode, make_ctc_loss

NUM_CLASSES = 3


def paddings_for(lengths, time):
  return (np.arange(time)[None, :] >= np.asarray(lengths)[:, None]).astype(np.float32)


def labels_batch(label_lists, label_time):
  labels = np.zeros((len(label_lists), label_time), np.int32)
  for row, label in enumerate(label_lists):
    labels[row, : len(label)] = label
  return labels, paddings_for([len(label) for label in label_lists], label_time)


def collapse(path):
  """CTC's many-to-one map: merge repeats, then drop blanks."""
  merged = [token for index, token in enumerate(path) if index == 0 or token != path[index - 1]]
  return tuple(token for token in merged if token != BLANK_ID)


def brute_force_nll(log_probs, label):
  """-log p(label): sums the probability of every frame-level path that collapses to `label`."""
  time = log_probs.shape[0]
  total = 0.0
  for path in itertools.product(range(NUM_CLASSES), repeat=time):
    if collapse(path) == tuple(label):
      total += np.exp(sum(log_probs[t, token] for t, token in enumerate(path)))
  return -np.log(total)


def brute_force_losses(logits, frame_lengths, label_lists):
  """Each row's brute-force negative log-likelihood over its first `frame_lengths[row]` frames."""
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float64)
  return [
    brute_force_nll(log_probs[row, :length], label)
    for row, (length, label) in enumerate(zip(frame_lengths, label_lists, strict=True))
  ]


def test_per_example_loss_matches_brute_force_over_alignments():
  frame_lengths = [4, 5, 3, 4]
  label_lists = [[1, 1], [1, 2], [2], [2, 1, 2]]
  time = 5
  logits = np.random.default_rng(0).normal(size=(4, time, NUM_CLASSES)).astype(np.float32)
  labels, label_paddings = labels_batch(label_lists, 3)
  _, per_example = ctc_loss(
    logits, paddings_for(frame_lengths, time), labels, label_paddings, jnp.ones(4)
  )
  expected = brute_force_losses(logits, frame_lengths, label_lists)
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)


def test_loss_is_weighted_mean_and_filler_rows_change_nothing():
  """Appending filler rows (weight 0, garbage logits, an unalignable target) leaves the loss and
  the real rows' gradients as they were, and gives the filler rows zero gradient."""
  rng = np.random.default_rng(1)
  time = 6
  real_logits = rng.normal(size=(2, time, NUM_CLASSES)).astype(np.float32)
  real_paddings = paddings_for([6, 4], time)
  real_labels, real_label_paddings = labels_batch([[1, 2], [2]], 4)
  filler_logits = rng.normal(0.0, 50.0, size=(2, time, NUM_CLASSES)).astype(np.float32)
  filler_labels, filler_label_paddings = labels_batch([[1, 1, 1, 1], [2]], 4)

  def loss_of(logits, paddings, labels, label_paddings, weights):
    return ctc_loss(logits, paddings, labels, label_paddings, weights)[0]

  value_and_grad = jax.jit(jax.value_and_grad(loss_of))
  real_loss, real_grad = value_and_grad(
    real_logits, real_paddings, real_labels, real_label_paddings, jnp.ones(2)
  )
  _, per_example = ctc_loss(
    real_logits, real_paddings, real_labels, real_label_paddings, jnp.ones(2)
  )
  np.testing.assert_allclose(real_loss, np.mean(per_example), rtol=1e-6)

  padded_batch = (
    np.concatenate([real_logits, filler_logits]),
    np.concatenate([real_paddings, paddings_for([1, 3], time)]),
    np.concatenate([real_labels, filler_labels]),
    np.concatenate([real_label_paddings, filler_label_paddings]),
    jnp.array([1.0, 1.0, 0.0, 0.0]),
  )
  padded_loss, padded_grad = value_and_grad(*padded_batch)
  np.testing.assert_allclose(padded_loss, real_loss, rtol=1e-6)
  np.testing.assert_allclose(padded_grad[:2], real_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(padded_grad[2:], 0.0)
  _, padded_per_example = ctc_loss(*padded_batch)
  # The docstring's promise: filler rows get 0 (here one of them could not even be aligned).
  np.testing.assert_allclose(padded_per_example[:2], per_example, rtol=1e-6)
  np.testing.assert_array_equal(padded_per_example[2:], 0.0)


def test_a_batch_of_filler_rows_only_has_zero_loss_and_gradient_not_nan():
  """All weights 0 (a batch that is all filler): the weighted mean divides by no weight, and must
  give 0, not 0 / 0."""
  logits = np.random.default_rng(5).normal(size=(2, 4, NUM_CLASSES)).astype(np.float32)
  labels, label_paddings = labels_batch([[], []], 1)

  def loss_of(logits):
    return ctc_loss(logits, paddings_for([1, 1], 4), labels, label_paddings, jnp.zeros(2))[0]

  loss, grad = jax.value_and_grad(loss_of)(logits)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_bfloat16_logits_are_scored_in_float32():
  """bfloat16 logits give the brute-force loss of those same values in float32: the recursion
  over alignments does not run at bfloat16's 8-bit precision."""
  frame_lengths = [5, 4]
  label_lists = [[1, 2], [2, 2]]
  logits = np.random.default_rng(6).normal(size=(2, 5, NUM_CLASSES)).astype(np.float32)
  low_precision = jnp.asarray(logits, jnp.bfloat16)
  labels, label_paddings = labels_batch(label_lists, 2)
  _, per_example = ctc_loss(
    low_precision, paddings_for(frame_lengths, 5), labels, label_paddings, jnp.ones(2)
  )
  assert per_example.dtype == jnp.float32
  expected = brute_force_losses(
    np.asarray(low_precision.astype(jnp.float32)), frame_lengths, label_lists
  )
  np.testing.assert_allclose(per_example, expected, rtol=1e-5)


def test_padded_frames_and_labels_do_not_change_the_loss():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, NUM_CLASSES)).astype(np.float32)
  labels, label_paddings = labels_batch([[1, 2], [1]], 2)
  paddings = paddings_for([5, 3], 5)
  longer_logits = np.concatenate([logits, rng.normal(0.0, 50.0, size=(2, 4, NUM_CLASSES))], axis=1)
  longer_labels, longer_label_paddings = labels_batch([[1, 2], [1]], 6)
  longer_labels[longer_label_paddings > 0] = 2  # padded label slots hold garbage too
  loss, _ = ctc_loss(logits, paddings, labels, label_paddings, jnp.ones(2))
  longer_loss, _ = ctc_loss(
    longer_logits, paddings_for([5, 3], 9), longer_labels, longer_label_paddings, jnp.ones(2)
  )
  np.testing.assert_allclose(longer_loss, loss, rtol=1e-6)


def logits_from_best_paths(best_paths):
  """Logits whose per-frame argmax is the given class sequence."""
  return 10.0 * jax.nn.one_hot(jnp.array(best_paths), 4)


@pytest.mark.parametrize("jit", [False, True])
def test_greedy_decode_collapses_repeats_drops_blanks_and_ignores_padding(jit):
  best_paths = [
    [1, 1, 0, 1, 2, 2, 3],  # a blank separates a real repeat
    [0, 0, 0, 0, 0, 0, 0],  # nothing but blanks
    [3, 3, 0, 0, 2, 2, 1],  # the last three frames are padding
    [2, 1, 2, 1, 2, 1, 2],  # no repeats, no blanks: every frame is a label
    [1, 2, 2, 2, 2, 0, 0],  # a run of 2s that goes on into the padding still counts once
  ]
  paddings = paddings_for([6, 7, 4, 7, 3], 7)
  decode = jax.jit(greedy_decode) if jit else greedy_decode
  ids, lengths = decode(logits_from_best_paths(best_paths), jnp.asarray(paddings))
  assert ids.dtype == jnp.int32
  assert ids.shape == (5, 7)
  np.testing.assert_array_equal(lengths, [3, 0, 1, 7, 2])
  np.testing.assert_array_equal(
    ids,
    [
      [1, 1, 2, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0],
      [3, 0, 0, 0, 0, 0, 0],
      [2, 1, 2, 1, 2, 1, 2],
      [1, 2, 0, 0, 0, 0, 0],
    ],
  )
  assert decoded_to_lists(ids, lengths) == [[1, 1, 2], [], [3], [2, 1, 2, 1, 2, 1, 2], [1, 2]]


@pytest.mark.parametrize(
  "impl, backend, expected",
  [
    ("auto", "gpu", "pallas"),
    ("auto", "cpu", "optax"),
    ("auto", "tpu", "optax"),  # the kernel is Triton's: a GPU's only
    ("pallas", "cpu", "pallas"),
    ("pallas", "tpu", "pallas"),
  ],
)
def test_make_ctc_loss_takes_the_kernel_on_a_gpu_only(impl, backend, expected):
  loss_fn = make_ctc_loss(impl=impl, backend=backend, batch_tile=4, num_warps=8)
  assert loss_fn.keywords["implementation"] == expected
  if expected == "pallas":  # off the GPU only the Pallas interpreter can run it
    assert loss_fn.keywords["interpret"] == (backend != "gpu")
    # the launch parameters asked for reach the kernel
    assert (loss_fn.keywords["batch_tile"], loss_fn.keywords["num_warps"]) == (4, 8)


@pytest.mark.parametrize("impl", ["Pallas", "cudnn"])
def test_make_ctc_loss_refuses_an_implementation_it_does_not_have(impl):
  with pytest.raises(ValueError, match=f"ctc impl must be one of .*, got '{impl}'"):
    make_ctc_loss(impl=impl, backend="cpu")


@pytest.mark.parametrize("implementation", ["auto", "Pallas", "cudnn"])
def test_ctc_loss_refuses_an_implementation_it_does_not_have(implementation):
  logits = jnp.zeros((1, 3, NUM_CLASSES))
  labels, label_paddings = labels_batch([[1]], 1)
  with pytest.raises(ValueError, match="implementation must be 'optax' or 'pallas'"):
    ctc_loss(logits, paddings_for([3], 3), labels, label_paddings, jnp.ones(1), implementation)


def test_kernel_loss_equals_optax_loss_with_filler_rows():
  logits = np.random.default_rng(4).normal(size=(3, 6, NUM_CLASSES)).astype(np.float32)
  paddings = paddings_for([6, 4, 5], 6)
  labels, label_paddings = labels_batch([[1, 2], [2, 2], [1]], 2)
  weights = jnp.asarray([1.0, 1.0, 0.0])
  results = [
    jax.value_and_grad(lambda x, fn=fn: fn(x, paddings, labels, label_paddings, weights)[0])(
      jnp.asarray(logits)
    )
    for fn in (make_ctc_loss(impl="optax"), make_ctc_loss(impl="pallas"))
  ]
  (optax_loss, optax_grad), (kernel_loss, kernel_grad) = results
  np.testing.assert_allclose(kernel_loss, optax_loss, rtol=1e-5)
  np.testing.assert_allclose(kernel_grad, optax_grad, rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(kernel_grad)[2])  # the filler row gets no gradient
