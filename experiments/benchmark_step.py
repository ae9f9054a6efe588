"""The train step's anatomy: where one step's time goes, per LSTM implementation, beside cuDNN.

    python -m experiments.benchmark_step --preset quick               # one GPU, a few minutes
    python -m experiments.benchmark_step --preset quick --tune --epoch --data-dir DIR \\
        --xla-flags "loops in graphs=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"

The `experiments/iam.py` model (3 x BLSTM 128, CTC, Adam, gradient clipping) at fixed shapes,
batch B x T frames (lengths uniform in [T/2, T], 1 to T/20 labels: T/20 is IAM-OnDB's ratio of
characters to pen points). For every LSTM implementation, the median wall time of:

- `step`: the trainer's whole jitted `train.train_step` (forward, CTC, backward, Adam);
- `forward`: the model alone (the LSTM stack and its projections, logits out);
- `backward`: the model's backward pass alone, from the residuals its forward saved (`jax.vjp`),
  timed directly rather than as forward + backward less forward, which noise can make negative;
- `ctc`: the configured CTC loss and its gradient w.r.t. the logits;
- `optimizer`: clipping and the Adam update;
- PyTorch `nn.LSTM` + cuDNN's whole step at the same shape (when torch sees a GPU).

Implementations: the LSTM as a `lax.scan` (unroll 1 and 8) or the fused Pallas kernel
(`models.lstm_kernel`), the CTC loss as `optax.ctc_loss` or its Pallas kernel
(`models.ctc_kernel`). The parts are jitted apart, so they need not add up to the step (XLA fuses
across them). `--tune` first times both kernels' launch variants (checking each against the scan
or optax on the device) and runs the rest with the fastest (a bfloat16 model's step with the
fastest variant for bfloat16 weights); `--xla-flags NAME=FLAGS` reruns the
step in a child process under those `XLA_FLAGS`, beside a child with none; `--epoch` times one
epoch of the IAM-OnDB training set (`optimal` K = 8 and `none`, our trainer's compiled steps,
our model in each of `--epoch-dtypes`) against PyTorch cuDNN on random batches padded per batch
(needs `--data-dir` with `iam_ondb.npz`; `--no-anatomy` leaves the anatomy table out).
Writes `experiments/results/benchmark_step_<backend>.md` with the device named. A measurement that
fails is a "failed" cell, the others are still written, and the command exits 1 naming it.
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cli_errors
import train
from experiments import benchmark, iam
from experiments.reporting import RunRecord, markdown_table, results_path, versions, write_report
from handwriting import dataset as dataset_lib
from models.ctc_kernel import ctc_loss_kernel
from models.lstm import lstm_recurrence
from models.lstm_kernel import LAUNCH_FIELDS, KernelConfig, lstm_recurrence_kernel

RESULTS = pathlib.Path(__file__).parent / "results"
NUM_FEATURES = 3
# Implementations of the step: name -> dotted config overrides.
SCAN = {"model.lstm_impl": "scan", "ctc.impl": "optax"}
KERNELS = {"model.lstm_impl": "pallas", "ctc.impl": "pallas"}
IMPLEMENTATIONS = {
  "scan unroll 1, optax CTC": SCAN | {"model.unroll": 1},
  "scan unroll 8, optax CTC": SCAN | {"model.unroll": 8},
  "scan unroll 8, pallas CTC": {"model.lstm_impl": "scan", "model.unroll": 8, "ctc.impl": "pallas"},
  "scan unroll 8, pallas CTC, bfloat16": {
    "model.lstm_impl": "scan",
    "model.unroll": 8,
    "ctc.impl": "pallas",
    "model.dtype": "bfloat16",
  },
  "pallas LSTM, optax CTC": {"model.lstm_impl": "pallas", "ctc.impl": "optax"},
  "pallas LSTM, pallas CTC": KERNELS,
  "pallas LSTM, pallas CTC, bfloat16": KERNELS | {"model.dtype": "bfloat16"},
}
NO_EXTRA_FLAGS = "no extra flags"
PRESETS = {
  # (batch, time) -> the implementations timed there.
  "full": {
    (batch, time): tuple(IMPLEMENTATIONS)[:4] for batch in (32, 128) for time in (152, 608, 1544)
  },
  "quick": {
    (32, 608): tuple(IMPLEMENTATIONS),
    (32, 152): ("scan unroll 8, optax CTC", "scan unroll 8, pallas CTC"),
    (32, 1544): ("scan unroll 8, optax CTC", "scan unroll 8, pallas CTC"),
    (128, 608): ("scan unroll 8, optax CTC", "scan unroll 8, pallas CTC"),
  },
  # The defaults beside the step they replace, at every quick shape (one GPU, about a minute),
  # and a bfloat16 model's step with the scan and with the LSTM kernel (its fastest bfloat16
  # variant: on an H200 the only kernel faster than the scan, benchmark_step_gpu_kernels.md, and
  # so `auto`'s for bfloat16 models).
  "defaults": {
    (32, 608): (
      "scan unroll 8, optax CTC",
      "scan unroll 8, pallas CTC",
      "scan unroll 8, pallas CTC, bfloat16",
      "pallas LSTM, pallas CTC, bfloat16",
    ),
    (32, 152): ("scan unroll 8, pallas CTC",),
    (32, 1544): ("scan unroll 8, pallas CTC",),
    (128, 608): ("scan unroll 8, pallas CTC",),
  },
  # Seconds on a CPU (the kernels run in the Pallas interpreter): the tests' preset.
  "tiny": {(8, 24): ("scan unroll 1, optax CTC", "pallas LSTM, pallas CTC")},
}
# The LSTM kernel's launch variants and weight dtypes. A first H200 sweep
# (results/benchmark_step_gpu.md) found float32 weights kept on chip over the shared-memory limit
# (272 KiB asked, 227 available), deeper pipelining too, 4 warps 7x slower than 8, and batch tile
# 32 slower than 16. The second (results/benchmark_step_gpu_defaults.md) found 16 warps slower
# than 8 for float32 (28.4 against 16.6 ms), and bfloat16 weights kept on chip level with the
# scan (7.0-7.1 against 7.9 ms in float32, 7.1 in bfloat16): kernel and scan alike spend about
# 6 us per frame and pass. The third (results/benchmark_step_gpu_anatomy.md): prefetching the
# next frame's inputs made bfloat16 weights on chip the first variant faster than the scan
# (5.08 against 7.48 ms; 6.66 without prefetch) and float32 re-read weights slower (40.8 against
# 38.6, where the second sweep had 16.6 before the loop was reshaped for prefetching). The
# fourth (results/benchmark_step_gpu_kernels.md), the loop reading where it uses again without
# prefetch: float32 re-read back at 16.5, bfloat16 on chip with prefetch 5.07-5.15. The fastest
# of each dtype are `models.factory.KERNEL_LAUNCH`'s (the config's defaults for that dtype).
# Not yet run on a GPU: the gates' activations through the hardware's tanh.approx
# (`approx_activations`), fewer instructions on each frame's critical path.
TUNE_GRID = [
  (KernelConfig(num_warps=8, weights_resident=False), jnp.float32),
  (KernelConfig(num_warps=8, weights_resident=False, prefetch=True), jnp.float32),
  (KernelConfig(num_warps=8, weights_resident=True), jnp.bfloat16),
  (KernelConfig(num_warps=16, weights_resident=True), jnp.bfloat16),
  (KernelConfig(num_warps=8, weights_resident=True, prefetch=True), jnp.bfloat16),
  (KernelConfig(num_warps=16, weights_resident=True, prefetch=True), jnp.bfloat16),
  (KernelConfig(weights_resident=True, prefetch=True, approx_activations=True), jnp.bfloat16),
  (
    KernelConfig(num_warps=16, weights_resident=True, prefetch=True, approx_activations=True),
    jnp.bfloat16,
  ),
]
# (batch_tile, num_warps): the first H200 sweep over tiles 1-8 and 1-4 warps found these fastest.
CTC_TUNE_GRID = [(1, 2), (1, 4), (2, 4)]
TUNE_SECONDS = 120  # each kernel's sweep stops starting variants after this long
# Our strategies in the epoch table (`--epoch-strategies`) -> their bucket count K.
EPOCH_BUCKETS = {"optimal": 8, "none": 1}
EPOCH_LINES = {"tiny": 64}  # the preset -> the first lines of the training set it times (0: all)
# Exit code of a run whose tables are written but some measurement in them failed (a usage error
# is cli_errors' 2).
MEASUREMENT_FAILED = 1


def median_ms(run: Callable[[], object], repeats: int) -> float:
  """Median wall time of `run()` (which must block until its result is ready), after a warm-up."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def make_config(preset: str, *overrides: dict):
  """`experiments/iam.py` (its tiny variant for the tiny preset) with dotted overrides."""
  config = iam.get_config("tiny" if preset == "tiny" else None)  # locked: a misspelt field fails
  for override in overrides:
    config.update_from_flattened_dict(override)
  return config


