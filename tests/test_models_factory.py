"""`make_model`: plain keyword arguments in, a configured model out, bad values refused early."""

import jax
import jax.numpy as jnp
import pytest

from experiments import common
from models import factory
from models.factory import make_model
from models.lstm import LstmCtcModel
from models.lstm_kernel import LAUNCH_FIELDS, KernelConfig

CONFIG = {"num_classes": 5, "num_layers": 2, "hidden_size": 3}


def test_builds_the_configured_model_with_the_right_logit_shape():
  model = make_model(**CONFIG, bidirectional=False, dtype="bfloat16", unroll=2)
  assert isinstance(model, LstmCtcModel)
  assert model.dtype == jnp.bfloat16
  assert not model.bidirectional
  inputs = jnp.ones((2, 7, 4))
  paddings = jnp.zeros((2, 7))
  logits = model.apply(model.init(jax.random.key(0), inputs, paddings), inputs, paddings)
  assert logits.shape == (2, 7, 5)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize(
  "override, message",
  [
    ({"num_classes": 1}, "num_classes must count the blank plus at least one label, got 1"),
    ({"num_layers": 0}, "num_layers must be >= 1, got 0"),
    ({"hidden_size": 0}, "hidden_size must be >= 1, got 0"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\), got 1.0"),
    ({"dropout_rate": -0.1}, r"dropout_rate must be in \[0, 1\), got -0.1"),
    ({"input_projection_size": 0}, "input_projection_size must be None or >= 1, got 0"),
    ({"unroll": -1}, "unroll must be >= 1, or 0 for the backend's default, got -1"),
    ({"lstm_impl": "cudnn"}, "lstm_impl must be one of .*, got 'cudnn'"),
    # Triton's dots want powers of two, of at least 16 rows.
    ({"kernel": {"batch_tile": 24}}, "batch_tile must be a power of two of at least 16, got 24"),
    ({"kernel": {"batch_tile": 8}}, "batch_tile must be a power of two of at least 16, got 8"),
    ({"kernel": {"batch_tile": 0}}, "batch_tile must be a power of two of at least 16, got 0"),
  ],
)
def test_out_of_range_values_are_refused(override, message):
  with pytest.raises(ValueError, match=message):
    make_model(**{**CONFIG, **override})


def test_the_kernel_runs_interpreted_off_the_gpu_unless_told_otherwise():
  assert make_model(**CONFIG, backend="cpu").kernel_config.interpret
  assert make_model(**CONFIG, backend="tpu").kernel_config.interpret  # Triton is a GPU's only
  assert not make_model(**CONFIG, backend="gpu").kernel_config.interpret
  told = make_model(**CONFIG, backend="cpu", kernel={"interpret": False, "batch_tile": 32})
  assert not told.kernel_config.interpret and told.kernel_config.batch_tile == 32


def test_every_argument_reaches_the_model():
  """Values unlike every default, so that one dropped on the way shows as the default."""
  model = make_model(
    num_classes=7, num_layers=3, hidden_size=5, dropout_rate=0.25, input_projection_size=4
  )
  assert model.num_classes == 7
  assert model.num_layers == 3
  assert model.hidden_size == 5
  assert model.dropout_rate == 0.25
  assert model.input_projection_size == 4
  inputs, paddings = jnp.ones((1, 3, 2)), jnp.zeros((1, 3))
  params = model.init(jax.random.key(0), inputs, paddings)["params"]
  assert set(params) == {"input_projection", "lstm_0", "lstm_1", "lstm_2", "output_projection"}
  assert params["input_projection"]["kernel"].shape == (2, 4)
  assert params["lstm_2"]["recurrent_kernel"].shape == (2, 5, 20)
  assert params["output_projection"]["kernel"].shape == (10, 7)


def test_unknown_keys_are_refused():
  with pytest.raises(TypeError):
    make_model(**CONFIG, hiden_size=4)


@pytest.mark.parametrize(
  "lstm_impl, backend, dtype, expected",
  [
    ("auto", "gpu", "float32", "scan"),  # float32 weights do not fit on chip: slower on an H200
    ("auto", "gpu", "bfloat16", "pallas"),  # 16.5 against 22.6 ms a train step on an H200
    ("auto", "cpu", "bfloat16", "scan"),
    ("auto", "cpu", "float32", "scan"),
    ("scan", "gpu", "bfloat16", "scan"),
    ("pallas", "gpu", "float32", "pallas"),
    ("pallas", "cpu", "float32", "pallas"),
  ],
)
def test_lstm_impl_takes_the_kernel_only_where_it_measured_faster(
  lstm_impl, backend, dtype, expected
):
  model = make_model(**CONFIG, lstm_impl=lstm_impl, backend=backend, dtype=dtype)
  assert model.lstm_implementation == expected
  # Off the GPU the kernel can only run in the Pallas interpreter.
  assert model.kernel_config.interpret == (backend != "gpu")


def test_lstm_impl_auto_follows_the_measured_dtypes_and_sizes(monkeypatch):
  monkeypatch.setitem(factory.KERNEL_DTYPES, "cpu", ("float32",))
  assert make_model(**CONFIG, backend="cpu").lstm_implementation == "pallas"
  assert make_model(**CONFIG, backend="cpu", dtype="bfloat16").lstm_implementation == "scan"
  # Up to the size measured (padded to a power of two), not past it: its weights would not fit.
  for hidden_size, expected in [(100, "pallas"), (128, "pallas"), (129, "scan"), (256, "scan")]:
    sized = {**CONFIG, "hidden_size": hidden_size}
    assert make_model(**sized, backend="cpu").lstm_implementation == expected
    assert make_model(**sized, backend="gpu", dtype="bfloat16").lstm_implementation == expected


def test_kernel_launch_parameters_left_unset_are_the_fastest_measured_for_the_dtype():
  unset = common.base_config().model.kernel.to_dict()
  assert unset == dict.fromkeys(LAUNCH_FIELDS)  # the config names every launch field, unset
  float32 = make_model(**CONFIG, backend="gpu", kernel=unset).kernel_config
  assert float32 == KernelConfig()  # its defaults are float32's fastest
  bfloat16 = make_model(**CONFIG, backend="gpu", kernel=unset, dtype="bfloat16").kernel_config
  assert bfloat16 == KernelConfig(weights_resident=True, prefetch=True)
  # What the config sets wins over the measured defaults, for either dtype.
  told = {**unset, "prefetch": False, "num_warps": 16}
  model = make_model(**CONFIG, backend="gpu", kernel=told, dtype="bfloat16")
  assert model.kernel_config == KernelConfig(num_warps=16, weights_resident=True)
  assert make_model(**CONFIG, backend="gpu", kernel=told).kernel_config.num_warps == 16


@pytest.mark.parametrize("backend, expected", [("gpu", 8), ("cpu", 1)])
def test_unroll_zero_takes_the_backends_measured_default(backend, expected):
  assert make_model(**CONFIG, unroll=0, backend=backend).unroll == expected
  assert make_model(**CONFIG, unroll=3, backend=backend).unroll == 3


def test_scan_steps_prefetch_only_where_measured_faster():
  assert make_model(**CONFIG, backend="cpu").scan_prefetch
  assert not make_model(**CONFIG, backend="gpu").scan_prefetch
