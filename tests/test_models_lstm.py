"""The LSTM layer and stack: numerics against Flax's cell, padding invariance, training plumbing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.ctc import ctc_loss
from models.lstm import LstmCtcModel, LstmLayer, lengths_from_paddings, reverse_within_length
from models.lstm_kernel import KernelConfig

FEATURES = 5
HIDDEN = 6
NUM_CLASSES = 7


def paddings_for(lengths, time):
  """`[batch]` lengths -> `[batch, time]` float paddings, 1.0 = padded."""
  return (np.arange(time)[None, :] >= np.asarray(lengths)[:, None]).astype(np.float32)


def padded_batch(sequences, time, seed=0):
  """Right-pads `[length_b, features]` arrays to `time` frames with large random garbage, so any
  leak from padding into valid outputs shows."""
  garbage = np.random.default_rng(seed).normal(0.0, 100.0, (len(sequences), time, FEATURES))
  inputs = garbage.astype(np.float32)
  for row, sequence in enumerate(sequences):
    inputs[row, : len(sequence)] = sequence
  return jnp.asarray(inputs), jnp.asarray(paddings_for([len(s) for s in sequences], time))


def random_sequences(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(length, FEATURES)).astype(np.float32) for length in lengths]


def flax_cell_to_ours(cell_params_per_direction):
  """Concatenates `nn.OptimizedLSTMCell` parameters (one dict per direction) into `LstmLayer`'s."""
  gates = "ifgo"
  input_kernel = [
    np.concatenate([p[f"i{g}"]["kernel"] for g in gates], -1) for p in cell_params_per_direction
  ]
  recurrent = [
    np.concatenate([p[f"h{g}"]["kernel"] for g in gates], -1) for p in cell_params_per_direction
  ]
  bias = [
    np.concatenate([p[f"h{g}"]["bias"] for g in gates], -1) for p in cell_params_per_direction
  ]
  return {
    "params": {
      "input_kernel": jnp.stack(input_kernel),
      "recurrent_kernel": jnp.stack(recurrent),
      "bias": jnp.stack(bias),
    }
  }


def test_reverse_within_length_keeps_padding_in_place():
  # Padding that differs frame by frame, so that a padded frame moved anywhere shows.
  sequences = jnp.array([[1, 2, 3, -1, -2], [4, 5, 6, 7, 8], [9, -3, -4, -5, -6]])
  reversed_ = reverse_within_length(sequences, jnp.array([3, 5, 1]))
  np.testing.assert_array_equal(
    reversed_, [[3, 2, 1, -1, -2], [8, 7, 6, 5, 4], [9, -3, -4, -5, -6]]
  )
  np.testing.assert_array_equal(reverse_within_length(reversed_, jnp.array([3, 5, 1])), sequences)


def test_an_unknown_implementation_is_an_error_not_the_scan():
  inputs, paddings = padded_batch(random_sequences([2]), time=2)
  with pytest.raises(ValueError, match='implementation must be "scan" or "pallas", got \'Pallas\''):
    LstmLayer(HIDDEN, implementation="Pallas").init(jax.random.key(0), inputs, paddings)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_output_shape_and_zeroed_padding(bidirectional):
  inputs, paddings = padded_batch(random_sequences([8, 3, 1]), time=8)
  layer = LstmLayer(HIDDEN, bidirectional=bidirectional)
  variables = layer.init(jax.random.key(0), inputs, paddings)
  outputs = layer.apply(variables, inputs, paddings)
  assert outputs.shape == (3, 8, HIDDEN * (2 if bidirectional else 1))
  assert outputs.dtype == jnp.float32
  np.testing.assert_array_equal(outputs[paddings > 0], 0.0)
  assert np.all(np.abs(outputs[paddings == 0]) > 0)


