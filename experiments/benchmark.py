"""Training throughput of our bucketed trainer against what users would use instead, side by side.

    python -m experiments.benchmark --quick --data-dir ~/tensorflow_datasets   # minutes on a CPU
    python -m experiments.benchmark --data-dir ~/tensorflow_datasets           # all of IAM-OnDB

One process, one data set (the IAM-OnDB training set when `--data-dir` holds it or `IAM_ONDB_DIR`
is set, else the synthetic set; `--quick` takes its first 256 lines, the features of
`experiments.paper --quick` and a 1 x 32 BLSTM), one model size, the same sequences for every
contender. Each contender trains for an epoch over them `--repeats` times (the schedule reshuffled
each time) and the table gives the median:

- ours: `train.compile_steps` executables (the trainer's AOT step per bucket, Adam and CTC
  included, compiled in parallel) under `none`, `uniform`, `quantile`, `optimal` at each K, fixed
  batch size against a token budget of the same mean tokens per step; batches assembled before
  the clock starts, so the device time is what is timed, and the host's assembly time per step is
  reported beside it;
- the cost model: one step compiled and timed on a (batch, length) grid, `alpha + gamma * L +
  beta * B * L` fitted by non-negative least squares (`bucketing.fit_step_model`, as the trainer
  fits its own steps); kappa = the wall seconds one more bucket adds to compiling a plan's
  steps in parallel (the slope of the `optimal` plans' compile wall time over K); fed to `auto`,
  whose plan is then measured like the others (once: when it is a plan measured already, such as
  `optimal`'s at the K it chose, its row repeats that measurement and says so) and compared to the
  fastest measured K over `--planned-epochs` epochs (compile included);
- PyTorch `nn.LSTM` (same layers, width, direction; Linear head, CTC loss, Adam, gradient clipping)
  on random batches padded to their longest line, and the same with `pack_padded_sequence`;
  skipped when torch is not installed (`pip install -e .[bench]`); on a GPU also through cuDNN;
- on a GPU, `jax.experimental.rnn` (cuDNN) in the same bucketed loop.

Writes `experiments/results/benchmark_<machine>.md` (`cpu`, `gpu`) with the machine, date,
command and load. `--quick` took 1.7 min on a 2-core CPU (`experiments/results/benchmark_cpu.md`).
"""

import dataclasses
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bucketing
import cli_errors
import train
from experiments import paper
from experiments.reporting import RunRecord, markdown_table, results_path, versions, write_report
from handwriting import dataset as dataset_lib

RESULTS = pathlib.Path(__file__).parent / "results"
COLUMNS = (
  "contender",
  "strategy",
  "K",
  "batch",
  "steps",
  "sequences/s",
  "real timesteps",
  "padded timesteps",
  "padded/real",
  "compile (s)",
  "host ms/step",
  "device ms/step",
)


@dataclasses.dataclass
class Measurement:
  """One contender over the benchmark's sequences; `run_epoch(repeat)` times one more epoch.

  `run_epoch` returns (host seconds per step, epoch seconds); the reported times are medians.
  """

  contender: str
  strategy: str
  num_buckets: str
  batch: str
  steps: int
  real_timesteps: int
  padded_timesteps: int
  compile_seconds: float | None
  num_sequences: int
  run_epoch: Callable[[int], tuple[float, float]]
  plan: bucketing.BucketPlan | None = None  # ours: the plan measured
  host_seconds: list[float] = dataclasses.field(default_factory=list)
  epochs_seconds: list[float] = dataclasses.field(default_factory=list)

  @property
  def epoch_seconds(self) -> float:
    return statistics.median(self.epochs_seconds)

  def row(self) -> dict[str, str]:
    return {
      "contender": self.contender,
      "strategy": self.strategy,
      "K": self.num_buckets,
      "batch": self.batch,
      "steps": str(self.steps),
      "sequences/s": f"{self.num_sequences / self.epoch_seconds:.1f}",
      "real timesteps": f"{self.real_timesteps:,}",
      "padded timesteps": f"{self.padded_timesteps:,}",
      "padded/real": f"{self.padded_timesteps / self.real_timesteps:.3f}",
      "compile (s)": "-" if self.compile_seconds is None else f"{self.compile_seconds:.1f}",
      "host ms/step": f"{1000 * statistics.median(self.host_seconds):.2f}",
      "device ms/step": f"{1000 * self.epoch_seconds / self.steps:.2f}",
    }


