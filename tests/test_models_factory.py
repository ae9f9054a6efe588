"""`make_model`: plain keyword arguments in, a configured model out, bad values refused early."""

import jax
import jax.numpy as jnp
import pytest

from models.factory import make_model
from models.lstm import LstmCtcModel

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
  "override",
  [
    {"num_classes": 1},
    {"num_layers": 0},
    {"hidden_size": 0},
    {"dropout_rate": 1.0},
    {"input_projection_size": 0},
    {"unroll": 0},
  ],
)
def test_out_of_range_values_are_refused(override):
  with pytest.raises(ValueError):
    make_model(**{**CONFIG, **override})


def test_unknown_keys_are_refused():
  with pytest.raises(TypeError):
    make_model(**CONFIG, hiden_size=4)
