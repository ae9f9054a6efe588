"""What every results file shares: the machine it ran on and Markdown tables."""

import os
import platform


def machine_description() -> str:
  """CPU, core count and JAX devices (JAX is imported here, so call it only where JAX may start)."""
  import jax

  devices = ", ".join(str(device.device_kind) for device in jax.devices())
  return (
    f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores "
    f"({platform.processor() or 'unknown processor'}); JAX devices: {devices}"
  )


def markdown_table(rows: list[dict[str, str]], columns) -> list[str]:
  """Lines of a right-aligned Markdown table of `rows` (dicts of formatted cells) by `columns`."""
  lines = ["| " + " | ".join(columns) + " |", "|" + " ---: |" * len(columns)]
  return lines + ["| " + " | ".join(row[column] for column in columns) + " |" for row in rows]


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
