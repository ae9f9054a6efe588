"""Memory of a train step as XLA plans it: how it grows with a batch's padded frames, what each
bucket plan's largest step needs, and the token budget that would fit a device.

    python -m experiments.benchmark_memory [--config=experiments/iam.py] [--quick] [--out FILE]
        [--config.FIELD=VALUE ...]
    python -m experiments.benchmark_memory --config.data.data_dir=DIR   # IAM-OnDB's export

Every figure is read from a compiled train step (`jax.stages.Compiled.memory_analysis`) on one
device; nothing runs. A step holds its arguments (the train state and the batch), its outputs
(the new state, donated: written over the old one, so aliased) and its temporaries (what the
backward pass keeps of the forward's activations, and workspace), so it needs arguments + outputs
- aliased + temporaries at once. Three parts:

1. **Shapes**: batches x lengths drawn from the training set's length quantiles, labels as wide
   as the longest among the lines that fit, and a least-squares fit of a step's memory: a fixed
   part, a part per padded token (batch x length: the LSTM's activations) and a part per cell of
   the CTC lattice (batch x length x (2 x label width + 1)).
2. **Plans** on the configured training set: one bucket against `optimal` K buckets, with the
   config's batch size and with a token budget. With a fixed batch every bucket's step is at most
   the one-bucket plan's shape, so bucketing lowers the mean over an epoch's steps and the peak
   only when the longest bucket holds fewer lines than a batch; a token budget sets the peak
   itself, and bucketing fills it with more short lines.
3. **Budgets**: the padded tokens per step the fit says fit in a device of a given size, with
   labels as wide as the training set's widest. XLA on a GPU fuses differently from the CPU, so a
   CPU table is a guide for a GPU, not a measurement of it; run this on the GPU for its own.

Writes `experiments/results/benchmark_memory_<backend>.md` (`cpu`, `gpu`).
"""

import argparse
import dataclasses
import pathlib
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bucketing
import cli_errors
import train
from experiments import cli
from experiments.reporting import RunRecord, markdown_table

RESULTS = pathlib.Path(__file__).parent / "results"
MB = 1e6
# What `python -m experiments.benchmark_memory` measures; `--quick` a subset (a GPU lease's share).
PRESETS = {
  "full": {"batches": (16, 32, 64), "quantiles": (0.25, 0.5, 0.9, 1.0), "buckets": (2, 4, 8)},
  "quick": {"batches": (16, 32), "quantiles": (0.5, 1.0), "buckets": (4,)},
}
# Device sizes the budgets are given for (GB): a 16 GB card, an A100 40 GB, an H100, an H200.
DEVICE_GB = (16, 40, 80, 141)
# JAX gives XLA 75% of a GPU's memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
USABLE_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes a compiled step holds, from XLA's buffer assignment."""

  arguments: int
  outputs: int
  aliased: int
  temporaries: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @classmethod
  def of(cls, compiled) -> "StepMemory":
    stats = compiled.memory_analysis()
    if stats is None:
      raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    return cls(
      stats.argument_size_in_bytes,
      stats.output_size_in_bytes,
      stats.alias_size_in_bytes,
      stats.temp_size_in_bytes,
    )


class Compiler:
  """Compiles the configured model's train step for any bucket plan, on one device."""

  def __init__(self, config):
    self.mesh = train.make_data_mesh(jax.devices()[:1])
    self.num_features = train.num_features(config)
    state = train.create_train_state(config, self.num_features, total_steps=1)
    self.state = jax.device_put(state, NamedSharding(self.mesh, P()))

  def plan_memory(self, plan: bucketing.BucketPlan) -> list[StepMemory]:
    """Every bucket's train step, compiled in parallel, as `StepMemory`."""
    steps = train.compile_steps(self.state, plan, {}, self.mesh, self.num_features)
    return [StepMemory.of(steps.train_steps[bucket]) for bucket in range(plan.num_buckets)]

  def shape_memory(self, batch: int, length: int, label_width: int) -> StepMemory:
    plan = bucketing.make_plan(
      np.full(batch, length),
      strategy="fixed",
      upper_bounds=[length],
      batch_size=batch,
      num_devices=1,
      label_lengths=np.full(batch, label_width),
    )
    return self.plan_memory(plan)[0]