def measured_twin(plan: bucketing.BucketPlan, measurements: list[Measurement]):
  """The measurement of a plan that batches as `plan` does (the same bounds and batch sizes, so
  the same steps of the same shapes), or None: `auto`'s plan is often one measured already."""
  return next(
    (
      measurement
      for measurement in measurements
      if measurement.plan is not None
      and np.array_equal(measurement.plan.upper_bounds, plan.upper_bounds)
      and np.array_equal(measurement.plan.batch_sizes, plan.batch_sizes)
    ),
    None,
  )


def take_turns(measurements: list[Measurement], repeats: int) -> None:
  """Times `repeats` epochs of every contender after a warm-up epoch, the contenders taking turns
  within each repeat, so load from other processes on a shared machine falls on all alike."""
  for repeat in range(repeats + 1):
    for measurement in measurements:
      host, epoch = measurement.run_epoch(repeat)
      if repeat:
        measurement.host_seconds.append(host)
        measurement.epochs_seconds.append(epoch)


# ---------------------------------------------------------------------------------------------
# Our trainer's step functions.


class Bench:
  """The data, mesh and a fresh-state factory every contender of ours shares."""

  def __init__(self, config, data: dataset_lib.SequenceSet, repeats: int):
    self.config, self.data, self.repeats = config, data, repeats
    self.mesh = train.make_data_mesh()
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.num_features = train.feature_config(config).num_features
    self.initial = jax.device_put(
      train.create_train_state(config, self.num_features, 10**6), NamedSharding(self.mesh, P())
    )

  def fresh_state(self):
    """A copy of the initial state (the compiled steps donate theirs)."""
    return jax.tree.map(jnp.copy, self.initial)

  def plan(self, strategy: str, num_buckets: int, max_tokens: int = 0, cost=None, epochs=0):
    """The trainer's plan of the benchmark's sequences; `cost` and `epochs` are for `auto`."""
    config = self.config.copy_and_resolve_references()
    config.bucketing.strategy, config.bucketing.num_buckets = strategy, num_buckets
    if max_tokens:
      config.bucketing.batch_size, config.bucketing.max_tokens = 0, max_tokens
    if cost is not None:
      for field, value in zip(train.COST_FIELDS, cost, strict=True):
        config.bucketing[field] = value
      config.num_epochs = epochs
    return train.make_train_plan(config, self.data, jax.device_count())

  def contender(self, name: str, plan: bucketing.BucketPlan, other=None) -> Measurement:
    """`plan`'s schedule through our compiled steps, or through `other`'s (steps, state)."""
    if other is None:
      jax.clear_caches()  # strategies share shapes (the longest bucket): compile each afresh
      compiled = train.compile_steps(self.fresh_state(), plan, {}, self.mesh, self.num_features)
      steps, state = compiled.train_steps, self.fresh_state()
      compile_seconds = compiled.accounting()["compile_wall_s"]
    else:
      (steps, state), compile_seconds = other, None
    carried = [state]

    def run_epoch(repeat: int) -> tuple[float, float]:
      schedule = bucketing.epoch_batches(plan, self.config.seed, repeat)
      start = time.perf_counter()
      batches = [
        (bucket, train.make_batch(self.data, plan, bucket, indices, self.batch_sharding))
        for bucket, indices in schedule
      ]
      jax.block_until_ready(batches)
      host = (time.perf_counter() - start) / len(batches)
      start = time.perf_counter()
      state = carried.pop()
      for bucket, batch in batches:
        state, _ = steps[bucket](state, batch)
      carried.append(jax.block_until_ready(state))
      return host, time.perf_counter() - start

    summary = plan.summary()
    return Measurement(
      contender=name,
      strategy=plan.strategy,
      num_buckets=str(plan.num_buckets),
      batch=f"{plan.max_tokens:,} tokens" if plan.max_tokens else f"{plan.batch_size} sequences",
      steps=plan.num_steps,
      real_timesteps=summary["real_timesteps"],
      padded_timesteps=summary["padded_timesteps_with_filler"],
      compile_seconds=compile_seconds,
      num_sequences=summary["num_examples"],
      run_epoch=run_epoch,
      plan=plan,
    )


