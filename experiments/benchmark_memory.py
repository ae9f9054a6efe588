"""Memory of a train step as XLA plans it: how it grows with a batch's padded frames, what each
bucket plan's largest step takes, and the token budget a device's memory would allow.

    python -m experiments.benchmark_memory [--config=experiments/iam.py] [--quick] [--out FILE]
        [--config.FIELD=VALUE ...]
    python -m experiments.benchmark_memory --config.data.data_dir=DIR   # IAM-OnDB's export

Every figure is XLA's buffer plan of a compiled train step on one device
(`training.compilation.StepMemory`: arguments + outputs - the outputs written over donated
arguments + temporaries); nothing runs, so it leaves out generated code, the batches prefetched
and the allocator's own overhead. Three parts, written in this order as each is done (cheapest
first, so that a run a GPU call's deadline stops keeps what it measured):

1. **Shapes**: batches x lengths at the training set's length quantiles, labels as wide as the
   longest among the lines that fit, and a least-squares fit of a step's footprint: a fixed part,
   a part per padded token (batch x length: the LSTM's activations) and a part per cell of the CTC
   lattice (batch x length x (2 x label width + 1)).
2. **Budgets**: the padded tokens per step the fit allows in a device of a given size, with labels
   as wide as the training set's widest. It extrapolates past the shapes measured, and a GPU's
   XLA fuses differently (and there the CTC loss may be the Pallas kernel, whose lattice is padded
   to a power of two), so a CPU table is no GPU figure: run this on the GPU for its own.
3. **Plans** on the configured training set: one bucket against `optimal` K buckets, with a fixed
   batch and with a token budget. The peak is what has to fit. With a fixed batch no bucket's
   step is larger than the one-bucket plan's, and the longest bucket is that step whenever it
   holds a batch of lines, so bucketing leaves the peak where it is; with a token budget the
   budget sets the peak, and bucketing fills it with more short lines. Each plan is written as
   soon as it is measured.

Writes `experiments/results/benchmark_memory_<backend>.md` (`cpu`, `gpu`).
"""

import argparse
import pathlib
import sys
from collections.abc import Iterator

import jax
import numpy as np

import bucketing
import cli_errors
import train
from experiments import cli
from experiments.reporting import RunRecord, markdown_table, results_path, versions, write_report
from training.compilation import StepMemory

RESULTS = pathlib.Path(__file__).parent / "results"
MB = 1e6
# What `python -m experiments.benchmark_memory` measures; `--quick` a subset (a GPU lease's share).
PRESETS = {
  "full": {"batches": (16, 32, 64), "quantiles": (0.25, 0.5, 0.9, 1.0), "buckets": (2, 4, 8)},
  "quick": {"batches": (16, 32), "quantiles": (0.5, 0.9, 1.0), "buckets": (4,)},
}
# The fixed batch of the plans' fixed-batch rows when the config sets a token budget instead:
# the paper's (and `experiments/iam.py`'s) 32 lines.
FALLBACK_BATCH = 32
# Device sizes the budgets are given for (GB): a 16 GB card, an A100 40 GB, an H100, an H200.
DEVICE_GB = (16, 40, 80, 141)
# The share of a GPU's memory JAX preallocates for XLA by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
USABLE_FRACTION = 0.75


class Compiler:
  """Compiles the configured model's train step for any bucket plan, on one device."""

  def __init__(self, config):
    self.mesh = train.make_data_mesh(jax.devices()[:1])
    self.num_features = train.feature_config(config).num_features
    self.state = train.replicated_state(config, self.mesh, total_steps=1)

  def plan_memory(self, plan: bucketing.BucketPlan) -> dict[int, StepMemory]:
    """Every bucket's train step, compiled in parallel."""
    memory = train.compile_steps(self.state, plan, {}, self.mesh, self.num_features).train_memory()
    if None in memory.values():
      raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    return memory

  def shape_memory(self, batch: int, length: int, label_width: int) -> StepMemory:
    return self.plan_memory(train.single_shape_plan(batch, length, label_width, 1))[0]


def regressors(batch, length, label_width) -> np.ndarray:
  """[1, padded tokens, CTC lattice cells] of a step's shape: what its footprint is fitted on."""
  batch, length, label_width = np.broadcast_arrays(batch, length, label_width)
  tokens = (batch * length).astype(np.float64)
  return np.stack([np.ones_like(tokens), tokens, tokens * (2 * label_width + 1)], axis=-1)


