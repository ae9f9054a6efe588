"""The embedded default: a BLSTM-CTC on generated handwriting, no download needed.

    python train.py --config=experiments/synthetic.py --workdir=/tmp/synthetic
    python train.py --config=experiments/synthetic.py:tiny --workdir=/tmp/tiny  # for tests

Runs on a fresh CPU machine in minutes and visibly learns (validation CER falls epoch by epoch);
the README's Results section gives the measured run.
"""

import ml_collections

from experiments import common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.data.dataset = "synthetic"
  config.data.synthetic.num_train = 2000
  config.data.synthetic.num_eval = 200
  # Equidistant points 0.2 writing-heights apart halve the synthetic lines (median 615 -> 331
  # steps), which a 2-core CPU needs.
  config.data.features.resample_spacing = 0.2
  config.model.num_layers = 2
  config.model.hidden_size = 64
  config.model.dropout_rate = 0.1
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 50
  config.bucketing.num_buckets = 4
  config.bucketing.batch_size = 32
  config.num_epochs = 15
  config.patience = 3
  if variant == "tiny":
    config = common.tiny(config)
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r} of experiments/synthetic.py; known: tiny")
  return config
