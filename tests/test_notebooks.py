"""The exploration notebook runs top to bottom on the synthetic data and draws its figures."""

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "explore.ipynb"
# Ink samples, length histogram, padding efficiency, loss curve, held-out line.
NUM_FIGURES = 5


@pytest.mark.slow
def test_explore_notebook_runs_on_synthetic_data(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
    "commit notebooks/explore.ipynb with its outputs cleared"
  )
  # The kernel must be this interpreter (the project's environment), not some other python3.
  notebook.cells.insert(0, nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
  # What a user without IAM-OnDB sees: synthetic data on the default single CPU device.
  env = {
    name: value
    for name, value in os.environ.items()
    if name not in ("IAM_ONDB_DIR", "HANDWRITING_DATA_DIR", "XLA_FLAGS")
  }
  # Inline figures even when the caller exports a non-interactive backend (MPLBACKEND=Agg).
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  client = NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails

  assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable
  outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
  assert not [output for output in outputs if output["output_type"] == "error"]
  images = [output for output in outputs if "image/png" in output.get("data", {})]
  assert len(images) >= NUM_FIGURES
  text = "".join(output.get("text", "") for output in outputs)
  assert "dataset: synthetic" in text
  assert "hypothesis:" in text
  # Six synthetic epochs get past the blank plateau: the held-out line is read, if roughly.
  hypothesis = text.split("hypothesis:")[1].splitlines()[0].strip()
  assert hypothesis not in ("''", '""')
