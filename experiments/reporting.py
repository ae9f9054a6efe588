"""What every results file shares: the machine it ran on and Markdown tables."""

import csv
import datetime
import importlib.metadata
import os
import pathlib
import platform
import shlex
import time

import cli_errors


def machine_description() -> str:
  """CPU, core count and JAX devices (JAX is imported here, so call it only where JAX may start)."""
  import jax

  devices = ", ".join(str(device.device_kind) for device in jax.devices())
  return (
    f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores "
    f"({cpu_model()}); JAX devices: {devices}"
  )


CPUINFO = pathlib.Path("/proc/cpuinfo")
# The widest vector instructions first: XLA compiles CPU code for those the host has, and float32
# results (summed in another order) differ between hosts that differ in them.
VECTOR_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def cpu_model(cpuinfo: pathlib.Path = CPUINFO) -> str:
  """The CPU's model name and widest vector instructions ("AMD EPYC, AVX-512") from Linux's
  `/proc/cpuinfo`; where there is none, what `platform` knows."""
  try:
    fields = dict(
      (key.strip(), value.strip())
      for key, _, value in (line.partition(":") for line in cpuinfo.read_text().splitlines())
      if value
    )
  except OSError:
    return platform.processor() or "unknown processor"
  flags = set(fields.get("flags", "").split())
  vector = next((name for flag, name in VECTOR_FLAGS if flag in flags), None)
  model = fields.get("model name") or platform.processor() or "unknown processor"
  return f"{model}, {vector}" if vector else model


# The packages whose versions a results file names: what its numbers depend on.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def versions(packages: tuple[str, ...] = PACKAGES, with_torch: bool = False) -> str:
  """The installed versions of `packages` ("jax 0.10.2, jaxlib 0.10.2, ..."), and with
  `with_torch` torch's and its cuDNN's where torch is installed (for tables with PyTorch rows)."""
  text = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)
  if not with_torch:
    return text
  try:
    import torch
  except ImportError:
    return text
  cudnn = torch.backends.cudnn.version()
  return text + f", torch {torch.__version__}" + (f" (cuDNN {cudnn})" if cudnn else "")


def write_report(path: pathlib.Path, lines: list[str], echo: bool = False) -> pathlib.Path:
  """Writes a results file (creating its folder) and says where; `echo` prints it first."""
  text = "\n".join(lines)
  if echo:
    print(text)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  print(f"wrote {path}", flush=True)
  return path


def write_csv(path: pathlib.Path | str, rows: list[dict[str, str]], columns) -> None:
  """Writes `rows` (dicts of formatted cells) as CSV under the header `columns`, creating the
  file's folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def results_path(out: str | None, default: pathlib.Path) -> pathlib.Path:
  """Where a benchmark writes its report: `--out`, else `default`, checked before minutes of
  measuring (`cli_errors.output_path`) instead of failing when the report is done."""
  return cli_errors.output_path("--out", out or str(default), make_folder=True)


def markdown_table(rows: list[dict[str, str]], columns) -> list[str]:
  """Lines of a right-aligned Markdown table of `rows` (dicts of formatted cells) by `columns`."""
  lines = ["| " + " | ".join(columns) + " |", "|" + " ---: |" * len(columns)]
  return lines + ["| " + " | ".join(row[column] for column in columns) + " |" for row in rows]


def command_line(module: str, argv: list[str]) -> str:
  """`python -m module argv` as a shell would take it, after the `XLA_FLAGS` it ran under when
  they are set: they change what is measured, so they are part of the command."""
  command = shlex.join(["python", "-m", module, *argv])
  flags = os.environ.get("XLA_FLAGS")
  return f"XLA_FLAGS={shlex.quote(flags)} {command}" if flags else command


class RunRecord:
  """When a benchmark run started and how loaded the machine was: every results file opens with
  the lines of `header`, so a reader knows the machine, date, versions, command and load."""

  def __init__(self, module: str, argv: list[str], versions: str):
    self.command = command_line(module, argv)
    self.versions = versions
    self.load_before = os.getloadavg()[0]
    self.started = time.perf_counter()

  def header(self) -> list[str]:
    load_after = os.getloadavg()[0]
    return [
      f"Machine: {machine_description()}.",
      f"Date: {datetime.date.today().isoformat()}; {self.versions}. Command: `{self.command}`.",
      f"1-minute load average {self.load_before:.2f} before and {load_after:.2f} after the run on "
      f"{os.cpu_count()} cores (a load above the core count means other processes shared the "
      f"CPU); the run took {(time.perf_counter() - self.started) / 60:.1f} min.",
    ]


def read_markdown_table(text: str, heading: str) -> list[dict[str, str]]:
  """The rows of the first Markdown table after the line `heading`, as dicts by column name.

  How a script reads another's committed results instead of copying numbers into code.
  """
  lines = text.splitlines()
  if heading not in lines:
    raise ValueError(f"no heading {heading!r} in the results file")
  table = []
  for line in lines[lines.index(heading) + 1 :]:
    if line.startswith("|"):
      table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    elif table:
      break
  if len(table) < 3:
    raise ValueError(f"no table with rows under {heading!r}")
  columns, rows = table[0], table[2:]
  return [dict(zip(columns, row, strict=True)) for row in rows]
