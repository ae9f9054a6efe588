"""The paper-table sweep: every run has a complete row, and the table agrees with the run files.

One test (one sweep, ~40 s on 2 cores), so that pytest-xdist workers do not each run it.
"""

import csv
import json

from experiments import paper


def test_sweep_writes_a_complete_table_that_agrees_with_its_runs(tmp_path):
  argv = ["--tiny", "--dataset", "synthetic", "--workdir", str(tmp_path)]
  argv += ["--buckets", "2", "--strategies", "none,optimal,auto", "--devices", "2"]
  markdown_path = paper.main(argv)  # one worker process, on 2 simulated devices
  with open(tmp_path / "paper_table.csv", newline="") as file:
    rows = list(csv.DictReader(file))

  # Every run has a row with every column filled.
  assert [(row["devices"], row["strategy"]) for row in rows] == [
    ("2", "none"),
    ("2", "optimal"),
    ("2", "auto"),
  ]
  for row in rows:
    assert list(row) == list(paper.COLUMNS)
    assert all(value.strip() for value in row.values()), row
  assert rows[1]["buckets"] == "2"

  # The baseline's speed-ups are 1; efficiency and the ideal speed-up are the plans'.
  assert rows[0]["speed-up"] == rows[0]["ideal speed-up"] == "1.000"
  # The baseline reaches its own best loss at its best epoch.
  assert rows[0]["wall to baseline loss (s)"] == rows[0]["wall to best (s)"]
  assert rows[0]["epochs to baseline loss"] == rows[0]["epochs to best"]
  baseline_plan = json.loads((tmp_path / "devices2/none_k1/plan.json").read_text())
  for row, (strategy, k) in zip(rows, paper.planned_runs([2], ["optimal", "auto"]), strict=True):
    run_dir = tmp_path / paper.run_name(2, strategy, k)
    plan = json.loads((run_dir / "plan.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_devices"] == 2  # the worker really ran on 2 devices
    assert row["padding efficiency"] == f"{plan['efficiency_with_filler']:.4f}"
    ideal = baseline_plan["padded_timesteps_with_filler"] / plan["padded_timesteps_with_filler"]
    assert row["ideal speed-up"] == f"{ideal:.3f}"
    assert float(row["wall to best (s)"]) >= float(row["compile (s)"])

  # The Markdown table is the CSV; the header names machine, load and command; the plots exist.
  text = markdown_path.read_text()
  assert "Machine:" in text and "load average" in text and "python -m experiments.paper" in text
  table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
  cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
  assert cells[0] == list(paper.COLUMNS)
  assert cells[1:] == [list(row.values()) for row in rows]
  for suffix in ("_val_loss.png", "_speedup.png"):
    assert (tmp_path / f"paper_table{suffix}").read_bytes()[:4] == b"\x89PNG"

  # Running the sweep again reuses the finished runs instead of training them again.
  summary_path = tmp_path / "devices2/none_k1/summary.json"
  before = summary_path.stat().st_mtime_ns
  paper.main(argv)
  assert summary_path.stat().st_mtime_ns == before