def random_batch(batch: int, time_steps: int, seed: int = 0) -> dict[str, jax.Array]:
  """A bucket-shaped batch: lengths uniform in [T/2, T], 1 to max(2, T/20) labels, every
  row real."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(time_steps // 2, time_steps + 1, batch)
  label_time = max(2, time_steps // 20)
  label_lengths = rng.integers(1, label_time + 1, batch)
  return {
    "inputs": jnp.asarray(rng.normal(size=(batch, time_steps, NUM_FEATURES)), jnp.float32),
    "input_paddings": jnp.asarray(np.arange(time_steps) >= lengths[:, None], jnp.float32),
    "labels": jnp.asarray(rng.integers(1, train.ALPHABET.size, (batch, label_time)), jnp.int32),
    "label_paddings": jnp.asarray(np.arange(label_time) >= label_lengths[:, None], jnp.float32),
    "weights": jnp.ones(batch, jnp.float32),
  }


def anatomy(config, batch: dict[str, jax.Array], repeats: int) -> dict[str, float]:
  """Milliseconds of the step and of its parts (see the module docstring) for one config."""
  state = train.create_train_state(config, NUM_FEATURES, 10**6)
  apply = state.apply_fn
  inputs, paddings = batch["inputs"], batch["input_paddings"]
  forward = jax.jit(lambda params: apply({"params": params}, inputs, paddings))
  logits = forward(state.params)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=logits.shape), jnp.float32)
  pullback, backward = model_backward(forward, state.params)
  ctc_grad = jax.jit(
    jax.value_and_grad(
      lambda logits: state.ctc_loss_fn(
        logits, paddings, batch["labels"], batch["label_paddings"], batch["weights"]
      )[0]
    )
  )
  (grads,) = backward(pullback, cotangent)
  update = jax.jit(lambda state, grads: state.apply_gradients(grads=grads))
  step = jax.jit(train.train_step, donate_argnums=0)
  carried = [jax.tree.map(jnp.copy, state)]  # the step donates its state

  def run_step():
    new_state, metrics = step(carried.pop(), batch)
    carried.append(new_state)
    return jax.block_until_ready(metrics)

  timings = {
    "step": median_ms(run_step, repeats),
    "forward": median_ms(lambda: jax.block_until_ready(forward(state.params)), repeats),
    "backward": median_ms(lambda: jax.block_until_ready(backward(pullback, cotangent)), repeats),
    "ctc": median_ms(lambda: jax.block_until_ready(ctc_grad(logits)), repeats),
    "optimizer": median_ms(lambda: jax.block_until_ready(update(state, grads)), repeats),
  }
  return timings


def model_backward(forward, params):
  """(pullback, backward): `forward`'s vjp at `params`, computed once (its leaves are the
  residuals the forward pass saved), and a jitted `backward(pullback, cotangent) -> (gradient
  w.r.t. params,)` that runs the backward pass alone."""
  pullback = jax.jit(lambda params: jax.vjp(forward, params)[1])(params)
  return pullback, jax.jit(lambda pullback, cotangent: pullback(cotangent))


def torch_step_ms(config, batch: int, time_steps: int, repeats: int) -> float | None:
  """PyTorch cuDNN's whole train step at the shape, or None without torch on a GPU."""
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  step = benchmark.torch_train_step(config, NUM_FEATURES, "cuda", packed=False)
  numpy_batch = jax.device_get(random_batch(batch, time_steps))
  lengths = (1 - numpy_batch["input_paddings"]).sum(1).astype(np.int64)
  label_lengths = (1 - numpy_batch["label_paddings"]).sum(1).astype(np.int64)
  labels = np.concatenate(
    [row[:length] for row, length in zip(numpy_batch["labels"], label_lengths, strict=True)]
  )
  arguments = (
    torch.tensor(numpy_batch["inputs"]).cuda(),  # a copy: device_get's arrays are read-only
    torch.from_numpy(lengths),
    torch.from_numpy(labels).cuda(),
    torch.from_numpy(label_lengths),
  )

  def run():
    step(*arguments)
    torch.cuda.synchronize()

  return median_ms(run, repeats)


