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