def shape_rows(compiler: Compiler, lengths, label_lengths, batches, quantiles, round_to) -> list:
  """(batch, length, label width, StepMemory) for each batch and length quantile of the training
  set; labels as wide as the longest label among the lines that fit the length."""
  quantile_lengths = bucketing.boundaries.round_up(np.quantile(lengths, quantiles), round_to)
  rows = []
  for length in sorted(set(quantile_lengths.astype(int).tolist())):
    width = int(label_lengths[lengths <= length].max(initial=1))
    for batch in batches:
      rows.append((batch, length, width, compiler.shape_memory(batch, length, width)))
  return rows


def lattice_cells(batch, length, label_width):
  """Cells of a batch's CTC lattice: every frame against every extended label position."""
  return batch * length * (2 * label_width + 1)


def fit_memory(shapes: list[tuple]) -> tuple[np.ndarray, float]:
  """Least-squares `step bytes = fixed + per_token * tokens + per_cell * lattice cells` over
  `shapes` ((batch, length, label width, StepMemory)), and the largest residual over a step."""
  batch, length, width = (np.array([shape[i] for shape in shapes], np.float64) for i in range(3))
  totals = np.array([shape[3].total for shape in shapes], np.float64)
  design = np.stack([np.ones_like(batch), batch * length, lattice_cells(batch, length, width)], 1)
  coefficients = np.linalg.lstsq(design, totals, rcond=None)[0]
  worst = np.max(np.abs(design @ coefficients - totals) / totals)
  return coefficients, float(worst)


def predicted_bytes(coefficients: np.ndarray, batch, length, label_width) -> float:
  fixed, per_token, per_cell = coefficients
  return fixed + per_token * batch * length + per_cell * lattice_cells(batch, length, label_width)