def fit_step_cost(bench: Bench, batch_sizes, lengths) -> tuple[tuple, list[dict]]:
  """alpha, gamma and beta of this machine, from one step compiled and timed per (batch,
  length)."""
  rng = np.random.default_rng(0)
  points = []
  for batch_size in batch_sizes:
    for length in lengths:
      label_length = max(1, length // 10)
      _, step_seconds, compile_seconds = train.time_train_step(
        bench.fresh_state(),
        bench.mesh,
        bench.num_features,
        batch_size,
        length,
        label_length,
        bench.repeats,
        rng,
      )
      points.append((batch_size, length, step_seconds, compile_seconds))
  batches, lengths, seconds, _ = (np.array(column) for column in zip(*points, strict=True))
  alpha, gamma, beta = bucketing.fit_step_model(batches, lengths, seconds)
  rows = [
    {
      "batch": str(b),
      "length": str(length),
      "tokens": f"{b * length:,}",
      "measured ms/step": f"{1000 * s:.2f}",
      "fitted ms/step": f"{1000 * (alpha + gamma * length + beta * b * length):.2f}",
      "compile (s)": f"{c:.2f}",
    }
    for b, length, s, c in points
  ]
  return (alpha, gamma, beta), rows


def compile_cost_per_bucket(measured_by_k: dict[int, Measurement]) -> float:
  """kappa: the least-squares slope of the plans' parallel compile wall time over K."""
  counts = np.array(sorted(measured_by_k), np.float64)
  walls = np.array([measured_by_k[k].compile_seconds for k in sorted(measured_by_k)])
  (_, kappa), *_ = np.linalg.lstsq(np.stack([np.ones_like(counts), counts], 1), walls, rcond=None)
  return max(float(kappa), 0.0)


# ---------------------------------------------------------------------------------------------
# What users would use instead.


def torch_train_step(config, num_features: int, device: str, packed: bool) -> Callable:
  """PyTorch `nn.LSTM` with the config's layers, width and directions, a Linear head, CTC loss,
  Adam and gradient clipping: `step(inputs [B, T, F], lengths, labels (concatenated),
  label_lengths)` on `device` (`pack_padded_sequence` when `packed`)."""
  import torch
  from torch import nn
  from torch.nn.utils import rnn as rnn_utils

  model_config = config.model
  torch.manual_seed(config.seed)
  lstm = nn.LSTM(
    num_features,
    model_config.hidden_size,
    num_layers=model_config.num_layers,
    bidirectional=model_config.bidirectional,
    batch_first=True,
  ).to(device)
  directions = 2 if model_config.bidirectional else 1
  head = nn.Linear(directions * model_config.hidden_size, train.ALPHABET.size).to(device)
  parameters = [*lstm.parameters(), *head.parameters()]
  optimizer = torch.optim.Adam(parameters, lr=config.optimizer.learning_rate)

  def step(inputs, lengths, labels, label_lengths):
    if packed:
      sequence = rnn_utils.pack_padded_sequence(
        inputs, lengths, batch_first=True, enforce_sorted=False
      )
      outputs, _ = lstm(sequence)
      outputs, _ = rnn_utils.pad_packed_sequence(outputs, batch_first=True)
    else:
      outputs, _ = lstm(inputs)
    log_probs = head(outputs).log_softmax(-1).transpose(0, 1)
    loss = nn.functional.ctc_loss(log_probs, labels, lengths, label_lengths, zero_infinity=True)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(parameters, config.optimizer.grad_clip_norm)
    optimizer.step()

  return step


def torch_contenders(config, data, repeats: int) -> list[Measurement] | str:
  """PyTorch nn.LSTM on random batches, padded per batch and packed; a reason when skipped."""
  try:
    import torch
  except ImportError:
    return "torch is not installed (`pip install -e .[bench]`)"
  from torch.nn.utils import rnn as rnn_utils

  devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
  batch_size = config.bucketing.batch_size

  def random_batches(repeat: int) -> list[np.ndarray]:
    order = np.random.default_rng([config.seed, repeat]).permutation(len(data))
    return [order[first : first + batch_size] for first in range(0, len(order), batch_size)]

  real = int(data.lengths.sum())
  # Padded timesteps of the timed epochs (repeat 0 warms up), on average.
  padded = round(
    np.mean(
      [
        sum(len(rows) * data.lengths[rows].max() for rows in random_batches(repeat))
        for repeat in range(1, repeats + 1)
      ]
    )
  )
  results = []
  for device in devices:
    for packed in (False, True):
      step = torch_train_step(config, data.features[0].shape[1], device, packed)

      def run_epoch(repeat: int, step=step, device=device) -> tuple[float, float]:
        start = time.perf_counter()
        batches = []
        for rows in random_batches(repeat):
          inputs = rnn_utils.pad_sequence(
            [torch.from_numpy(data.features[i]) for i in rows], batch_first=True
          )
          labels = torch.from_numpy(np.concatenate([data.labels[i] for i in rows]))
          lengths = torch.from_numpy(data.lengths[rows].astype(np.int64))
          label_lengths = torch.from_numpy(data.label_lengths[rows].astype(np.int64))
          batches.append((inputs.to(device), lengths, labels.to(device), label_lengths))
        host = (time.perf_counter() - start) / len(batches)
        start = time.perf_counter()
        for batch in batches:
          step(*batch)
        if device == "cuda":
          torch.cuda.synchronize()
        return host, time.perf_counter() - start

      results.append(
        Measurement(
          contender="PyTorch nn.LSTM" + (" (cuDNN)" if device == "cuda" else ""),
          strategy="random batches, " + ("packed" if packed else "padded per batch"),
          num_buckets="-",
          batch=f"{batch_size} sequences",
          steps=-(-len(data) // batch_size),
          real_timesteps=real,
          padded_timesteps=real if packed else padded,
          compile_seconds=None,
          num_sequences=len(data),
          run_epoch=run_epoch,
        )
      )
  return results


def cudnn_jax_steps(bench: Bench, num_buckets: int):
  """`jax.experimental.rnn` (cuDNN) steps per bucket and their state, for `Bench.contender` (GPU).

  Reuses `benchmark_lstm.CudnnStack`, whose head has 80 classes; labels are folded into 1..79 for
  the CTC loss, a difference of two output units against our model.
  """
  import optax

  from experiments.benchmark_lstm import CudnnStack
  from models import ctc

  model_config = bench.config.model
  model = CudnnStack(model_config.hidden_size, model_config.num_layers, model_config.bidirectional)
  inputs = jnp.zeros((1, 8, bench.num_features), jnp.float32)
  params = model.init(jax.random.key(bench.config.seed), inputs, jnp.zeros((1, 8)))["params"]
  optimizer = optax.adam(bench.config.optimizer.learning_rate)

  @jax.jit
  def step(state, batch):
    params, opt_state = state

    def loss_fn(params):
      logits = model.apply({"params": params}, batch["inputs"], batch["input_paddings"])
      labels = (batch["labels"] - 1) % 79 + 1
      loss, _ = ctc.ctc_loss(
        logits, batch["input_paddings"], labels, batch["label_paddings"], batch["weights"]
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return {bucket: step for bucket in range(num_buckets)}, (params, optimizer.init(params))


# ---------------------------------------------------------------------------------------------
# The run.


def main(argv: list[str] | None = None) -> pathlib.Path:
  argv = sys.argv[1:] if argv is None else argv
  parser = cli_errors.ArgumentParser(description=__doc__)
  preset = parser.add_mutually_exclusive_group()
  preset.add_argument("--quick", action="store_true", help="minutes on a CPU")
  preset.add_argument("--tiny", action="store_true", help="seconds; the tests' preset")
  parser.add_argument("--dataset", choices=("auto", "iam_ondb", "synthetic"), default="auto")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--buckets", type=cli_errors.positive_int_list, help="comma-separated K list")
  parser.add_argument(
    "--repeats", type=cli_errors.positive_int, default=None, help="default 3 (quick, tiny) or 5"
  )
  parser.add_argument(
    "--planned-epochs", type=cli_errors.positive_int, default=50, help="run length `auto` plans"
  )
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.buckets and max(args.buckets) == 1:
    parser.error("--buckets: give a K above 1 (K = 1, the `none` baseline, is always measured)")
  preset_name = "quick" if args.quick else "tiny" if args.tiny else "full"
  config = paper.make_config(preset_name, args.dataset, args.data_dir)
  default_buckets = {"full": [2, 4, 8, 16], "quick": [2, 4], "tiny": [2]}[preset_name]
  # K = 1 is the `none` baseline, measured in every run: given again, it would measure it twice.
  bucket_counts = sorted({k for k in args.buckets or default_buckets if k > 1})
  repeats = args.repeats or (5 if preset_name == "full" else 3)
  limit = {"full": 0, "quick": 256, "tiny": 32}[preset_name]
  if preset_name == "full":
    config.data.features.resample_spacing = 0.1  # the paper's sequences on a GPU, not too long
  elif preset_name == "quick":
    # The 1 x 32 BLSTM that results/benchmark_cpu.md measured (paper's --quick grew to learn).
    config.model.num_layers, config.model.hidden_size = 1, 32
  backend = jax.default_backend()
  out = results_path(args.out, RESULTS / f"benchmark_{backend}.md")

  record = RunRecord("experiments.benchmark", argv, versions(with_torch=True))
  data = train.load_split(config, config.data.train_split, limit)
  bench = Bench(config, data, repeats)
  epochs = args.planned_epochs

  grid_batches = {"full": (8, 16, 32, 64), "quick": (8, 32), "tiny": (8, 16)}[preset_name]
  longest = int(bucketing.boundaries.round_up(data.lengths.max(), 8))
  fractions = (4, 2, 1) if preset_name != "tiny" else (2, 1)
  grid_lengths = sorted({max(8, longest // f // 8 * 8) for f in fractions})
  (alpha, gamma, beta), grid_rows = fit_step_cost(bench, grid_batches, grid_lengths)

  measurements = [bench.contender("ours", bench.plan("none", 1))]
  optimal_by_k = {1: measurements[0]}
  mean_tokens = config.bucketing.batch_size * int(np.mean(data.lengths))
  for strategy in ("uniform", "quantile", "optimal"):
    for k in bucket_counts:
      measurements.append(bench.contender("ours", bench.plan(strategy, k)))
      if strategy == "optimal":
        optimal_by_k[k] = measurements[-1]
  for k in (1, *bucket_counts):
    strategy = "none" if k == 1 else "optimal"
    measurements.append(bench.contender("ours", bench.plan(strategy, k, max_tokens=mean_tokens)))
  kappa = compile_cost_per_bucket(optimal_by_k)
  cost = (alpha, gamma, beta, kappa)
  auto_plan = bench.plan("auto", max(bucket_counts), cost=cost, epochs=epochs)
  auto_name, auto_row = "ours, measured cost model", len(measurements)
  twin = measured_twin(auto_plan, measurements)
  if twin is None:
    measurements.append(bench.contender(auto_name, auto_plan))

  notes = []
  torch_results = torch_contenders(config, data, repeats)
  if isinstance(torch_results, str):
    notes.append(f"PyTorch nn.LSTM rows: skipped, {torch_results}.")
  else:
    measurements += torch_results
  if backend == "gpu":
    cudnn = cudnn_jax_steps(bench, auto_plan.num_buckets)
    measurements.append(bench.contender("jax.experimental.rnn (cuDNN)", auto_plan, cudnn))
  else:
    notes.append("cuDNN rows (PyTorch on CUDA, `jax.experimental.rnn`): no GPU here.")
  take_turns(measurements, repeats)
  if twin is not None:  # the same steps: measured once, shown in both rows
    measurements.insert(auto_row, dataclasses.replace(twin, contender=auto_name, strategy="auto"))
    notes.append(
      f"`auto` chose the plan of {twin.strategy} K = {twin.num_buckets} (the same bounds and "
      "batch sizes): measured once, its row repeats that measurement."
    )
  auto = measurements[auto_row]
  for measurement in measurements:
    print(" | ".join(measurement.row().values()), flush=True)

  # Auto against the measured K: whole planned runs, compile included.
  predicted = auto_plan.auto.seconds_per_count
  measured_total = {
    k: epochs * m.epoch_seconds + m.compile_seconds for k, m in optimal_by_k.items()
  }
  auto_rows = [
    {
      "K": str(k),
      "measured epoch (s)": f"{m.epoch_seconds:.3f}",
      "measured compile (s)": f"{m.compile_seconds:.1f}",
      f"measured {epochs} epochs + compile (s)": f"{measured_total[k]:.1f}",
      "cost model's prediction (s)": f"{predicted[k - 1]:.1f}" if k <= len(predicted) else "-",
    }
    for k, m in sorted(optimal_by_k.items())
  ]
  fastest = min(measured_total, key=measured_total.get)
  auto_total = epochs * auto.epoch_seconds + auto.compile_seconds
  model = config.model
  report = [
    "# Benchmark: bucketed training against what users would use instead",
    "",
    *record.header(),
    f"Data: `{config.data.dataset}` training set, the first {len(data)} lines, resample spacing "
    f"{config.data.features.resample_spacing}; every contender trains on exactly these sequences. "
    f"Model: {model.num_layers} x {model.hidden_size} "
    f"{'B' if model.bidirectional else ''}LSTM + linear CTC head, Adam, gradient clipping. "
    f"Times are medians of {repeats} epochs after one warm-up epoch, the contenders taking turns "
    "within each repeat, so load from other processes falls on all of them alike. Token budget: "
    f"{mean_tokens:,} padded tokens per step (batch size x mean length).",
    "",
    "Host ms/step is the input pipeline (batch assembly and transfer) per step; the trainer "
    "prefetches it on a thread, so it stays hidden while it is below device ms/step.",
    "",
    *markdown_table([m.row() for m in measurements], COLUMNS),
    "",
    *[f"- {line}" for line in notes],
    "",
    "## The cost model on this machine",
    "",
    f"One train step compiled and timed per (batch, length); non-negative least-squares fit of "
    f"`alpha + gamma * L + beta * B * L`: alpha = {alpha:.4g} s per step, gamma = {gamma:.4g} s "
    f"per padded timestep, beta = {beta:.4g} s per padded token. kappa = {kappa:.3g} s, the "
    "wall time one more bucket adds to compiling a plan's "
    "train steps in parallel: the least-squares slope of the measured compile (s) of the "
    "`optimal` plans (K = 1 is `none`) over K.",
    "",
    *markdown_table(grid_rows, list(grid_rows[0])),
    "",
    f"Fed to `auto` (K <= {max(bucket_counts)}, {epochs} planned epochs), it chose "
    f"K = {auto_plan.num_buckets}; measured, that plan costs {auto_total:.1f} s for {epochs} "
    f"epochs plus its compile. The fastest measured K (`optimal`, fixed batch; K = 1 is `none`) "
    f"is K = {fastest} at {measured_total[fastest]:.1f} s.",
    "",
    *markdown_table(auto_rows, list(auto_rows[0])),
    "",
  ]
  return write_report(out, report)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
