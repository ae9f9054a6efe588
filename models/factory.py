"""Builds the model from plain keyword arguments, so `models` never sees a config object.

The trainer calls `make_model(**config.model)`; a misspelt or missing key is a TypeError here, and
a value out of range a ValueError, before anything is traced or compiled.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.lstm import LstmCtcModel
from models.lstm_kernel import KernelConfig, padded_hidden_size

LSTM_IMPLEMENTATIONS = ("auto", "scan", "pallas")
# Backend -> the model dtypes for which `auto` takes the fused kernel. On an H200 (B = 32, T = 608,
# experiments/results/benchmark_step_gpu_kernels.md and .log): a bfloat16 model's whole train step
# took 16.52 ms with the kernel (weights on chip, next frame prefetched, 16 warps) against
# 22.61 with the scan at unroll 8; float32 weights do not fit on chip, and re-reading them at every
# frame took 16.52 ms for one BLSTM layer's recurrence against the scan's 7.48.
KERNEL_DTYPES = {"gpu": ("bfloat16",)}
# The kernel's launch parameters per model dtype, where they differ from `KernelConfig`'s (the
# float32 variant measured fastest): on an H200 bfloat16 weights held on chip with the next frame
# prefetched took 5.07-5.22 ms at 8 or 16 warps (two runs, neither faster in both), 6.66-6.87
# without the prefetch, against the scan's 7.48 (benchmark_step_gpu_anatomy.md, _kernels.md).
KERNEL_LAUNCH = {"bfloat16": {"weights_resident": True, "prefetch": True}}
# The largest (padded) hidden size `auto` gives the kernel: the only one measured. Held on chip, a
# direction's bfloat16 gate weights take 4 x 128 x 128 x 2 bytes = 128 KiB per program there; at
# 256 (any hidden size from 129 up) they would take 512 KiB, twice an H100's or H200's register
# file per SM and more than its shared memory.
MAX_KERNEL_HIDDEN_SIZE = 128
# Scan unroll per backend when `unroll=0`: measured fastest for the scan (unroll 8 was 1.54x
# faster than 1 for a train step on an H200, 39.7 against 61.3 ms in benchmark_step_gpu.md; 1 is
# fastest on the CPU, benchmark_lstm_cpu.md).
DEFAULT_UNROLL = {"gpu": 8}
# Backends whose scan steps read inputs sliced by the step before (`models.lstm._scan`): on the
# 2-core CPU a BLSTM 128 recurrence's forward + backward took 0.89-0.92x the time without (B 32,
# T 300 and 1,200) and a whole train step 0.94-0.95x (2 x BLSTM 128 at B 16, T 224; 3 x at B 32,
# T 600). On an H200 it made the recurrence slower: 8.26-8.29 against 7.48 ms at unroll 8 (one
# BLSTM 128 layer's forward + backward, B 32, T 608; experiments/results/
# benchmark_step_gpu_anatomy.md and _kernels.md).
SCAN_PREFETCH_BACKENDS = ("cpu",)


def resolve_lstm_implementation(
  lstm_impl: str, hidden_size: int, backend: str, dtype: str | jnp.dtype = "float32"
) -> str:
  """ "scan" or "pallas": `auto` takes the fused kernel where `KERNEL_DTYPES` says it measured
  faster (bfloat16 models on a GPU) at the hidden sizes measured (`MAX_KERNEL_HIDDEN_SIZE`), the
  scan elsewhere."""
  if lstm_impl not in LSTM_IMPLEMENTATIONS:
    raise ValueError(f"lstm_impl must be one of {LSTM_IMPLEMENTATIONS}, got {lstm_impl!r}")
  if lstm_impl != "auto":
    return lstm_impl
  supported = padded_hidden_size(hidden_size) <= MAX_KERNEL_HIDDEN_SIZE
  faster = jnp.dtype(dtype).name in KERNEL_DTYPES.get(backend, ())
  return "pallas" if faster and supported else "scan"


def make_model(
  *,
  num_classes: int,
  num_layers: int,
  hidden_size: int,
  bidirectional: bool = True,
  dropout_rate: float = 0.0,
  input_projection_size: int | None = None,
  lstm_impl: str = "auto",
  unroll: int = 0,
  kernel: dict | None = None,
  dtype: str | jnp.dtype = "float32",
  backend: str | None = None,
) -> nn.Module:
  """Returns an `LstmCtcModel`; see its docstring for the meaning of each argument.

  `dtype` may be a name ("float32", "bfloat16") so that configs stay plain Python values.
  `lstm_impl` "auto" and `unroll` 0 are resolved for `backend` (default: JAX's default backend):
  the model's `lstm_implementation`, `unroll` and `scan_prefetch` (set on the backends in
  `SCAN_PREFETCH_BACKENDS`) say what was chosen. `kernel` holds `KernelConfig` launch parameters,
  a None value (or a missing one) standing for the fastest measured for `dtype` (`KERNEL_LAUNCH`);
  the kernel runs in the Pallas interpreter on backends other than the GPU (slow: for tests)
  unless `kernel` says otherwise (`interpret`).
  """
  if num_classes < 2:
    raise ValueError(f"num_classes must count the blank plus at least one label, got {num_classes}")
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if hidden_size < 1:
    raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if input_projection_size is not None and input_projection_size < 1:
    raise ValueError(f"input_projection_size must be None or >= 1, got {input_projection_size}")
  if unroll < 0:
    raise ValueError(f"unroll must be >= 1, or 0 for the backend's default, got {unroll}")
  backend = backend or jax.default_backend()
  dtype = jnp.dtype(dtype)
  implementation = resolve_lstm_implementation(lstm_impl, hidden_size, backend, dtype)
  told = {field: value for field, value in (kernel or {}).items() if value is not None}
  launch = {"interpret": backend != "gpu"} | KERNEL_LAUNCH.get(dtype.name, {}) | told
  return LstmCtcModel(
    num_classes=num_classes,
    num_layers=num_layers,
    hidden_size=hidden_size,
    bidirectional=bidirectional,
    dropout_rate=dropout_rate,
    input_projection_size=input_projection_size,
    lstm_implementation=implementation,
    unroll=unroll or DEFAULT_UNROLL.get(backend, 1),
    scan_prefetch=backend in SCAN_PREFETCH_BACKENDS,
    kernel_config=KernelConfig(**launch),
    dtype=dtype,
  )
