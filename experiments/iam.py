"""The paper's setup: a BLSTM-CTC on IAM-OnDB (IAM-OnDB-t1 splits), optimally bucketed.

    export IAM_ONDB_DIR=/path/to/iam-ondb   # the download: see the README's Data section
    python train.py --config=experiments/iam.py --workdir=/tmp/iam
    python train.py --config=experiments/iam.py:tiny --workdir=/tmp/iam-tiny   # CI, real data

Train on `train`, stop early on `validation` (testset_v), report CER on `test` (testset_f).
The model sizes are ours; the paper's claim reproduced is the speed-up from bucketing at equal
validation loss (see experiments/paper.py and the README's Results).
"""

import os

import ml_collections

from experiments import common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.data.dataset = "iam_ondb"
  config.data.manual_dir = os.environ.get("IAM_ONDB_DIR")
  config.data.test_split = "test"
  config.data.features.resample_spacing = None
  config.model.num_layers = 3
  config.model.hidden_size = 128
  config.bucketing.strategy = "optimal"
  config.bucketing.num_buckets = 8
  config.bucketing.batch_size = 32
  if variant == "tiny":
    config = common.tiny(config)
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r} of experiments/iam.py; known: tiny")
  return config