def plan_row(name: str, plan: bucketing.BucketPlan, memory: list[StepMemory]) -> dict[str, str]:
  """A plan's steps per epoch, its largest step and the mean over an epoch's steps."""
  totals = np.array([step.total for step in memory], np.float64)
  steps_per_bucket = np.ceil(plan.bucket_sizes / plan.batch_sizes)
  peak = int(np.argmax(totals))
  lines_per_step = plan.bucket_sizes.sum() / steps_per_bucket.sum()
  return {
    "plan": name,
    "K": str(plan.num_buckets),
    "steps": f"{int(steps_per_bucket.sum()):,}",
    "lines per step": f"{lines_per_step:.1f}",
    "largest step (batch x length)": f"{plan.batch_sizes[peak]} x {plan.upper_bounds[peak]}",
    "peak (MB)": f"{totals[peak] / MB:,.1f}",
    "mean over steps (MB)": f"{np.average(totals, weights=steps_per_bucket) / MB:,.1f}",
  }


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/iam.py")
  parser.add_argument("--quick", action="store_true", help="fewer shapes and plans")
  parser.add_argument("--out", type=pathlib.Path, default=None)
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
  out = args.out or RESULTS / f"benchmark_memory_{jax.default_backend()}.md"
  record = RunRecord("experiments.benchmark_memory", argv, f"jax {jax.__version__}")

  data = train.load_split(config, config.data.train_split, config.data.train_limit)
  round_to = config.bucketing.round_to
  compiler = Compiler(config)

  shapes = shape_rows(
    compiler, data.lengths, data.label_lengths, preset["batches"], preset["quantiles"], round_to
  )
  coefficients, worst = fit_memory(shapes)
  shape_table = [
    {
      "batch": str(batch),
      "length": str(length),
      "label width": str(width),
      "padded tokens": f"{batch * length:,}",
      "arguments (MB)": f"{memory.arguments / MB:,.1f}",
      "temporaries (MB)": f"{memory.temporaries / MB:,.1f}",
      "step (MB)": f"{memory.total / MB:,.1f}",
      "fitted (MB)": f"{predicted_bytes(coefficients, batch, length, width) / MB:,.1f}",
    }
    for batch, length, width, memory in shapes
  ]

  batch_size = config.bucketing.batch_size or 32
  median = int(bucketing.boundaries.round_up(np.median(data.lengths), round_to))
  max_tokens = config.bucketing.max_tokens or batch_size * median
  budget_source = (
    "the config's"
    if config.bucketing.max_tokens
    else f"{batch_size} lines of the median padded length ({median} frames)"
  )
  rules = {
    f"{batch_size} lines": {"batch_size": batch_size},
    f"{max_tokens:,} tokens": {"max_tokens": max_tokens},
  }
  plan_table = []
  for rule, sizing in rules.items():
    for strategy, num_buckets in [("none", 1)] + [("optimal", k) for k in preset["buckets"]]:
      plan = bucketing.make_plan(
        data.lengths,
        strategy=strategy,
        num_buckets=num_buckets,
        num_devices=1,
        round_to=round_to,
        overflow=config.bucketing.overflow,
        label_lengths=data.label_lengths,
        **sizing,
      )
      plan_table.append(plan_row(f"{strategy}, {rule}", plan, compiler.plan_memory(plan)))
      print(plan_table[-1], flush=True)

  fixed, per_token, per_cell = coefficients
  widest = int(data.label_lengths.max())
  per_budget_token = per_token + per_cell * (2 * widest + 1)
  budget_table = []
  for gigabytes in DEVICE_GB:
    usable = USABLE_FRACTION * gigabytes
    budget_table.append(
      {
        "device memory (GB)": str(gigabytes),
        "usable by XLA (GB)": f"{usable:g}",
        "padded tokens per step": f"{int((usable * 1e9 - fixed) / per_budget_token):,}",
      }
    )
  model = config.model
  report = [
    "# Memory of a train step: shapes, bucket plans and token budgets",
    "",
    *record.header(),
    f"Config: `{args.config}`, {model.num_layers} x BLSTM {model.hidden_size}, "
    f"{len(data.lengths):,} training lines (lengths {data.lengths.min()}-{data.lengths.max()}, "
    f"median {np.median(data.lengths):.0f} frames). One device; XLA's buffer assignment of each "
    "compiled train step, nothing run. Step: arguments + outputs - aliased (the donated state) "
    "+ temporaries.",
    "",
    "## Shapes",
    "",
    *markdown_table(shape_table, list(shape_table[0])),
    "",
    f"Least squares over these shapes: {fixed / MB:,.1f} MB + {per_token:,.0f} bytes per padded "
    f"token + {per_cell:,.1f} bytes per CTC lattice cell (batch x length x (2 x label width + "
    f"1)); the largest residual is {100 * worst:.1f}% of a step.",
    "",
    "## Plans",
    "",
    *markdown_table(plan_table, list(plan_table[0])),
    "",
    "Peak: the plan's largest step. Mean: over an epoch's steps, each bucket weighted by its "
    f"steps. The token budget is {budget_source}.",
    "",
    "## Token budgets",
    "",
    *markdown_table(budget_table, list(budget_table[0])),
    "",
    f"From the fit: the padded tokens whose step fills {USABLE_FRACTION:.0%} of the device (what "
    f"JAX hands XLA on a GPU by default), with labels as wide as the widest line's ({widest}): "
    f"{per_budget_token:,.0f} bytes per padded token. Measured on this backend; XLA plans a "
    "GPU's buffers with other fusions.",
    "",
  ]
  text = "\n".join(report)
  print(text)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out}")
  return out


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