def test_each_direction_starts_from_its_own_orthogonal_recurrent_kernel():
  hidden = 32
  inputs, paddings = padded_batch(random_sequences([4]), time=4)
  params = LstmLayer(hidden, bidirectional=True).init(jax.random.key(0), inputs, paddings)["params"]
  recurrent = np.asarray(params["recurrent_kernel"])  # [directions, hidden, 4 * hidden]
  for kernel in recurrent:  # orthonormal rows over all four gates, as the docstring says
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(hidden), atol=1e-5)
  assert not np.allclose(recurrent[0], recurrent[1])
  np.testing.assert_array_equal(params["bias"], 0.0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_matches_flax_optimized_lstm_cell(bidirectional):
  """Same weights, same valid outputs as Flax's stock cell run by `nn.RNN` with `seq_lengths`
  (whose `nn.Bidirectional` also reverses within length)."""
  lengths = [9, 5, 2]
  inputs, paddings = padded_batch(random_sequences(lengths), time=9)
  if bidirectional:
    reference = nn.Bidirectional(
      nn.RNN(nn.OptimizedLSTMCell(HIDDEN)), nn.RNN(nn.OptimizedLSTMCell(HIDDEN))
    )
  else:
    reference = nn.RNN(nn.OptimizedLSTMCell(HIDDEN))
  seq_lengths = jnp.array(lengths)
  reference_variables = reference.init(jax.random.key(1), inputs, seq_lengths=seq_lengths)
  expected = reference.apply(reference_variables, inputs, seq_lengths=seq_lengths)
  params = reference_variables["params"]
  cells = (
    [params["forward_rnn"]["cell"], params["backward_rnn"]["cell"]]
    if bidirectional
    else [params["cell"]]
  )

  outputs = LstmLayer(HIDDEN, bidirectional=bidirectional).apply(
    flax_cell_to_ours(cells), inputs, paddings
  )
  valid = paddings == 0
  np.testing.assert_allclose(outputs[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_gradients_match_flax_optimized_lstm_cell(bidirectional):
  """The hand-written gradient of the recurrence (and of the reversal) equals autodiff through
  Flax's stock cell, for the weights and for the inputs, with garbage in the padding."""
  lengths = [9, 5, 2]
  inputs, paddings = padded_batch(random_sequences(lengths, seed=4), time=9)
  valid = (paddings == 0)[..., None]
  seq_lengths = jnp.array(lengths)
  if bidirectional:
    reference = nn.Bidirectional(
      nn.RNN(nn.OptimizedLSTMCell(HIDDEN)), nn.RNN(nn.OptimizedLSTMCell(HIDDEN))
    )
  else:
    reference = nn.RNN(nn.OptimizedLSTMCell(HIDDEN))
  reference_params = reference.init(jax.random.key(1), inputs, seq_lengths=seq_lengths)["params"]
  targets = jax.random.normal(jax.random.key(2), (3, 9, HIDDEN * (2 if bidirectional else 1)))

  def reference_loss(params, inputs):
    outputs = reference.apply({"params": params}, inputs, seq_lengths=seq_lengths)
    return jnp.sum(jnp.where(valid, (outputs - targets) ** 2, 0.0))

  def our_loss(params, inputs):
    outputs = LstmLayer(HIDDEN, bidirectional=bidirectional).apply(params, inputs, paddings)
    return jnp.sum(jnp.where(valid, (outputs - targets) ** 2, 0.0))

  def to_ours(params):
    if bidirectional:
      return flax_cell_to_ours([params["forward_rnn"]["cell"], params["backward_rnn"]["cell"]])
    return flax_cell_to_ours([params["cell"]])

  expected_params, expected_inputs = jax.grad(reference_loss, argnums=(0, 1))(
    reference_params, inputs
  )
  params, input_grads = jax.grad(our_loss, argnums=(0, 1))(to_ours(reference_params), inputs)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    params,
    to_ours(expected_params),
  )
  np.testing.assert_allclose(input_grads, expected_inputs, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(input_grads[paddings > 0], 0.0)


def test_backward_direction_equals_forward_pass_over_reversed_sequence():
  """Each row's backward half is the forward recurrence run over that row alone, reversed."""
  lengths = [7, 4, 1]
  sequences = random_sequences(lengths, seed=3)
  inputs, paddings = padded_batch(sequences, time=10)
  layer = LstmLayer(HIDDEN, bidirectional=True)
  variables = layer.init(jax.random.key(2), inputs, paddings)
  backward_half = layer.apply(variables, inputs, paddings)[..., HIDDEN:]

  backward_only = jax.tree.map(lambda param: param[1:], variables)
  for row, sequence in enumerate(sequences):
    alone = jnp.asarray(sequence[::-1])[None]
    expected = LstmLayer(HIDDEN).apply(backward_only, alone, jnp.zeros(alone.shape[:2]))[0, ::-1]
    np.testing.assert_allclose(backward_half[row, : lengths[row]], expected, rtol=1e-5, atol=1e-5)


def layer_outputs_and_gradients(lengths, bidirectional, **layer_options):
  """A layer's outputs and its gradients (parameters, inputs) for a fixed random cotangent, on
  fixed random sequences of `lengths` padded to the longest: compare them across options that
  shape the scan's loop, not what it computes."""
  time = max(lengths)
  inputs, paddings = padded_batch(random_sequences(lengths), time=time)
  width = 2 * HIDDEN if bidirectional else HIDDEN
  cotangent = jax.random.normal(jax.random.key(1), (len(lengths), time, width))
  variables = LstmLayer(HIDDEN, bidirectional).init(jax.random.key(0), inputs, paddings)
  layer = LstmLayer(HIDDEN, bidirectional, **layer_options)
  loss = lambda variables, inputs: jnp.sum(layer.apply(variables, inputs, paddings) * cotangent)
  return layer.apply(variables, inputs, paddings), jax.grad(loss, (0, 1))(variables, inputs)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("unroll", [3, 8])
def test_unroll_changes_no_output_or_gradient(bidirectional, unroll):
  """The GPU trains at unroll 8 (`models.factory.DEFAULT_UNROLL`); the hand-written gradient is
  checked against Flax's cell at unroll 1. Neither 3 nor 8 divides the 11 frames."""
  rolled = layer_outputs_and_gradients([11, 6], bidirectional, unroll=1)
  unrolled = layer_outputs_and_gradients([11, 6], bidirectional, unroll=unroll)
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6), unrolled, rolled
  )


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("unroll", [1, 3])
def test_prefetching_scan_steps_change_no_output_or_gradient(bidirectional, unroll):
  # Lengths 11 and 1: a loop whose last step has no next step to slice, and unroll 3 that does not
  # divide the time axis.
  plain = layer_outputs_and_gradients([11, 1], bidirectional, unroll=unroll, prefetch=False)
  prefetched = layer_outputs_and_gradients([11, 1], bidirectional, unroll=unroll, prefetch=True)
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6), prefetched, plain
  )


