"""Multi-GPU data parallelism, on paper: a projection of the IAM-OnDB epoch time on 1-8 GPUs.

    python -m experiments.projection --data-dir ~/tensorflow_datasets \
      --out experiments/results/projection_multi_gpu

Only one GPU is lent to this project, so this is a PROJECTION, not a measurement. Its inputs are
measured: the one-GPU train-step times of `experiments.benchmark_step` (read from the committed
`experiments/results/benchmark_step_gpu_defaults.md`, H200, rows of `--implementation`), the
bucket plans of the real training lengths (`bucketing.make_plan`, `optimal`, K = 8, batch a
multiple of the GPU count), and the gradient size of the `experiments/iam.py` model. The model:

    step(B, T)   = c + a * T + b * B * T                      (ms, one GPU, per-device batch B)
    allreduce(n) = 2 (n - 1) / n * P * 4 bytes / bandwidth     (ring all-reduce, float32 grads)
    epoch(n)     = sum over buckets of steps_b(n) * (step(B_b / n, L_b) + allreduce(n))

`step` is the bucketing cost model `alpha + beta * B * T` (bucketing/cost.py) plus a term in T
alone: the LSTM recurrence is T dependent steps whose cost barely grows with B on a GPU, which
`alpha + beta * B * T` cannot express (its fit error is printed beside this one's). It is a
least-squares fit to the measured (B, T) points; with only B = 32 and 128 measured, step times
at B < 32 (strong scaling on 2-8 GPUs) are extrapolated. Strong scaling keeps the global batch
(32 sequences), so each GPU gets 32 / n; weak scaling keeps 32 per GPU, so the global batch grows
to 32 n and an epoch has fewer, larger steps (which may change how many epochs training needs).

Assumptions (each one makes the projection optimistic or pessimistic, as said): the all-reduce
runs after the backward pass without overlap (pessimistic), at the link's peak one-direction
bandwidth with no per-call latency (optimistic); every GPU computes its share in the one-GPU
time (no stragglers, no host bottleneck: the host assembles a batch in under 1 ms,
experiments/results/benchmark_cpu.md). Links, per direction per GPU:
- NVLink 4 (H100/H200 SXM): 900 GB/s total bidirectional per GPU, so 450 GB/s each way (NVIDIA,
  https://www.nvidia.com/en-us/data-center/h100/ and https://www.nvidia.com/en-us/data-center/h200/).
- PCIe Gen5 x16: 32 GT/s per lane x 16 lanes with 128b/130b coding, about 63 GB/s each way (PCI-SIG,
  PCI Express Base Specification 5.0, https://pcisig.com/specifications; NVIDIA's pages above
  list "PCIe Gen5: 128 GB/s" for both directions together); 64 GB/s is used.

Writes `.md` (the table, the fit and its errors, a check against the measured one-GPU epoch),
`.csv` and `.png` (projected epoch time and speed-up against GPU count) next to `--out`.
"""

import dataclasses
import datetime
import functools
import pathlib
import sys

import numpy as np

import bucketing
import cli_errors
from experiments import iam, reporting

BENCHMARK = "experiments.benchmark_step"
STEP_TIMES = pathlib.Path(__file__).parent / "results" / "benchmark_step_gpu_defaults.md"
ANATOMY_HEADING = "## Anatomy of one train step (ms, medians)"
EPOCH_HEADING = "## One IAM-OnDB training epoch (5,364 lines, raw points, batch 32)"
DEFAULT_IMPLEMENTATION = "scan unroll 8, pallas CTC"
# One-direction bandwidth per GPU, bytes/s (sources in the module docstring).
LINKS = {"NVLink 4": 450e9, "PCIe Gen5 x16": 64e9}
DEVICE_COUNTS = (1, 2, 4, 8)
BATCH_PER_DEVICE = 32  # weak scaling
GLOBAL_BATCH = 32  # strong scaling
NUM_BUCKETS = 8
COLUMNS = (
  "scaling",
  "link",
  "GPUs",
  "global batch",
  "per-GPU batch",
  "steps/epoch",
  "compute/step (ms)",
  "all-reduce/step (ms)",
  "epoch (s)",
  "speed-up",
  "efficiency",
)


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
  """One-GPU train-step time `constant + per_timestep * T + per_token * B * T`, milliseconds."""

  constant_ms: float
  per_timestep_ms: float
  per_token_ms: float

  def __call__(self, batch_size, length):
    return self.constant_ms + (self.per_timestep_ms + self.per_token_ms * batch_size) * length


