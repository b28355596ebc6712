"""The notebooks: stored without outputs, and they run top to bottom against a synthetic cube."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart", "02_distributed_stats", "03_ml_loading"]
# What each notebook must print: evidence it did its job, not just that it ran.
EXPECTED = {
    "01_quickstart": ["['nasar', 'nasar_metadata']", "samples selected", "mean coherence"],
    "02_distributed_stats": ["dashboard: http", "corpus p1", "missing (metadata)", "correlation:"],
    "03_ml_loading": [
        "model input: (8, 22, 128, 128) float32",
        "samples without cross-pol; all exactly zero: True",
        "same as ds.nasar.normalized(): True",
        "-> resumes at the next sample: True",
    ],
}


@pytest.fixture(scope="module")
def kernel_env(small_cube, tmp_path_factory):
    """Environment for the kernels: the cube's URL, Agg, and a python3 kernelspec that
    runs this very interpreter (JUPYTER_PATH comes before user and system kernelspecs)."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (nasar-zarr tests)",
                "language": "python",
            }
        )
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("NASAR_ZARR_URL", str(small_cube))
    mp.setenv("MPLBACKEND", "Agg")
    mp.setenv("JUPYTER_PATH", str(jupyter))
    mp.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    yield
    mp.undo()


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_env):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # One extra cell proves which interpreter ran the notebook.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel:', sys.executable)"))
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    printed = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stdout"
    )
    assert f"kernel: {sys.executable}" in printed
    for text in EXPECTED[name]:
        assert text in printed, (name, text)