def small_model(bidirectional=True, dropout_rate=0.0, implementation="scan"):
  return LstmCtcModel(
    num_classes=NUM_CLASSES,
    num_layers=2,
    hidden_size=HIDDEN,
    bidirectional=bidirectional,
    dropout_rate=dropout_rate,
    input_projection_size=4,
    lstm_implementation=implementation,
    kernel_config=KernelConfig(interpret=True),
  )


def labels_batch(label_lists, label_time):
  labels = np.zeros((len(label_lists), label_time), np.int32)
  for row, label in enumerate(label_lists):
    labels[row, : len(label)] = label
  return jnp.asarray(labels), jnp.asarray(
    paddings_for([len(label) for label in label_lists], label_time)
  )


@pytest.mark.parametrize(
  "bidirectional, implementation", [(False, "scan"), (True, "scan"), (True, "pallas")]
)
def test_model_padding_invariance_of_logits_loss_and_gradients(bidirectional, implementation):
  """The same examples in two buckets (padded to 9 and to 16 frames, labels to 3 and 5) give the
  same valid logits, the same loss and the same gradients."""
  frame_lengths = [9, 6, 2]
  sequences = random_sequences(frame_lengths, seed=5)
  label_lists = [[1, 2, 2], [3, 4], [5]]
  weights = jnp.ones(3)
  model = small_model(bidirectional, implementation=implementation)
  short_inputs, short_paddings = padded_batch(sequences, time=9, seed=1)
  long_inputs, long_paddings = padded_batch(sequences, time=16, seed=2)
  variables = model.init(jax.random.key(0), short_inputs, short_paddings)

  def loss_fn(params, inputs, paddings, label_time):
    labels, label_paddings = labels_batch(label_lists, label_time)
    logits = model.apply({"params": params}, inputs, paddings)
    return ctc_loss(logits, paddings, labels, label_paddings, weights)[0], logits

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=3)
  (short_loss, short_logits), short_grads = grad_fn(
    variables["params"], short_inputs, short_paddings, 3
  )
  (long_loss, long_logits), long_grads = grad_fn(variables["params"], long_inputs, long_paddings, 5)

  for row, length in enumerate(frame_lengths):
    np.testing.assert_allclose(
      short_logits[row, :length], long_logits[row, :length], rtol=1e-5, atol=1e-5
    )
  np.testing.assert_allclose(short_loss, long_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), short_grads, long_grads
  )


