"""Training-step speed of our LSTM stack against Flax's stock cell (and cuDNN on a GPU).

    python -m experiments.benchmark_lstm [--preset cpu|gpu|tiny] [--repeats 5] [--out FILE]

Each row times one jitted forward + backward pass (`jax.value_and_grad` of a mean-square loss over
the valid logits) of a stack of LSTM layers plus a Dense head to 80 classes, on a batch whose
lengths are uniform in [time/2, time] (a bucket's spread), median of `--repeats` runs after a
compiling warm-up, the contenders taking turns. Contenders, all with the same sizes and lengths:

- `flax`: `nn.RNN(nn.OptimizedLSTMCell)` per direction, `nn.Bidirectional` with `seq_lengths`;
- `ours`: the trainer's `models.LstmCtcModel` (`models.factory.make_model`, so with this
  backend's defaults, e.g. `scan_prefetch`) at `unroll=1` and at `--unroll` (default 4);
- `cudnn`: `jax.experimental.rnn.lstm`, only when `jax.default_backend() == "gpu"`.

`--preset tiny` times two rows of toy sizes in seconds (the tests'). Prints a Markdown table and
writes it, with the machine, date, versions and command, to
`experiments/results/benchmark_lstm_<backend>.md`.
"""

import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import cli_errors
from experiments import reporting
from models.factory import make_model

RESULTS = pathlib.Path(__file__).parent / "results"
BATCH = 32
FEATURES = 20
NUM_CLASSES = 80
# The table's columns: the shape of a row, each contender's "<name> (ms)", then this speed-up.
SHAPE_COLUMNS = ["time", "hidden", "layers", "bidirectional"]
SPEED_UP = "speed-up of best ours vs flax"

# (time, hidden, layers, bidirectional). The CPU preset keeps a full run within a few minutes on
# a 2-core machine; the GPU preset is the full grid; the tiny preset takes seconds (the tests').
PRESETS = {
  "cpu": [
    (300, 128, 1, True),
    (600, 128, 1, True),
    (1200, 128, 1, True),
    (300, 256, 1, True),
    (300, 128, 3, True),
    (300, 128, 1, False),
  ],
  "gpu": [
    (time, hidden, layers, True)
    for time in (300, 600, 1200)
    for hidden in (128, 256)
    for layers in (1, 3)
  ],
  "tiny": [(16, 8, 1, True), (16, 8, 1, False)],
}


class FlaxStockStack(nn.Module):
  """The baseline: Flax's `OptimizedLSTMCell` run by `nn.RNN`, masked by `seq_lengths`."""

  hidden_size: int
  num_layers: int
  bidirectional: bool

  @nn.compact
  def __call__(self, inputs: jax.Array, input_paddings: jax.Array) -> jax.Array:
    """`[batch, time, features]`, `[batch, time]` -> logits `[batch, time, classes]`."""
    seq_lengths = jnp.sum(1 - input_paddings, axis=1).astype(jnp.int32)
    activations = inputs
    for _ in range(self.num_layers):
      forward = nn.RNN(nn.OptimizedLSTMCell(self.hidden_size))
      if self.bidirectional:
        backward = nn.RNN(nn.OptimizedLSTMCell(self.hidden_size))
        activations = nn.Bidirectional(forward, backward)(activations, seq_lengths=seq_lengths)
      else:
        activations = forward(activations, seq_lengths=seq_lengths)
    return nn.Dense(NUM_CLASSES)(activations)


class CudnnStack(nn.Module):
  """`jax.experimental.rnn.lstm` (cuDNN) with the same sizes; GPU only."""

  hidden_size: int
  num_layers: int
  bidirectional: bool

  @nn.compact
  def __call__(self, inputs: jax.Array, input_paddings: jax.Array) -> jax.Array:
    """`[batch, time, features]`, `[batch, time]` -> logits `[batch, time, classes]`."""
    from jax.experimental import rnn

    batch, _, features = inputs.shape
    directions = 2 if self.bidirectional else 1
    weights = self.param(
      "weights",
      lambda key: rnn.init_lstm_weight(
        key, features, self.hidden_size, self.num_layers, self.bidirectional
      ),
    )
    state = jnp.zeros((directions * self.num_layers, batch, self.hidden_size))
    seq_lengths = jnp.sum(1 - input_paddings, axis=1).astype(jnp.int32)
    activations, _, _ = rnn.lstm(
      inputs,
      state,
      state,
      weights,
      seq_lengths,
      input_size=features,
      hidden_size=self.hidden_size,
      num_layers=self.num_layers,
      dropout=0.0,
      bidirectional=self.bidirectional,
    )
    return nn.Dense(NUM_CLASSES)(activations)


