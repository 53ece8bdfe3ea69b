"""The notebooks: stored clean (no outputs), public API only, and executed end to end with nbclient.

Each notebook is one test, so pytest-xdist can run them in parallel (`-n 3 --dist load`). Within
one worker they share a runs directory: the tiny runs that 01_train_rim trains are reused by 02
and 03 (each trains them itself when run alone). The kernel is this interpreter's ipykernel,
through a kernelspec written to a temporary directory, so no installed kernelspec is needed and
none elsewhere (a user-level `python3` pointing at another Python) is picked up.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; a notebook takes one to two minutes on 2 cores
KERNEL = "rim-lens-test"


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_there_are_three_notebooks():
    assert {"01_train_rim.ipynb", "02_probe_memory.ipynb", "03_causal_interventions.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i}: has outputs; clear them before saving"
            assert cell.execution_count is None, (
                f"{name} cell {i}: has an execution count; clear it before saving"
            )
        assert "execution" not in cell.metadata, f"{name} cell {i}: has execution timing metadata"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", (
        f"{name}: kernelspec should be the default python3"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_uses_only_the_public_api(name):
    """No `_private` names from rim_lens / training: the notebooks show what a user can do."""
    for i, cell in enumerate(_read(name).cells):
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "rim_lens",
                "training",
            ):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in node.module, (
                    f"{name} cell {i}: imports private {node.module} {private}"
                )
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                pytest.fail(f"{name} cell {i}: uses private attribute .{node.attr}")


def test_notebooks_train_in_the_papers_setting_and_share_one_setup():
    """No notebook trains the question-blind ablation; 02 and 03 take their runs from
    notebooks/nb_setup.py rather than each carrying a copy of the setup."""
    for name in NAMES:
        code = "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")
        assert "readout_sees_question=false" not in code.lower(), name
    assert "readout_sees_question" not in (NOTEBOOKS / "nb_setup.py").read_text()
    for name in ("02_probe_memory.ipynb", "03_causal_interventions.ipynb"):
        code = "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")
        assert "from nb_setup import" in code and "def trained" not in code and "TINY" not in code, name


# -- execution -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A kernelspec that starts ipykernel in this interpreter (the venv's Python)."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"rim-lens tests ({sys.executable})",
                "language": "python",
            }
        )
    )
    return [str(root)]


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory) -> Path:
    """Runs directory shared by the notebooks executed in this process (01's runs serve 02, 03)."""
    return tmp_path_factory.mktemp("notebook-runs")


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_dirs, notebook_runs, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = _read(name)
    env = {k: v for k, v in os.environ.items() if k != "RIM_LENS_NB_RUN"}  # never a user's run
    env.update(
        RIM_LENS_NB_RUNS=str(notebook_runs),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, at the first error
    print(f"{name}: executed in {time.perf_counter() - start:.0f}s")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}: not every code cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    # The runs went where the environment said, not into the repository.
    assert (notebook_runs / "rim" / "model").exists()
    nbformat.write(nb, tmp_path / name)  # the executed notebook, for inspection after a failure
