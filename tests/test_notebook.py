"""The gradient-alignment notebook executes headless, from a plain `pip install -e .[test]`."""

import os
import subprocess
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "alignment.ipynb")


def _ensure_python3_kernel():
  """ipykernel ships a 'python3' kernelspec into the environment; install it if this one lacks it."""
  try:
    KernelSpecManager().get_kernel_spec("python3")
  except NoSuchKernel:
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True)


@pytest.mark.slow
def test_alignment_notebook_executes_without_errors(monkeypatch, tmp_path):
  monkeypatch.delenv("VPT_RUN", raising=False)  # the in-memory tiny run, not some local checkpoint
  _ensure_python3_kernel()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError (with the cell and traceback) on the first failing cell.
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(figures) == 5  # layers, candidate heatmap, targets, probe scatter, signal quality
  text = "".join(o.get("text", "") for o in outputs)
  assert "η⟨g_probe, g_pre⟩ vs SGD step" in text
  assert "problems per half: split-half cos" in text
