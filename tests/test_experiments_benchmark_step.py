"""The step-anatomy driver: the sections and rows it promises, kernels checked on the way."""

import re

import jax.numpy as jnp
import pytest

from experiments import benchmark_step
from models.lstm_kernel import KernelConfig
from tests.test_experiments_benchmark import run_as_a_user, table_rows


def is_number(cell: str) -> bool:
  try:
    float(cell)
  except ValueError:
    return False
  return True


@pytest.mark.slow
def test_tiny_run_writes_tuning_and_anatomy_tables(tmp_path):
  out = tmp_path / "step.md"
  argv = ["--preset", "tiny", "--tune", "--repeats", "1", "--out", str(out)]
  run_as_a_user("experiments.benchmark_step", argv)
  text = out.read_text()
  assert "Machine:" in text and "python -m experiments.benchmark_step --preset tiny" in text

  lstm_rows = table_rows(text[: text.index("## The CTC kernel")], "variant")
  scan_rows = ["scan, unroll 8", "scan, unroll 8, bfloat16 weights", "scan, unroll 8, prefetch"]
  assert [row[0] for row in lstm_rows[:3]] == scan_rows
  assert len(lstm_rows) == 3 + len(benchmark_step.TUNE_GRID)
  for name, ms, error in lstm_rows[2:]:
    assert is_number(ms), name
    # The prefetching scan and the interpreter compute what the scan does in float32; bfloat16
    # weights round.
    assert float(error) < (1e-5 if "bfloat16" not in name else 1e-2), name
  assert "the rest of this run uses the fastest: tile 16" in text

  ctc_rows = table_rows(text[text.index("## The CTC kernel") : text.index("## Anatomy")], "variant")
  assert ctc_rows[0][0] == "optax.ctc_loss"
  assert len(ctc_rows) == 1 + len(benchmark_step.CTC_TUNE_GRID)
  assert all(is_number(row[1]) and "NOT repeatable" not in row[2] for row in ctc_rows)

  anatomy = table_rows(text, "B")
  assert [row[2] for row in anatomy] == list(benchmark_step.PRESETS["tiny"][(8, 24)])
  assert all(is_number(cell) for row in anatomy for cell in row[3:8])


def test_a_variant_that_fails_is_reported_and_the_others_still_chosen(monkeypatch):
  broken = KernelConfig(batch_tile=16, num_warps=3)
  monkeypatch.setattr(
    benchmark_step,
    "TUNE_GRID",
    [(broken, jnp.float32), (KernelConfig(num_warps=8, weights_resident=False), jnp.float32)],
  )
  real_kernel = benchmark_step.lstm_recurrence_kernel

  def kernel(projected, recurrent_kernel, config):
    if config.num_warps == 3:
      raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
    return real_kernel(projected, recurrent_kernel, config)

  monkeypatch.setattr(benchmark_step, "lstm_recurrence_kernel", kernel)
  best, rows = benchmark_step.tune_kernel(repeats=1, interpret=True)
  assert best.num_warps == 8 and best.interpret
  failed = [row for row in rows if row["ms"] == "failed"]
  assert len(failed) == 1 and "Shared memory" in failed[0]["max relative error"]


def test_xla_flag_variants_run_in_their_own_process_beside_a_baseline(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  dump = tmp_path / "dump"
  rows = benchmark_step.flag_variants(
    ["no such flag=--xla_no_such_flag_at_all=1", f"dump=--xla_dump_to={dump}"], "tiny", {}, 1
  )
  assert [row["XLA_FLAGS"].split(":")[0] for row in rows] == [
    benchmark_step.NO_EXTRA_FLAGS,
    "no such flag",
    "dump",
  ]
  implementations = benchmark_step.PRESETS["tiny"][(8, 24)]
  for row in (rows[0], rows[2]):
    timed = re.findall(r"(.+?) ([\d.]+) ms(?:, |$)", row["result"])
    assert [name for name, _ in timed] == list(implementations), row
  assert rows[1]["result"].startswith("failed:") and "xla_no_such_flag_at_all" in rows[1]["result"]
  assert any(dump.iterdir())  # the flags reached the child's backend
