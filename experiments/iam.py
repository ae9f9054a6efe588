"""The paper's setup: a BLSTM-CTC on IAM-OnDB (IAM-OnDB-t1 splits), optimally bucketed.

    export IAM_ONDB_DIR=/path/to/iam-ondb   # the download: see the README's Data section
    python train.py --config=experiments/iam.py --workdir=/tmp/iam
    python train.py --config=experiments/iam.py:tiny --workdir=/tmp/iam-tiny   # CI, real data
    python train.py --config=experiments/iam.py:gpu --workdir=/tmp/iam-gpu     # one GPU lease
    python train.py --config=experiments/iam.py:cpu --workdir=/tmp/iam-cpu     # 90 CPU minutes

Train on `train`, stop early on `validation` (testset_v), report CER on `test` (testset_f).
The model sizes are ours; the paper's claim reproduced is the speed-up from bucketing at equal
validation loss (see experiments/paper.py and the README's Results).

`gpu`: the same model trained within one 10-minute call on one GPU, on lines resampled to 0.2 line
heights between points (`data.features.resample_spacing`): 213 frames a line on average instead of
615, and the step's time is mostly its frames one after another (on an H200 it fits 0.79 ms + 35 us
per frame + 165 ns per frame and line, results/projection_multi_gpu.md), so an epoch should take
about a third of the time. At equal CPU minutes resampled lines learned far more than raw points
(validation CER 0.229 against 0.541, results/recipe_quick_cpu.md). Its step holds a budget of
padded frames instead of 32 lines: 4 x 32 lines of the median bucket (216 frames), since on an H200
a step of 128 lines took 1.39x the time of 32 at 608 frames (34.9 against 25.1 ms,
results/benchmark_step_gpu_defaults.md), so a budget 4x larger should pass an epoch about 2.9x
faster. Together they measured 6.7x on an H200, short of the 8.7x this predicts (an epoch in 0.69 s
against the base's 4.61 s, results/accuracy_gpu_metrics.jsonl). The learning rate follows the
learning-rate part of the square-root rule for Adam (x sqrt(4), as experiments/recipe.py scales it)
and the warm-up is as many sequences as the base's. The learning rate stays constant after the
warm-up: the run ends at the time cap, not after a planned number of epochs that a cosine could
decay over (a constant rate did as well as the cosine in results/recipe_quick_cpu.md). The best
epoch and early stopping go by validation CER, not loss: on the full training set a CPU run's
validation loss was lowest after 8 epochs (13.2, CER 0.125) and rose to 23.2 by its 62nd while its
CER fell to 0.112 at its 52nd (results/recipe_full_cpu.md). On one H200 (`experiments/gpu_call.sh`'s
`accuracy` stage, results/accuracy_gpu.json) an epoch took 0.69 s, against 4.61 s for the base on
raw points (results/benchmark_step_gpu_defaults.md); early stopping ended the run after 63 epochs,
the whole call, wheels included, took 4.2 minutes, and its best epoch by validation CER (0.108, the
48th) scored a test CER of 0.071. With dropout 0.2 (the base's) its validation loss rose after the
21st epoch; 0.4, as `cpu`'s, is untried on a GPU. The `recipe` stage, the same token budget against
the base at equal minutes, has not run on a GPU.

`cpu`: the IAM-OnDB-t1 recipe for a CPU, 90 minutes: lines resampled as `gpu`'s, 2 x BLSTM 128
with dropout 0.4, batch 16 at a learning rate of 6e-3 (what learned fastest per CPU-minute in
results/recipe_quick_cpu.md), a cosine over 70 epochs (what a one-epoch probe said fit 90 minutes
on a 2-core CPU, 73 s an epoch), a 90-minute cap, no early stopping, the best epoch by validation
CER. Run on a 2-core CPU it trained 52 of the 70 epochs in the 90 minutes; on all of
testset_f (greedy, no language model) its best epoch by validation CER scored a CER of 0.072 and
its last state 0.071 (results/iam_cpu_dropout04_*). The same with dropout 0.2 is what
results/recipe_full_cpu.md ran (`experiments/recipe.py --preset full --minutes-per-run 90` and
that file's `--base`): its validation loss rose from the 8th epoch on (13.2 to 22.1 by the 52nd,
against 18.2 with dropout 0.4) and its last state, after 62 epochs, scored 0.074.
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
  elif variant == "gpu":
    config.data.features.resample_spacing = 0.2
    config.bucketing.batch_size = 0
    config.bucketing.max_tokens = 4 * 32 * 216
    config.optimizer.learning_rate *= 2.0
    config.optimizer.warmup_steps //= 4
    config.optimizer.schedule = "constant"
    config.max_minutes = 8.0  # and a minute for the test split, in one 10-minute call
    config.num_epochs = 200  # the time cap ends it, or early stopping
    config.patience = 15
    config.selection_metric = "val_cer"
  elif variant == "cpu":
    config.data.features.resample_spacing = 0.2
    config.model.num_layers = 2
    config.bucketing.batch_size = 16
    config.optimizer.learning_rate = 6e-3
    config.optimizer.warmup_steps = 100
    config.model.dropout_rate = 0.4
    config.num_epochs = config.patience = 70
    config.max_minutes = 90.0
    config.selection_metric = "val_cer"
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r} of experiments/iam.py; known: tiny, gpu, cpu")
  return config