def variant_name(variant: KernelConfig, weight_dtype) -> str:
  """A launch variant's row name: its launch, and its recurrent weights' dtype unless float32."""
  return variant.describe() + ("" if weight_dtype == jnp.float32 else ", bfloat16 weights")


def tune_kernel(
  repeats: int, interpret: bool
) -> tuple[dict[str, KernelConfig], list[dict[str, str]]]:
  """Times each launch variant on one BLSTM layer's recurrence (forward + backward, B = 32,
  T = 608, hidden 128), checked against the float32 scan on this device; returns the fastest
  variant that matches for each weight dtype ("float32", "bfloat16": those of which some variant
  compiled and matched) and the table's rows."""
  time_steps, batch, hidden = (24, 16, 16) if interpret else (608, 32, 128)
  rng = np.random.default_rng(0)
  projected = tuple(
    jnp.asarray(rng.normal(size=(time_steps, batch, 4 * hidden)), jnp.float32) for _ in range(2)
  )
  kernel = jnp.asarray(rng.normal(size=(2, hidden, 4 * hidden)) / np.sqrt(hidden), jnp.float32)

  def timed(recurrence, dtype=jnp.float32):
    loss = lambda p, k: sum(jnp.sum(jnp.sin(h.astype(jnp.float32))) for h in recurrence(p, k))
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    weights = kernel.astype(dtype)
    result = grad(projected, weights)
    return result, median_ms(lambda: jax.block_until_ready(grad(projected, weights)), repeats)

  reference, scan_ms = timed(lambda p, k: lstm_recurrence(p, k, 8))
  rows = [{"variant": "scan, unroll 8", "ms": f"{scan_ms:.2f}", "max relative error": "-"}]
  _, scan_ms = timed(lambda p, k: lstm_recurrence(p, k, 8), jnp.bfloat16)
  rows.append(
    {
      "variant": "scan, unroll 8, bfloat16 weights",
      "ms": f"{scan_ms:.2f}",
      "max relative error": "-",
    }
  )
  # Each step slicing the next step's inputs: faster on the CPU (models.factory), unmeasured here.
  result, scan_ms = timed(lambda p, k: lstm_recurrence(p, k, 8, prefetch=True))
  error = relative_error(result, reference)
  rows.append(
    {
      "variant": "scan, unroll 8, prefetch",
      "ms": f"{scan_ms:.2f}",
      "max relative error": f"{error:.1e}",
    }
  )
  timings = {}

  def measure(variant, dtype=jnp.float32):
    name = variant_name(variant, dtype)
    try:
      result, ms = timed(lambda p, k: lstm_recurrence_kernel(p, k, variant), dtype)
    except Exception as error:  # a variant Triton cannot compile is reported, not fatal
      rows.append({"variant": name, "ms": "failed", "max relative error": first_line(error)})
      print(name, "failed:", error, flush=True)
      return
    error = relative_error(result, reference)
    rows.append({"variant": name, "ms": f"{ms:.2f}", "max relative error": f"{error:.1e}"})
    print(" | ".join(rows[-1].values()), flush=True)
    if error < 1e-2:  # bfloat16 weights round to about 2.5e-3
      timings[jnp.dtype(dtype).name, variant] = ms

  deadline = time.perf_counter() + TUNE_SECONDS
  for variant, dtype in TUNE_GRID:
    if time.perf_counter() > deadline:
      rows.append(
        {"variant": variant_name(variant, dtype), "ms": "not run", "max relative error": "time"}
      )
      continue
    measure(dataclasses.replace(variant, interpret=interpret), dtype)
  fastest = {}
  for dtype, variant in sorted(timings, key=timings.get):
    fastest.setdefault(dtype, variant)
  return fastest, rows