def fit_step_model(points: list[tuple[int, int, float]], per_timestep: bool = True):
  """Least-squares fit to (B, T, ms) points; `per_timestep=False` is the cost model's alpha+beta."""
  batch, length, ms = (np.asarray(column, float) for column in zip(*points, strict=True))
  per_token = batch * length
  columns = [np.ones_like(ms), length if per_timestep else np.zeros_like(ms), per_token]
  solution = np.linalg.lstsq(np.stack(columns, axis=1), ms, rcond=None)[0]
  return StepTimeModel(*(float(value) for value in solution))


def relative_errors(model: StepTimeModel, points, leave_one_out: bool = False, **fit_options):
  """(predicted - measured) / measured at each point; leave-one-out refits without the point."""
  errors = []
  for index, (batch, length, ms) in enumerate(points):
    if leave_one_out:
      model = fit_step_model(points[:index] + points[index + 1 :], **fit_options)
    errors.append((model(batch, length) - ms) / ms)
  return errors


def allreduce_seconds(num_bytes: float, num_devices: int, bandwidth: float) -> float:
  """A ring all-reduce: each GPU sends (and receives) 2 (n - 1) / n times the buffer."""
  return 2 * (num_devices - 1) / num_devices * num_bytes / bandwidth


def project_epoch(
  lengths: np.ndarray,
  step_model: StepTimeModel,
  num_devices: int,
  global_batch: int,
  gradient_bytes: float,
  bandwidth: float,
  num_buckets: int = NUM_BUCKETS,
) -> dict:
  """Projected epoch of `optimal` buckets: steps, mean compute and all-reduce per step, seconds."""
  plan = bucketing.make_plan(
    lengths,
    strategy="optimal",
    num_buckets=num_buckets,
    batch_size=global_batch,
    num_devices=num_devices,
    round_to=8,
  )
  steps = plan.steps_per_epoch
  compute_s = steps * step_model(plan.batch_sizes // num_devices, plan.upper_bounds) / 1e3
  allreduce_s = allreduce_seconds(gradient_bytes, num_devices, bandwidth)
  num_steps = int(steps.sum())
  return {
    "steps": num_steps,
    "compute_s": float(compute_s.sum()),
    "allreduce_s": num_steps * allreduce_s,
    "epoch_s": float(compute_s.sum()) + num_steps * allreduce_s,
  }


def scaling_rows(lengths, step_model, gradient_bytes, links=LINKS, device_counts=DEVICE_COUNTS):
  """The table: strong (global batch fixed) and weak (per-GPU batch fixed) scaling per link."""
  rows = []
  for scaling in ("strong", "weak"):
    for link, bandwidth in links.items():
      single = None
      for devices in device_counts:
        global_batch = GLOBAL_BATCH if scaling == "strong" else BATCH_PER_DEVICE * devices
        epoch = project_epoch(lengths, step_model, devices, global_batch, gradient_bytes, bandwidth)
        single = single or epoch["epoch_s"]
        speedup = single / epoch["epoch_s"]
        rows.append(
          {
            "scaling": scaling,
            "link": link,
            "GPUs": str(devices),
            "global batch": str(global_batch),
            "per-GPU batch": str(global_batch // devices),
            "steps/epoch": str(epoch["steps"]),
            "compute/step (ms)": f"{1e3 * epoch['compute_s'] / epoch['steps']:.2f}",
            "all-reduce/step (ms)": f"{1e3 * epoch['allreduce_s'] / epoch['steps']:.4f}",
            "epoch (s)": f"{epoch['epoch_s']:.3f}",
            "speed-up": f"{speedup:.2f}",
            "efficiency": f"{speedup / devices:.2f}",
          }
        )
  return rows


def read_step_times(path=STEP_TIMES, implementation=DEFAULT_IMPLEMENTATION):
  """(B, T, step ms) of every anatomy row of `implementation` in a benchmark_step results file."""
  rows = _results_rows(path, ANATOMY_HEADING, ("B", "T", "implementation", "step"))
  chosen = [row for row in rows if row["implementation"] == implementation]
  try:
    points = [(int(row["B"]), int(row["T"]), float(row["step"])) for row in chosen]
  except ValueError as error:
    raise ValueError(f"{path}: a row under {ANATOMY_HEADING!r} is not numbers ({error})") from None
  if len(points) < 3:
    known = sorted({row["implementation"] for row in rows})
    raise ValueError(
      f"{path}: {len(points)} rows of implementation {implementation!r}, the fit needs 3; it has "
      f"{known}"
    )
  return points


def read_measured_epoch(path=STEP_TIMES) -> tuple[int, float]:
  """(K, epoch seconds) of our trainer's measured one-GPU IAM-OnDB epoch in the same file."""
  rows = _results_rows(path, EPOCH_HEADING, ("contender", "K", "epoch (s)"))
  ours = next((row for row in rows if row["contender"].startswith("ours")), None)
  if ours is None:
    raise ValueError(f"{path}: no row of ours under {EPOCH_HEADING!r}")
  try:
    return int(ours["K"]), float(ours["epoch (s)"])
  except ValueError as error:
    raise ValueError(f"{path}: our row under {EPOCH_HEADING!r} is not numbers ({error})") from None


def _results_rows(path, heading: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
  """The rows of the table under `heading` in a benchmark_step results file, which has `columns`.

  Any other file (another Markdown file, a table of other columns, a binary file) is a ValueError
  that starts with `path` and says what it lacks, where a missing column would be a bare KeyError.
  """
  text = pathlib.Path(path).read_text(errors="replace")
  try:
    rows = reporting.read_markdown_table(text, heading)
  except ValueError as error:  # also a row with more or fewer cells than its header
    raise ValueError(
      f"{path}: {cli_errors.one_line(error)} (expected a results file of {BENCHMARK}, like "
      f"{STEP_TIMES.name})"
    ) from None
  missing = [column for column in columns if column not in rows[0]]
  if missing:
    raise ValueError(f"{path}: the table under {heading!r} has no column {missing}")
  return rows


def _read_steps_file(path: str, implementation: str):
  """The step times of `implementation` and the measured epoch in the --steps file, read before
  any work, so that a wrong file is one line naming the flag instead of a late stop."""
  file = pathlib.Path(path).expanduser()
  cli_errors.input_file(file, f"--steps {path}", f"a results file of {BENCHMARK}")
  try:
    return read_step_times(file, implementation), read_measured_epoch(file)
  except OSError as error:
    raise OSError(f"--steps {path}: cannot read it ({error.strerror or error})") from None
  except ValueError as error:  # its message starts with the file
    raise ValueError(f"--steps {error}") from None


def gradient_bytes(config) -> int:
  """Bytes of the model's float32 gradients (its parameter count times 4), from shapes only."""
  import jax
  import jax.numpy as jnp

  import train

  inputs = jnp.zeros((1, 8, train.feature_config(config).num_features), jnp.float32)
  init = functools.partial(train.build_model(config).init, train=False)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), inputs, jnp.zeros((1, 8), jnp.float32))
  return 4 * sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (time_axes, speed_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
  for scaling, link in sorted({(row["scaling"], row["link"]) for row in rows}):
    group = [row for row in rows if (row["scaling"], row["link"]) == (scaling, link)]
    devices = [int(row["GPUs"]) for row in group]
    style = "-" if scaling == "strong" else "--"
    label = f"{scaling} scaling, {link}"
    time_axes.plot(devices, [float(row["epoch (s)"]) for row in group], style, marker="o",
                   label=label)  # fmt: skip
    speed_axes.plot(devices, [float(row["speed-up"]) for row in group], style, marker="o",
                    label=label)  # fmt: skip
  speed_axes.plot(DEVICE_COUNTS, DEVICE_COUNTS, "k:", label="linear")
  for axes in (time_axes, speed_axes):
    axes.set_xscale("log", base=2)
    axes.set_xticks(DEVICE_COUNTS, [str(count) for count in DEVICE_COUNTS])
    axes.set_xlabel("GPUs")
    axes.legend(fontsize="small")
  time_axes.set_ylabel("projected epoch time (s)")
  speed_axes.set_ylabel("projected speed-up (sequences/s against 1 GPU)")
  figure.suptitle("PROJECTION from one-GPU (H200) step times: IAM-OnDB, optimal K = 8")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main(argv: list[str] | None = None) -> pathlib.Path:
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument("--data-dir", default=None, help="holds iam_ondb.npz or the TFDS build")
  parser.add_argument("--dataset", default="iam_ondb", help="iam_ondb (the paper) or synthetic")
  parser.add_argument(
    "--train-limit", type=cli_errors.non_negative_int, default=0, help="first N lines (0: all)"
  )
  parser.add_argument("--steps", default=str(STEP_TIMES), help="a benchmark_step results file")
  parser.add_argument("--implementation", default=DEFAULT_IMPLEMENTATION)
  parser.add_argument(
    "--out", default="/tmp/projection_multi_gpu", help="path prefix of the .md, .csv and .png"
  )
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  points, (measured_k, measured_epoch) = _read_steps_file(args.steps, args.implementation)
  prefix = cli_errors.output_path("--out", args.out, make_folder=True)

  import train

  step_model = fit_step_model(points)
  cost_model = fit_step_model(points, per_timestep=False)
  config = iam.get_config()
  config.data.dataset, config.data.data_dir = args.dataset, args.data_dir
  lengths = train.load_split(config, config.data.train_split, args.train_limit).lengths
  whole_training_split = args.dataset == "iam_ondb" and not args.train_limit  # the measured epoch's
  num_bytes = gradient_bytes(config)
  rows = scaling_rows(lengths, step_model, num_bytes)

  reporting.write_csv(f"{prefix}.csv", rows, COLUMNS)
  plot(rows, f"{prefix}.png")

  def percent(errors):
    return ", ".join(f"{100 * error:+.1f}%" for error in errors)

  projected_epoch = project_epoch(lengths, step_model, 1, GLOBAL_BATCH, num_bytes, 1.0)
  where = ", ".join(f"(B {b}, T {t}): {ms:.2f} ms" for b, t, ms in points)
  command = " ".join(["python -m experiments.projection", *(argv or sys.argv[1:])])
  report = [
    "# Data-parallel epoch time on 1-8 GPUs: a PROJECTION, not a measurement",
    "",
    f"Date: {datetime.date.today().isoformat()}. Command: `{command}`. Computed on a CPU; the "
    f"inputs were measured on one NVIDIA H200 (`{pathlib.Path(args.steps).name}`, rows "
    f"`{args.implementation}`).",
    f"Data: `{args.dataset}` training lengths ({len(lengths):,} lines), `optimal` buckets, "
    f"K = {NUM_BUCKETS}, bounds multiples of 8, batch a multiple of the GPU count. Model: "
    f"`experiments/iam.py`, {num_bytes // 4:,} parameters, {num_bytes / 1e6:.2f} MB of float32 "
    "gradients per all-reduce.",
    "",
    "    step(B, T)   = c + a * T + b * B * T            (ms, one GPU, per-GPU batch B)",
    "    allreduce(n) = 2 (n - 1) / n * bytes / bandwidth  (ring; no overlap, no latency term)",
    "    epoch(n)     = sum_b steps_b(n) * (step(B_b / n, L_b) + allreduce(n))",
    "",
    f"Measured step times: {where}. Fit: c = {step_model.constant_ms:.3f} ms, a = "
    f"{step_model.per_timestep_ms * 1e3:.3f} us per timestep, b = "
    f"{step_model.per_token_ms * 1e6:.3f} ns per token; its errors on the measured points "
    f"{percent(relative_errors(step_model, points))} (leave-one-out: "
    f"{percent(relative_errors(step_model, points, leave_one_out=True))}; without a point "
    "whose B no other point shares, b is not identified: the dependence on B rests on it). "
    "The bucketing cost "
    f"model alone (a = 0) fits them with errors {percent(relative_errors(cost_model, points))}, "
    "so it is not used here. Step times at per-GPU batches below 32 are extrapolated.",
    f"Check: the fitted step model projects a one-GPU epoch (K = {NUM_BUCKETS}, batch "
    f"{GLOBAL_BATCH}) of {projected_epoch['epoch_s']:.2f} s; "
    + (
      f"the same file measured {measured_epoch:.2f} s for our trainer at K = {measured_k}."
      if whole_training_split
      else f"the same file's {measured_epoch:.2f} s, measured on all of IAM-OnDB's training "
      f"lines, compares only with a projection of them (not `{args.dataset}`'s "
      f"{len(lengths):,} here)."
    ),
    "Links, one direction per GPU: "
    + ", ".join(f"{link} {bandwidth / 1e9:g} GB/s" for link, bandwidth in LINKS.items())
    + " (sources: experiments/projection.py). Strong scaling: global batch "
    f"{GLOBAL_BATCH} split over the GPUs; weak scaling: {BATCH_PER_DEVICE} per GPU. Speed-up: "
    "the one-GPU epoch time over this one (sequences per second); efficiency: speed-up / GPUs.",
    "",
    *reporting.markdown_table(rows, COLUMNS),
    "",
    f"![projected epoch time and speed-up]({prefix.name}.png)",
    "",
  ]
  path = pathlib.Path(f"{prefix}.md")
  path.write_text("\n".join(report))
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