def fit_memory(shapes: list[tuple]) -> tuple[np.ndarray, float]:
  """Least-squares [fixed, per token, per lattice cell] bytes over `shapes` ((batch, length,
  label width, StepMemory)), and the largest residual as a share of its step."""
  design = regressors(*(np.array([shape[i] for shape in shapes]) for i in range(3)))
  totals = np.array([shape[3].total for shape in shapes], np.float64)
  coefficients = np.linalg.lstsq(design, totals, rcond=None)[0]
  return coefficients, float(np.max(np.abs(design @ coefficients - totals) / totals))


def measure_shapes(compiler: Compiler, data, batches, quantiles, config) -> list[tuple]:
  """(batch, length, label width, StepMemory) for each batch and length quantile of the training
  set; labels as wide as the longest label among the lines that fit the length."""
  lengths = bucketing.boundaries.round_up(
    np.quantile(data.lengths, quantiles), config.bucketing.round_to
  )
  shapes = []
  for length in sorted(set(lengths.astype(int).tolist())):
    width = train.widest_label_within(data, length)
    for batch in batches:
      shapes.append((batch, length, width, compiler.shape_memory(batch, length, width)))
  return shapes


def shape_row(shape: tuple, coefficients: np.ndarray) -> dict[str, str]:
  batch, length, width, memory = shape
  return {
    "batch": str(batch),
    "length": str(length),
    "label width": str(width),
    "padded tokens": f"{batch * length:,}",
    "arguments (MB)": f"{memory.arguments / MB:,.1f}",
    "temporaries (MB)": f"{memory.temporaries / MB:,.1f}",
    "step (MB)": f"{memory.total / MB:,.1f}",
    "fitted (MB)": f"{regressors(batch, length, width) @ coefficients / MB:,.1f}",
  }


def plan_row(
  name: str, plan: bucketing.BucketPlan, memory: dict[int, StepMemory]
) -> dict[str, str]:
  """A plan's steps per epoch, its largest step among the buckets an epoch uses, and the mean
  over an epoch's steps."""
  megabytes, peak, mean = train.step_memory_mb(memory, plan)
  steps = plan.steps_per_epoch
  return {
    "plan": name,
    "K": str(plan.num_buckets),
    "steps": f"{int(steps.sum()):,}",
    "lines per step": f"{plan.bucket_sizes.sum() / steps.sum():.1f}",
    "largest step (batch x length)": f"{plan.batch_sizes[peak]} x {plan.upper_bounds[peak]}",
    "peak (MB)": f"{megabytes[peak]:,.1f}",
    "mean over steps (MB)": f"{mean:,.1f}",
  }


def measure_plans(compiler: Compiler, data, config, buckets, budget: int) -> Iterator[dict]:
  """The `plan_row`s of one bucket and `optimal` K buckets, at a fixed batch and at `budget`
  padded tokens per step, planned as the trainer plans them (`train.make_train_plan`), each
  yielded as soon as it is measured."""
  batch = config.bucketing.batch_size or FALLBACK_BATCH
  rules = ((f"{batch} lines", batch, 0), (f"{budget:,} tokens", 0, budget))
  for rule, batch_size, max_tokens in rules:
    for strategy, num_buckets in [("none", 1)] + [("optimal", k) for k in buckets]:
      variant = config.copy_and_resolve_references()
      variant.bucketing.strategy, variant.bucketing.num_buckets = strategy, num_buckets
      variant.bucketing.batch_size, variant.bucketing.max_tokens = batch_size, max_tokens
      plan = train.make_train_plan(variant, data, num_devices=1)
      row = plan_row(f"{strategy}, {rule}", plan, compiler.plan_memory(plan))
      print(row, flush=True)
      yield row