def tune_ctc(repeats: int, interpret: bool) -> tuple[dict | None, list[dict[str, str]]]:
  """Times the CTC kernel's launch variants (loss and gradient w.r.t. the logits, B = 32,
  T = 608, up to 30 labels, 82 classes), each run twice and checked against `optax.ctc_loss` at full
  float32 matmul precision (a result that changes between runs would be a race); returns the
  fastest matching `(batch_tile, num_warps)` as config overrides (None if none) and the rows."""
  batch = random_batch(8, 24) if interpret else random_batch(32, 608)
  logits = jnp.asarray(
    np.random.default_rng(2).normal(size=(*batch["inputs"].shape[:2], train.ALPHABET.size)),
    jnp.float32,
  )

  def loss_and_grad(loss_fn):
    arguments = (batch["input_paddings"], batch["labels"], batch["label_paddings"])
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(loss_fn(x, *arguments))))

  with jax.default_matmul_precision("highest"):
    optax_grad = loss_and_grad(optax.ctc_loss)
    reference = optax_grad(logits)
    optax_ms = median_ms(lambda: jax.block_until_ready(optax_grad(logits)), repeats)
  rows = [{"variant": "optax.ctc_loss", "ms": f"{optax_ms:.2f}", "deviation from optax": "-"}]
  timings = {}
  deadline = time.perf_counter() + TUNE_SECONDS
  for batch_tile, num_warps in CTC_TUNE_GRID:
    name = f"tile {batch_tile}, {num_warps} warps"
    if time.perf_counter() > deadline:
      rows.append({"variant": name, "ms": "not run", "deviation from optax": "time"})
      continue
    kernel_loss = functools.partial(
      ctc_loss_kernel, batch_tile=batch_tile, num_warps=num_warps, interpret=interpret
    )
    try:
      grad = loss_and_grad(kernel_loss)
      first, second = grad(logits), grad(logits)
      ms = median_ms(lambda grad=grad: jax.block_until_ready(grad(logits)), repeats)
    except Exception as error:  # a variant Triton cannot compile is reported, not fatal
      rows.append({"variant": name, "ms": "failed", "deviation from optax": first_line(error)})
      print(name, "failed:", error, flush=True)
      continue
    repeatable = all(
      bool(jnp.array_equal(a, b))
      for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    )
    loss_error = abs(float(first[0] - reference[0])) / abs(float(reference[0]))
    grad_error = float(jnp.max(jnp.abs(first[1] - reference[1])))
    verdict = f"loss {loss_error:.1e} relative, gradient {grad_error:.1e} absolute"
    if not repeatable:
      verdict += "; NOT repeatable between two runs"
    rows.append({"variant": name, "ms": f"{ms:.2f}", "deviation from optax": verdict})
    print(" | ".join(rows[-1].values()), flush=True)
    # optax itself, in float32, is 2.5e-3 from a float64 optax at this shape (measured on the
    # CPU, where the interpreted kernel was 3.6e-3 from it): the per-line losses are ~2e3 nats.
    if repeatable and loss_error < 1e-5 and grad_error < 1e-2:
      timings[(batch_tile, num_warps)] = ms
  if not timings:
    return None, rows
  batch_tile, num_warps = min(timings, key=timings.get)
  return {"ctc.batch_tile": batch_tile, "ctc.num_warps": num_warps}, rows