@pytest.mark.parametrize("implementation", ["scan", "pallas"])
def test_filler_rows_change_no_loss_logit_or_gradient(implementation):
  """A bucket's last batch completed by filler rows (one valid frame of garbage, an empty label,
  weight 0) trains exactly as the real rows alone would."""
  sequences = random_sequences([7, 4, 2], seed=6)
  label_lists = [[1, 2], [3], [4, 4]]
  model = small_model(implementation=implementation)
  real_inputs, real_paddings = padded_batch(sequences, time=7, seed=3)
  filler_inputs = np.random.default_rng(4).normal(0.0, 100.0, (2, 7, FEATURES))
  inputs = jnp.concatenate([real_inputs, filler_inputs.astype(np.float32)])
  paddings = jnp.concatenate([real_paddings, paddings_for([1, 1], 7)])
  params = model.init(jax.random.key(0), real_inputs, real_paddings)["params"]

  def loss_fn(params, inputs, paddings, label_lists, weights):
    labels, label_paddings = labels_batch(label_lists, 2)
    logits = model.apply({"params": params}, inputs, paddings)
    return ctc_loss(logits, paddings, labels, label_paddings, weights)[0], logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (real_loss, real_logits), real_grads = grad_fn(
    params, real_inputs, real_paddings, label_lists, jnp.ones(3)
  )
  (loss, logits), grads = grad_fn(
    params, inputs, paddings, [*label_lists, [], []], jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
  )
  np.testing.assert_allclose(loss, real_loss, rtol=1e-6)
  np.testing.assert_allclose(logits[:3], real_logits, rtol=1e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, real_grads
  )


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_non_finite_padding_changes_no_loss_or_gradient(garbage):
  """Padded frames holding NaN or inf (say, features of a frame that was never computed) change
  nothing: the model zeroes them on entry, where a NaN that reached the recurrence would reach
  every valid frame's gradient through the backward pass (0 * NaN is NaN)."""
  sequences = random_sequences([6, 3], seed=7)
  model = small_model()
  clean_inputs, paddings = padded_batch(sequences, time=6)
  clean_inputs = jnp.where(paddings[..., None] > 0, 0.0, clean_inputs)
  dirty_inputs = jnp.where(paddings[..., None] > 0, garbage, clean_inputs)
  labels, label_paddings = labels_batch([[1, 2], [3]], 2)
  params = model.init(jax.random.key(0), clean_inputs, paddings)["params"]

  def loss_fn(params, inputs):
    logits = model.apply({"params": params}, inputs, paddings)
    return ctc_loss(logits, paddings, labels, label_paddings, jnp.ones(2))[0]

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  clean_loss, clean_grads = grad_fn(params, clean_inputs)
  dirty_loss, dirty_grads = grad_fn(params, dirty_inputs)
  assert np.isfinite(clean_loss)
  np.testing.assert_allclose(dirty_loss, clean_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), dirty_grads, clean_grads
  )


def test_one_gradient_step_changes_every_parameter():
  model = small_model(dropout_rate=0.1)
  inputs, paddings = padded_batch(random_sequences([8, 5]), time=8)
  labels, label_paddings = labels_batch([[1, 2, 3], [4]], 3)
  variables = model.init(jax.random.key(0), inputs, paddings)

  def loss_fn(params):
    logits = model.apply(
      {"params": params}, inputs, paddings, train=True, rngs={"dropout": jax.random.key(1)}
    )
    return ctc_loss(logits, paddings, labels, label_paddings, jnp.ones(2))[0]

  optimizer = optax.adam(1e-2)
  params = variables["params"]
  updates, _ = optimizer.update(jax.jit(jax.grad(loss_fn))(params), optimizer.init(params), params)
  new_params = optax.apply_updates(params, updates)
  changed = jax.tree.map(lambda old, new: bool(np.all(old != new)), params, new_params)
  assert all(jax.tree.leaves(changed)), changed


def test_dropout_is_active_only_in_training():
  model = small_model(dropout_rate=0.5)
  inputs, paddings = padded_batch(random_sequences([6, 6]), time=6)
  variables = model.init(jax.random.key(0), inputs, paddings)
  evaluation = model.apply(variables, inputs, paddings)
  np.testing.assert_array_equal(evaluation, model.apply(variables, inputs, paddings, train=False))
  training = model.apply(
    variables, inputs, paddings, train=True, rngs={"dropout": jax.random.key(1)}
  )
  assert not np.allclose(training, evaluation)