def compiled_step(model: nn.Module, time_steps: int) -> Callable[[], None]:
  """A jitted value-and-grad step of `model` on a fixed batch, compiled and run once."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(time_steps // 2, time_steps + 1, size=BATCH)
  paddings = jnp.asarray(np.arange(time_steps)[None, :] >= lengths[:, None], jnp.float32)
  inputs = jnp.asarray(rng.normal(size=(BATCH, time_steps, FEATURES)), jnp.float32)
  params = model.init(jax.random.key(0), inputs, paddings)["params"]

  def loss_fn(params):
    logits = model.apply({"params": params}, inputs, paddings)
    valid = (1 - paddings)[..., None]
    return jnp.sum(valid * logits**2) / jnp.sum(valid)

  step = jax.jit(jax.value_and_grad(loss_fn))
  jax.block_until_ready(step(params))
  return lambda: jax.block_until_ready(step(params))


def median_step_ms(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
  """Median wall time (ms) per step. The contenders take turns within each repeat, so load from
  other processes on a shared machine falls on all of them alike."""
  timings = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      timings[name].append(time.perf_counter() - start)
  return {name: 1000 * statistics.median(values) for name, values in timings.items()}


def contenders(unroll: int) -> dict[str, Callable[[int, int, bool], nn.Module]]:
  """Column name -> builder(hidden, layers, bidirectional)."""

  def ours(unroll_steps):
    return lambda hidden, layers, bidirectional: make_model(
      num_classes=NUM_CLASSES,
      num_layers=layers,
      hidden_size=hidden,
      bidirectional=bidirectional,
      unroll=unroll_steps,
    )

  columns = {
    "flax OptimizedLSTMCell+RNN": lambda hidden, layers, bi: FlaxStockStack(hidden, layers, bi),
    "ours unroll=1": ours(1),
    f"ours unroll={unroll}": ours(unroll),
  }
  if jax.default_backend() == "gpu":
    columns["cudnn jax.experimental.rnn"] = lambda hidden, layers, bi: CudnnStack(
      hidden, layers, bi
    )
  return columns


def timing_rows(
  grid: list[tuple[int, int, int, bool]],
  columns: dict[str, Callable[[int, int, bool], nn.Module]],
  repeats: int,
) -> list[dict[str, str]]:
  """A row per (time, hidden, layers, bidirectional) of `grid`: each contender's median step in
  ms (`"<name> (ms)"`) and the flax baseline's time over the fastest of ours (`SPEED_UP`)."""
  baseline = next(iter(columns))
  rows = []
  for time_steps, hidden, layers, bidirectional in grid:
    steps = {
      name: compiled_step(build(hidden, layers, bidirectional), time_steps)
      for name, build in columns.items()
    }
    timings = median_step_ms(steps, repeats)
    best_ours = min(value for name, value in timings.items() if name.startswith("ours"))
    shape = [str(time_steps), str(hidden), str(layers), "yes" if bidirectional else "no"]
    row = dict(zip(SHAPE_COLUMNS, shape, strict=True))
    row |= {f"{name} (ms)": f"{value:.2f}" for name, value in timings.items()}
    row[SPEED_UP] = f"{timings[baseline] / best_ours:.2f}x"
    rows.append(row)
    print(" | ".join(row.values()), flush=True)
  return rows


def main(argv: list[str] | None = None) -> pathlib.Path:
  argv = sys.argv[1:] if argv is None else argv
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument(
    "--preset", choices=sorted(PRESETS), default=None, help="size grid; defaults to the backend's"
  )
  parser.add_argument("--repeats", type=cli_errors.positive_int, default=5)
  parser.add_argument("--unroll", type=cli_errors.positive_int, default=4)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  preset = args.preset or ("gpu" if backend == "gpu" else "cpu")
  out = reporting.results_path(args.out, RESULTS / f"benchmark_lstm_{backend}.md")

  record = reporting.RunRecord("experiments.benchmark_lstm", argv, reporting.versions())
  columns = contenders(args.unroll)
  header = [*SHAPE_COLUMNS, *(f"{name} (ms)" for name in columns), SPEED_UP]
  print(" | ".join(header), flush=True)  # each row follows as it is timed
  rows = timing_rows(PRESETS[preset], columns, args.repeats)
  report = [
    "# LSTM training-step speed: ours vs Flax's stock cell"
    + (" vs cuDNN" if backend == "gpu" else ""),
    "",
    *record.header(),
    f"Batch {BATCH}, {FEATURES} input features, {NUM_CLASSES} classes, lengths uniform in "
    "[time/2, time]. Each cell is the median wall time of one jitted forward + backward step "
    f"over {args.repeats} runs after a compiling warm-up; the contenders take turns within each "
    "run, so load from other processes on the machine falls on all of them alike.",
    "",
    *reporting.markdown_table(rows, header),
    "",
  ]
  return reporting.write_report(out, report, echo=True)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
