"""Two processes on localhost (CPU, gloo collectives) train exactly like one process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from tests.test_train import latest_params, read_rows, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = """
import json, logging, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, {root!r})
import train
from tests.test_train import tiny_config

handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("train log: %(message)s"))
train.LOG.addHandler(handler)
train.LOG.setLevel(logging.INFO)

config = tiny_config(num_epochs=1, **{overrides!r})
config.distributed.initialize = True
config.distributed.coordinator_address = "localhost:{port}"
config.distributed.num_processes = 2
config.distributed.process_id = int(sys.argv[1])
summary = train.train_and_evaluate(config, {workdir!r})
print("upper bounds", summary["upper_bounds"])
print("measured cost model", summary["measured_cost_model"])
print("summary", json.dumps(summary))
"""


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def run_together(commands: list[list[str]], environment: dict) -> list[tuple[str, str]]:
  """Runs the commands at once (the processes of one run), each to success; their stdout and
  stderr."""
  workers = [
    subprocess.Popen(
      command,
      env=environment,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for command in commands
  ]
  outputs = [worker.communicate(timeout=600) for worker in workers]
  for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
    assert worker.returncode == 0, (stdout + stderr)[-3000:]
  return outputs


def run_two_processes(workdir: pathlib.Path, **overrides) -> list[str]:
  """Runs the worker as processes 0 and 1 of one run; what they printed."""
  code = WORKER.format(root=str(ROOT), port=free_port(), workdir=str(workdir), overrides=overrides)
  environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  commands = [[sys.executable, "-c", code, str(index)] for index in range(2)]
  return [stdout for stdout, _ in run_together(commands, environment)]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  two_dir, one_dir = tmp_path / "two", tmp_path / "one"
  outputs = run_two_processes(two_dir)
  # The run's log is process 0's alone.
  logged = [
    [line for line in out.splitlines() if line.startswith("train log: ")] for out in outputs
  ]
  assert any("epoch 0: train loss" in line for line in logged[0]) and logged[1] == [], logged

  summary = train.train_and_evaluate(tiny_config(num_epochs=1), one_dir)
  two_summary = json.loads((two_dir / "summary.json").read_text())
  assert two_summary["num_processes"] == 2 and summary["num_processes"] == 1
  assert two_summary["num_devices"] == summary["num_devices"] == jax.device_count() == 8
  assert two_summary["upper_bounds"] == summary["upper_bounds"]
  for row_two, row_one in zip(read_rows(two_dir), read_rows(one_dir), strict=True):
    for key in ("train_loss", "val_loss", "val_cer"):
      assert row_two[key] == pytest.approx(row_one[key], rel=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    latest_params(tiny_config(), two_dir),
    latest_params(tiny_config(), one_dir),
  )

  # Started again, the finished run trains nothing, and every process returns its summary.
  again = run_two_processes(two_dir)
  returned = [
    [
      json.loads(line.removeprefix("summary "))
      for line in out.splitlines()
      if line.startswith("summary ")
    ]
    for out in again
  ]
  assert returned == [[two_summary], [two_summary]]


@pytest.mark.slow
def test_two_processes_plan_auto_alike(tmp_path):
  # Each process times its own steps; were each to plan with its own figures they could choose
  # different buckets and their collectives would not match, so all take process 0's. With
  # compiles free (kappa 0) the choice among K rests on the timed steps alone.
  overrides = {"bucketing.strategy": "auto", "bucketing.kappa": 0.0}
  outputs = run_two_processes(tmp_path, **overrides)
  # The same figures to the last digit: two processes' own timings would never agree so.
  for prefix in ("upper bounds", "measured cost model"):
    printed = [[line for line in out.splitlines() if line.startswith(prefix)] for out in outputs]
    assert printed[0] == printed[1] and len(printed[0]) == 1, printed
  plan = json.loads((tmp_path / "plan.json").read_text())
  measured = plan["measured_cost"]["cost_model"]
  assert plan["cost_model"] == {**measured, "kappa": 0.0}


@pytest.mark.slow
def test_the_command_line_prints_the_summary_from_process_0_only(tmp_path):
  port = free_port()
  environment = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  command = [
    sys.executable,
    "train.py",
    "--config=experiments/synthetic.py:tiny",
    f"--workdir={tmp_path}",
    "--config.num_epochs=1",
    "--config.compilation_cache_dir=",
    "--config.distributed.initialize=True",
    f"--config.distributed.coordinator_address=localhost:{port}",
    "--config.distributed.num_processes=2",
  ]
  commands = [[*command, f"--config.distributed.process_id={index}"] for index in range(2)]
  outputs = run_together(commands, environment)
  # Gloo prints to stdout on every process as its collectives connect, from several threads (so
  # its lines can come broken), and never a brace: the summary is the JSON object after them.
  (first_out, first_err), (second_out, second_err) = outputs
  assert json.loads(first_out[first_out.index("{\n") :])["num_processes"] == 2
  assert "{" not in second_out
  assert "epoch 0: train loss" in first_err and "epoch 0" not in second_err