def relative_error(result, reference) -> float:
  """The largest deviation of any leaf of `result` from `reference`'s, relative to that leaf's
  largest magnitude."""
  return max(
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True)
  )


def first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:120] if text else repr(error)


def flag_variants(
  arguments: list[str], preset: str, settings: dict, dtype_settings: dict, repeats: int
) -> list[dict[str, str]]:
  """The whole step at the preset's first shape, for each of its implementations, in a child
  process per `NAME=XLA_FLAGS` (flags are read once, when the backend starts), after a child with
  no extra flags: the rows compare among themselves, each measured the same way."""
  rows = []
  for argument in [f"{NO_EXTRA_FLAGS}=", *arguments]:
    name, flags = argument.split("=", 1)
    child = [sys.executable, "-m", "experiments.benchmark_step", "--step-only"]
    child += ["--preset", preset, "--repeats", str(repeats), "--settings", json.dumps(settings)]
    child += ["--dtype-settings", json.dumps(dtype_settings)]
    # A blank XLA_FLAGS is read as a file name: join only what is there.
    inherited = os.environ.get("XLA_FLAGS", "")
    environment = os.environ | {"XLA_FLAGS": " ".join(part for part in (inherited, flags) if part)}
    done = subprocess.run(child, capture_output=True, text=True, env=environment, check=False)
    label = f"{name}: `{flags}`" if flags else name
    if done.returncode:
      message = done.stderr.strip().splitlines()[-1:] or ["no output"]
      rows.append({"XLA_FLAGS": label, "result": f"failed: {message[0]}"})
      continue
    timings = json.loads(done.stdout)
    cells = ", ".join(f"{impl} {ms:.2f} ms" for impl, ms in timings.items())
    rows.append({"XLA_FLAGS": label, "result": cells})
  return rows


def step_only(preset: str, settings: dict, dtype_settings: dict, repeats: int) -> dict[str, float]:
  """The `--step-only` child: the whole step at the preset's first shape per implementation."""
  (batch_size, time_steps), names = next(iter(PRESETS[preset].items()))
  batch = random_batch(batch_size, time_steps)
  timings = {}
  for name in names:
    config = make_config(preset, *launch_settings(IMPLEMENTATIONS[name], settings, dtype_settings))
    state = train.create_train_state(config, NUM_FEATURES, 10**6)
    step = jax.jit(train.train_step, donate_argnums=0)
    carried = [state]

    def run_step(step=step, carried=carried):
      new_state, metrics = step(carried.pop(), batch)
      carried.append(new_state)
      return jax.block_until_ready(metrics)

    timings[name] = median_ms(run_step, repeats)
  return timings


def load_epoch_data(preset: str, data_dir: str) -> dataset_lib.SequenceSet:
  """The IAM-OnDB training lines `epoch_rows` times, loaded before anything is timed: a missing
  or damaged export in `data_dir` is an error at once, not after minutes of other tables."""
  config = make_config(preset, {"data.data_dir": data_dir})
  return train.load_split(config, "train", EPOCH_LINES.get(preset, 0))