def budget_rows(coefficients: np.ndarray, label_width: int) -> list[dict[str, str]]:
  """The padded tokens per step whose fitted footprint fills `USABLE_FRACTION` of each device."""
  fixed = coefficients[0]
  per_token = regressors(1, 1, label_width)[1:] @ coefficients[1:]  # one padded token's bytes
  rows = []
  for gigabytes in DEVICE_GB:
    usable = USABLE_FRACTION * gigabytes
    rows.append(
      {
        "device memory (GB)": str(gigabytes),
        "usable by XLA (GB)": f"{usable:g}",
        "padded tokens per step": f"{int((usable * 1e9 - fixed) / per_token):,}",
      }
    )
  return rows


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="experiments/iam.py")
  parser.add_argument("--quick", action="store_true", help="fewer shapes and plans")
  parser.add_argument("--out", default=None)
  args, overrides = parser.parse_known_args(argv)
  unknown = [argument for argument in overrides if not argument.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  return args, [parser.prog, f"--config={args.config}", *overrides]


def main(argv: list[str] | None = None) -> pathlib.Path:
  argv = sys.argv[1:] if argv is None else argv
  args, config_argv = parse_args(argv)
  config = cli.load_config(config_argv)
  preset = PRESETS["quick" if args.quick else "full"]
  out = results_path(args.out, RESULTS / f"benchmark_memory_{jax.default_backend()}.md")
  record = RunRecord("experiments.benchmark_memory", argv, versions())
  data = train.load_split(config, config.data.train_split, config.data.train_limit)
  model = config.model
  sections = []

  def write(echo: bool = False) -> pathlib.Path:
    """The report so far: a run cut short (a GPU call's deadline) keeps what it finished."""
    header = [
      "# Memory of a train step: shapes, bucket plans and token budgets",
      "",
      *record.header(),
      f"Config: `{args.config}`, {model.num_layers} x BLSTM {model.hidden_size}, "
      f"{len(data.lengths):,} training lines (lengths {data.lengths.min()}-"
      f"{data.lengths.max()}, median {np.median(data.lengths):.0f} frames). One device; XLA's "
      "buffer plan of each compiled train step (arguments + outputs - the outputs written over "
      "the donated state + temporaries), nothing run: generated code, prefetched batches and the "
      "allocator's overhead come on top.",
      "",
    ]
    return write_report(out, header + sections + plans_section(), echo)

  median = train.median_padded_length(config, data.lengths)
  batch = config.bucketing.batch_size or FALLBACK_BATCH
  budget = config.bucketing.max_tokens or batch * median
  budget_source = (
    "the config's"
    if config.bucketing.max_tokens
    else f"{batch} lines of the median padded length ({median} frames)"
  )
  plans: list[dict] = []
  planned = 2 * (1 + len(preset["buckets"]))

  def plans_section() -> list[str]:
    if not plans:
      return []
    cut = (
      []
      if len(plans) == planned
      else ["", f"Unfinished: {len(plans)} of the {planned} plans measured when this was written."]
    )
    return [
      "## Plans",
      "",
      *markdown_table(plans, list(plans[0])),
      "",
      "Peak: the plan's largest step among the buckets an epoch uses, what has to fit. Mean: "
      "over an epoch's steps, each bucket weighted by its steps. The token budget is "
      f"{budget_source}.",
      *cut,
      "",
    ]

  compiler = Compiler(config)
  shapes = measure_shapes(compiler, data, preset["batches"], preset["quantiles"], config)
  coefficients, worst = fit_memory(shapes)
  fixed, per_token, per_cell = coefficients
  shape_rows = [shape_row(shape, coefficients) for shape in shapes]
  sections += [
    "## Shapes",
    "",
    *markdown_table(shape_rows, list(shape_rows[0])),
    "",
    f"Least squares over these shapes: {fixed / MB:,.1f} MB + {per_token:,.0f} bytes per padded "
    f"token + {per_cell:,.1f} bytes per CTC lattice cell (batch x length x (2 x label width + "
    f"1)); the largest residual is {100 * worst:.1f}% of a step.",
    "",
  ]
  widest = int(data.label_lengths.max())
  budgets = budget_rows(coefficients, widest)
  fit_source = (
    "this GPU's buffer plans at the shapes above"
    if jax.default_backend() == "gpu"
    else f"this backend's ({jax.default_backend()}) buffer plans, not a measurement on a GPU, "
    "whose XLA fuses differently"
  )
  sections += [
    "## Token budgets",
    "",
    *markdown_table(budgets, list(budgets[0])),
    "",
    f"From the fit, with labels as wide as the widest line's ({widest}): the padded tokens whose "
    f"step fills {USABLE_FRACTION:.0%} of the device (what JAX preallocates for XLA on a GPU by "
    f"default). An extrapolation from {fit_source}.",
    "",
  ]
  write()

  for row in measure_plans(compiler, data, config, preset["buckets"], budget):
    plans.append(row)
    write()
  return write(echo=True)


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