def test_dropout_drops_at_the_configured_rate():
  """Rate 0 changes nothing even in training; at rate 0.25 about a quarter of every LSTM layer's
  outputs at valid frames are zeroed and the rest scaled by 1 / 0.75."""
  inputs, paddings = padded_batch(random_sequences([20, 20]), time=20)
  rngs = {"dropout": jax.random.key(1)}
  variables = small_model().init(jax.random.key(0), inputs, paddings)
  np.testing.assert_array_equal(
    small_model(dropout_rate=0.0).apply(variables, inputs, paddings, train=True, rngs=rngs),
    small_model().apply(variables, inputs, paddings),
  )
  _, state = small_model(dropout_rate=0.25).apply(
    variables,
    inputs,
    paddings,
    train=True,
    rngs=rngs,
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  intermediates = state["intermediates"]
  for layer in range(2):
    (before,) = intermediates[f"lstm_{layer}"]["__call__"]
    (after,) = intermediates[f"Dropout_{layer}"]["__call__"]
    before, after = np.asarray(before).ravel(), np.asarray(after).ravel()
    dropped = after == 0
    assert 0.2 < dropped.mean() < 0.3, dropped.mean()  # 480 values: 120 +- 9.5 expected
    np.testing.assert_allclose(after[~dropped], before[~dropped] / 0.75, rtol=1e-6)


def test_bfloat16_computation_stays_close_to_float32():
  inputs, paddings = padded_batch(random_sequences([12, 7]), time=12)
  variables = small_model().init(jax.random.key(0), inputs, paddings)
  expected = small_model().apply(variables, inputs, paddings)
  low_precision = small_model().clone(dtype=jnp.bfloat16).apply(variables, inputs, paddings)
  assert low_precision.dtype == jnp.float32
  valid = paddings == 0
  scale = float(jnp.max(jnp.abs(expected[valid])))
  np.testing.assert_allclose(low_precision[valid], expected[valid], atol=2e-2 * scale)


def test_a_bfloat16_model_computes_every_layer_in_bfloat16():
  """Not only its logits' closeness to float32 (a layer left in float32 would be closer still):
  each layer's activations come out in the model's dtype, the logits in float32."""
  inputs, paddings = padded_batch(random_sequences([5, 3]), time=5)
  model = small_model().clone(dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), inputs, paddings)
  logits, state = model.apply(
    variables, inputs, paddings, capture_intermediates=True, mutable=["intermediates"]
  )
  assert logits.dtype == jnp.float32
  intermediates = state["intermediates"]
  for name in ["input_projection", "lstm_0", "lstm_1", "output_projection"]:
    (activations,) = intermediates[name]["__call__"]
    assert activations.dtype == jnp.bfloat16, name


def scan_loops(jaxpr) -> set[tuple[int, int]]:
  """`(unroll, carried values)` of every `scan` in `jaxpr` and the jaxprs nested in it."""
  loops = set()
  for equation in jaxpr.eqns:
    if equation.primitive.name == "scan":
      loops.add((equation.params["unroll"], equation.params["num_carry"]))
    for param in equation.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        loops |= scan_loops(inner)
  return loops


def test_the_models_scan_options_reach_every_layer():
  """`unroll` and `scan_prefetch` change no value (see the tests above), only how the scan loops:
  the model's loops are those of a layer given the same options, and not the default's."""
  inputs, paddings = padded_batch(random_sequences([5, 3]), time=5)
  model = small_model().clone(unroll=3, scan_prefetch=True)
  variables = model.init(jax.random.key(0), inputs, paddings)
  loops = scan_loops(jax.make_jaxpr(model.apply)(variables, inputs, paddings).jaxpr)

  def layer_loops(**options):
    layer = LstmLayer(HIDDEN, bidirectional=True, **options)
    layer_inputs = jnp.zeros((2, 5, 4))  # after the input projection
    layer_variables = layer.init(jax.random.key(0), layer_inputs, paddings)
    return scan_loops(jax.make_jaxpr(layer.apply)(layer_variables, layer_inputs, paddings).jaxpr)

  assert loops == layer_loops(unroll=3, prefetch=True)
  assert loops != layer_loops()