def epoch_rows(
  preset: str,
  data: dataset_lib.SequenceSet,
  settings: dict,
  strategies: list[str],
  repeats: int,
  dtype_settings: dict[str, dict] | None = None,
) -> tuple[list[dict[str, str]], str]:
  """One IAM-OnDB training epoch of `data` (`load_epoch_data`): our trainer (`optimal` K = 8,
  `none`), for each model dtype in `dtype_settings` (dtype -> its config overrides; default:
  float32 alone) against PyTorch cuDNN (float32; the tiny preset: its model). Returns the rows,
  and why PyTorch has none ("" when it has)."""
  dtype_settings = dtype_settings or {"float32": {}}
  measurements = []
  for dtype, overrides in dtype_settings.items():
    config = make_config(preset, settings, overrides, {"model.dtype": dtype})
    bench = benchmark.Bench(config, data, repeats)
    name = "ours" if list(dtype_settings) == ["float32"] else f"ours {dtype}"
    measurements += [
      bench.contender(name, bench.plan(strategy, EPOCH_BUCKETS[strategy]))
      for strategy in strategies
    ]
  torch_results = benchmark.torch_contenders(make_config(preset, settings), data, repeats)
  no_torch = torch_results if isinstance(torch_results, str) else ""
  if not no_torch:
    measurements += [m for m in torch_results if "cuDNN" in m.contender and "padded" in m.strategy]
    if not any("cuDNN" in m.contender for m in measurements):
      no_torch = "torch sees no GPU, so no cuDNN"
  benchmark.take_turns(measurements, repeats)
  rows = []
  for measurement in measurements:
    row = measurement.row()
    rows.append(
      {
        "contender": f"{row['contender']}, {row['strategy']}",
        "K": row["K"],
        "epoch (s)": f"{measurement.epoch_seconds:.2f}",
        "epochs (s)": ", ".join(f"{s:.2f}" for s in measurement.epochs_seconds),
        "compile (s)": row["compile (s)"],
        "padded/real": row["padded/real"],
      }
    )
    print(" | ".join(rows[-1].values()), flush=True)
  return rows, no_torch


def epoch_strategies(text: str) -> list[str]:
  """An argparse type for `--epoch-strategies`: comma-separated names of `EPOCH_BUCKETS`."""
  strategies = text.split(",")
  unknown = [strategy for strategy in strategies if strategy not in EPOCH_BUCKETS]
  if unknown:
    raise argparse.ArgumentTypeError(
      f"unknown strategy {', '.join(map(repr, unknown))}; expected a comma-separated list of "
      f"{', '.join(EPOCH_BUCKETS)}"
    )
  return strategies


def launch_settings(overrides: dict, settings: dict, dtype_settings: dict) -> list[dict]:
  """The config overrides of one measurement: its implementation's `overrides`, the tuned
  `settings` every model shares (the CTC kernel's), then the LSTM kernel's tuned for the model's
  dtype (none for a dtype not tuned: the config's measured defaults for it)."""
  dtype = overrides.get("model.dtype", "float32")
  return [overrides, settings, dtype_settings.get(dtype, {})]


def epoch_dtypes(text: str) -> list[str]:
  """An argparse type for `--epoch-dtypes`: comma-separated model dtypes."""
  dtypes = text.split(",")
  unknown = [dtype for dtype in dtypes if dtype not in ("float32", "bfloat16")]
  if unknown:
    raise argparse.ArgumentTypeError(
      f"unknown dtype {', '.join(map(repr, unknown))}; expected a comma-separated list of "
      "float32, bfloat16"
    )
  return list(dict.fromkeys(dtypes))


def named_flags(text: str) -> str:
  """An argparse type for `NAME=XLA_FLAGS`."""
  name, equals, _ = text.partition("=")
  if not (name and equals):
    raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FLAGS (a row name, then its flags)")
  return text


