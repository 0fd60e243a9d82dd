"""Every notebook in ``notebooks/`` runs top to bottom.

The notebooks are collected when the tests are (a notebook added later is picked up with no
change here) and each is executed with nbclient in a fresh kernel:

* the kernel runs *this* interpreter (``sys.executable``), through a kernel spec written for
  the test session and put first on ``JUPYTER_PATH``, so the result does not depend on
  whichever ``python3`` kernel spec the machine happens to have registered;
* ``HIERFL_FAST=1`` is set: notebooks read it and run at tiny sizes;
* the working directory is ``notebooks/``, as when a user opens a notebook there.

A cell that raises, or a notebook that runs past :data:`NOTEBOOK_TIMEOUT` seconds in all,
fails the test; the executed notebook, outputs included, is written to the
test's temporary folder for inspection.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: seconds one notebook may take, all its cells together
NOTEBOOK_TIMEOUT = 600.0
KERNEL_NAME = "hierfl-test-python"


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> Path:
    """A Jupyter data folder holding one kernel spec: ipykernel on this interpreter."""
    data = tmp_path_factory.mktemp("jupyter")
    spec_dir = data / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return data


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, jupyter_path: Path, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("HIERFL_FAST", "1")
    # the backend ipykernel picks by default, whatever MPLBACKEND the machine has set
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        # nbclient times each cell; give each what is left of the budget
        timeout_func=lambda cell: max(1.0, deadline - time.monotonic()),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as error:
        executed = tmp_path / path.name
        nbformat.write(notebook, executed)
        pytest.fail(
            f"{path.name}: a cell failed (executed notebook: {executed})\n{error}", pytrace=False
        )