def rounded(array):
  """`array` rounded to bfloat16, in float32."""
  return array.astype(jnp.bfloat16).astype(jnp.float32)


def bfloat16_reference_layer(params, inputs, paddings, hidden_size):
  """A bidirectional bfloat16 `LstmLayer` as its contract states it, in float32 arithmetic: the
  matmul operands (inputs, weights, the previous hidden state) rounded to bfloat16, their
  products summed in float32, the gates and the cell state float32, the outputs rounded."""
  lengths = lengths_from_paddings(paddings)
  directions = [inputs, reverse_within_length(inputs, lengths)]
  outputs = []
  for direction, direction_inputs in enumerate(directions):
    projected = params["bias"][direction] + jnp.einsum(
      "btf,fg->tbg",
      rounded(direction_inputs),
      rounded(params["input_kernel"][direction]),
      precision="highest",
    )
    recurrent_kernel = rounded(params["recurrent_kernel"][direction])

    def step(carry, projected_step, recurrent_kernel=recurrent_kernel):
      cell, hidden = carry
      gates = projected_step + jnp.dot(rounded(hidden), recurrent_kernel, precision="highest")
      input_gate, forget_gate, cell_input, output_gate = jnp.split(gates, 4, axis=-1)
      cell = jax.nn.sigmoid(forget_gate) * cell + jax.nn.sigmoid(input_gate) * jnp.tanh(cell_input)
      hidden = jax.nn.sigmoid(output_gate) * jnp.tanh(cell)
      return (cell, hidden), hidden

    zeros = jnp.zeros((inputs.shape[0], hidden_size))
    _, states = jax.lax.scan(step, (zeros, zeros), projected)
    outputs.append(jnp.swapaxes(states, 0, 1))
  outputs[1] = reverse_within_length(outputs[1], lengths)
  return jnp.where(paddings[..., None] > 0, 0.0, rounded(jnp.concatenate(outputs, axis=-1)))


@pytest.mark.parametrize("implementation", ["scan", "pallas"])
def test_a_bfloat16_layer_rounds_only_its_matmul_operands_over_long_sequences(implementation):
  """Against `bfloat16_reference_layer` over 400 frames: a cell state held in bfloat16, say, would
  drift from it (at 1 in 5 outputs, by a bfloat16 step) where a float32 comparison could not tell
  it from bfloat16's own rounding. Summation order may flip a rounding now and then, no more."""
  hidden = 32
  inputs, paddings = padded_batch(random_sequences([400, 250, 37], seed=5), time=400)
  variables = LstmLayer(hidden, bidirectional=True).init(jax.random.key(0), inputs, paddings)
  layer = LstmLayer(
    hidden,
    bidirectional=True,
    implementation=implementation,
    kernel_config=KernelConfig(weights_resident=True, prefetch=True, interpret=True),
    dtype=jnp.bfloat16,
  )
  outputs = layer.apply(variables, inputs, paddings)
  assert outputs.dtype == jnp.bfloat16
  expected = bfloat16_reference_layer(variables["params"], inputs, paddings, hidden)
  differ = np.asarray(outputs.astype(jnp.float32) != expected)
  assert differ.mean() < 0.01
  np.testing.assert_allclose(outputs.astype(jnp.float32), expected, atol=2**-7)


def test_bfloat16_gradients_stay_close_to_float32():
  inputs, paddings = padded_batch(random_sequences([12, 7]), time=12)
  variables = small_model().init(jax.random.key(0), inputs, paddings)

  def gradients(model):
    def loss(params):
      logits = model.apply({"params": params}, inputs, paddings)
      return jnp.sum(jnp.where(paddings[..., None] == 0, logits, 0.0) ** 2)

    return jax.grad(loss)(variables["params"])

  expected = gradients(small_model())
  low_precision = gradients(small_model().clone(dtype=jnp.bfloat16))
  for path, want in jax.tree_util.tree_leaves_with_path(expected):
    got = functools.reduce(lambda tree, key: tree[key.key], path, low_precision)
    assert got.dtype == want.dtype, path
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=5e-2 * scale, err_msg=str(path))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lengths_from_paddings(dtype):
  lengths = [3, 0, 5, 299, 1000]
  paddings = jnp.asarray(paddings_for(lengths, 1000), dtype)
  np.testing.assert_array_equal(lengths_from_paddings(paddings), lengths)