def main(argv: list[str] | None = None) -> pathlib.Path | int | None:
  """Writes the report and returns its path, or `MEASUREMENT_FAILED` (the report still written,
  the failed cells marked) when some measurement failed."""
  argv = sys.argv[1:] if argv is None else argv
  parser = cli_errors.ArgumentParser(description=__doc__)
  parser.add_argument(
    "--preset",
    choices=sorted(PRESETS),
    default="full",
    help="shapes and implementations: quick and defaults take minutes on one GPU, tiny seconds "
    "on a CPU (the tests')",
  )
  parser.add_argument("--tune", action="store_true", help="time the kernel's launch variants")
  parser.add_argument("--epoch", action="store_true", help="one IAM-OnDB epoch against PyTorch")
  parser.add_argument(
    "--epoch-strategies",
    type=epoch_strategies,
    default=None,
    help="ours: optimal (K = 8) and/or none (default: both)",
  )
  parser.add_argument(
    "--epoch-dtypes",
    type=epoch_dtypes,
    default=None,
    help="our model's dtypes in the epoch table, each with its `auto` implementations "
    "(default: float32)",
  )
  parser.add_argument("--data-dir", default=None, help="folder of iam_ondb.npz, for --epoch")
  parser.add_argument(
    "--anatomy",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="the anatomy table at the preset's shapes (--no-anatomy: the other sections alone)",
  )
  parser.add_argument(
    "--xla-flags",
    action="append",
    default=[],
    type=named_flags,
    metavar="NAME=FLAGS",
    help="a row of the whole step under these XLA_FLAGS (repeatable)",
  )
  parser.add_argument("--repeats", type=cli_errors.positive_int, default=10)
  parser.add_argument("--step-only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--settings", type=json.loads, default={}, help=argparse.SUPPRESS)
  parser.add_argument("--dtype-settings", type=json.loads, default={}, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.step_only:
    print(json.dumps(step_only(args.preset, args.settings, args.dtype_settings, args.repeats)))
    return None
  if args.epoch and not args.data_dir:
    parser.error("--epoch needs --data-dir (the folder of iam_ondb.npz)")
  if not args.epoch and (args.epoch_strategies or args.epoch_dtypes):  # else silently ignored
    flag = "--epoch-strategies" if args.epoch_strategies else "--epoch-dtypes"
    parser.error(f"{flag} chooses the epoch table's models: it needs --epoch")
  args.epoch_strategies = args.epoch_strategies or list(EPOCH_BUCKETS)
  args.epoch_dtypes = args.epoch_dtypes or ["float32"]
  if not (args.anatomy or args.tune or args.epoch or args.xla_flags):
    parser.error("--no-anatomy leaves nothing to measure without --tune, --epoch or --xla-flags")
  backend = jax.default_backend()
  out = results_path(args.out, RESULTS / f"benchmark_step_{backend}.md")
  epoch_data = load_epoch_data(args.preset, args.data_dir) if args.epoch else None
  preset_name = args.preset
  model = make_config(preset_name).model
  sections = []
  record = RunRecord("experiments.benchmark_step", argv, versions(with_torch=True))

  def write_so_far(unfinished: list[str] = ()) -> None:
    """Writes what is measured so far, `unfinished` the section still measuring: a run cut short
    (a GPU call's deadline) still leaves its finished sections and rows."""
    report = [
      "# The train step's anatomy, per LSTM implementation"
      if args.anatomy
      else "# The train step benchmark, without its anatomy table",
      "",
      *record.header(),
      f"Model: `experiments/iam.py{':tiny' if preset_name == 'tiny' else ''}` ("
      f"{model.num_layers} x BLSTM {model.hidden_size}, CTC, Adam, clipping); medians of "
      f"{args.repeats} runs after a warm-up, compiles outside the timings.",
      "",
      *sections,
      *unfinished,
    ]
    if unfinished:  # one row more: said once its section is done
      out.write_text("\n".join(report))
    else:
      write_report(out, report)

  settings = {}  # dotted config overrides every measurement uses: the CTC kernel's tuned launch
  dtype_settings = {}  # model dtype -> the LSTM kernel's launch parameters tuned for it
  failed_measurements = []  # each makes the exit code MEASUREMENT_FAILED
  left_out = {}  # kernel -> why no variant of it is tuned, and it is left out of the rest
  if args.tune:
    best, rows = tune_kernel(args.repeats, interpret=backend != "gpu")
    if not best:
      left_out["model.lstm_impl"] = "no LSTM kernel variant compiled and matched the scan"
      chosen = left_out["model.lstm_impl"]
    else:
      dtype_settings = {
        dtype: {f"model.kernel.{field}": getattr(variant, field) for field in LAUNCH_FIELDS}
        for dtype, variant in best.items()
      }
      chosen = "the rest of this run uses the fastest: " + "; ".join(
        f"{variant.describe()} for {dtype} models" for dtype, variant in best.items()
      )
    sections += [
      "## The LSTM kernel's launch variants",
      "",
      "One BLSTM layer's recurrence, forward + backward (B = 32, T = 608, hidden 128, float32; "
      "tiny sizes off the GPU), median ms; error: the largest deviation from the scan's outputs "
      f"and gradients, relative to their largest magnitude; {chosen}.",
      "",
      *markdown_table(rows, list(rows[0])),
      "",
    ]
    write_so_far()
    ctc_settings, rows = tune_ctc(args.repeats, interpret=backend != "gpu")
    if ctc_settings is None:
      left_out["ctc.impl"] = "no CTC kernel variant compiled, matched optax and repeated itself"
      chosen = left_out["ctc.impl"]
    else:
      settings |= ctc_settings
      chosen = f"the rest of this run uses the fastest: {ctc_settings}"
    sections += [
      "## The CTC kernel's launch variants",
      "",
      "Loss and gradient w.r.t. the logits (B = 32, T = 608, up to 30 labels, 82 classes; tiny "
      "sizes off the GPU), median ms; each variant ran twice and must give identical results; "
      f"optax at full float32 matmul precision is the reference; {chosen}.",
      "",
      *markdown_table(rows, list(rows[0])),
      "",
    ]
    write_so_far()

  columns = ["B", "T", "implementation", "step", "forward", "backward", "ctc", "optimizer"]
  columns.append("PyTorch cuDNN step")
  anatomy_rows = []

  def anatomy_section(complete: bool) -> list[str]:
    stopped = "" if complete else "The rows measured before the run stopped (it had more to time)."
    return [
      "## Anatomy of one train step (ms, medians)",
      "",
      *([stopped, ""] if stopped else []),
      *markdown_table(anatomy_rows, columns),
      "",
    ]

  for (batch_size, time_steps), names in PRESETS[preset_name].items() if args.anatomy else ():
    batch = random_batch(batch_size, time_steps)
    torch_ms = torch_step_ms(make_config(preset_name), batch_size, time_steps, args.repeats)
    for name in names:
      overrides = IMPLEMENTATIONS[name]
      if any(overrides.get(field) == "pallas" for field in left_out):
        continue
      row = {"B": str(batch_size), "T": str(time_steps), "implementation": name}
      try:
        config = make_config(preset_name, *launch_settings(overrides, settings, dtype_settings))
        timings = anatomy(config, batch, args.repeats)
        row |= {part: f"{timings[part]:.2f}" for part in columns[3:8]}
      except Exception as error:  # one failing contender must not lose the others' rows
        print(name, "failed:", error, flush=True)
        failed_measurements.append(
          f"{name} at B = {batch_size}, T = {time_steps}: {first_line(error)}"
        )
        row |= {part: "failed" for part in columns[3:8]}
      row["PyTorch cuDNN step"] = "-" if torch_ms is None else f"{torch_ms:.2f}"
      anatomy_rows.append(row)
      print(" | ".join(row.values()), flush=True)
      write_so_far(anatomy_section(complete=False))
  if args.anatomy:
    sections += anatomy_section(complete=True)
    write_so_far()

  if args.epoch:
    fallbacks = {"model.lstm_impl": "scan", "ctc.impl": "optax"}
    epoch_settings = settings | {field: fallbacks[field] for field in left_out}
    no_torch = ""
    try:
      rows, no_torch = epoch_rows(
        preset_name,
        epoch_data,
        epoch_settings,
        args.epoch_strategies,
        max(2, args.repeats // 5),
        {dtype: dtype_settings.get(dtype, {}) for dtype in args.epoch_dtypes},
      )
    except Exception as error:  # keep the sections measured so far, and the flags' section
      print("epoch failed:", error, flush=True)
      failed_measurements.append(f"the epoch: {first_line(error)}")
      rows = [{"contender": "failed", "error": first_line(error)}]
    sections += [
      f"## One IAM-OnDB training epoch ({len(epoch_data):,} lines, raw points, batch "
      f"{make_config(preset_name).bucketing.batch_size})",
      "",
      "Median of the timed epochs after one warm-up epoch, contenders taking turns; ours through "
      "`train.compile_steps` (the trainer's executables) with the default implementations "
      f"(`auto`){' except ' + str(left_out) if left_out else ''}, "
      f"{'the kernels launched as the fastest tuned above' if args.tune else 'their defaults'}"
      f", the model in {' and '.join(args.epoch_dtypes)}; PyTorch's in float32"
      f"{f' (no PyTorch row: {no_torch})' if no_torch else ''}.",
      "",
      *markdown_table(rows, list(rows[0])),
      "",
    ]
    write_so_far()
  if args.xla_flags:
    flag_rows = flag_variants(args.xla_flags, preset_name, settings, dtype_settings, args.repeats)
    failed_measurements += [
      f"XLA flags {row['XLA_FLAGS']}: {row['result']}"
      for row in flag_rows
      if row["result"].startswith("failed")
    ]
    (batch_size, time_steps), _ = next(iter(PRESETS[preset_name].items()))
    sections += [
      f"## XLA flags (B = {batch_size}, T = {time_steps}, the whole step, each in its own process)",
      "",
      *markdown_table(flag_rows, ["XLA_FLAGS", "result"]),
      "",
    ]
  write_so_far()
  failed_measurements += [f"tuning {field}: {why}" for field, why in left_out.items()]
  if failed_measurements:
    print(
      f"error: {len(failed_measurements)} measurement(s) failed, the rest are in {out}: "
      + cli_errors.one_line("; ".join(failed_measurements)),
      file=sys.stderr,
    )
    return MEASUREMENT_FAILED
  return out


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
