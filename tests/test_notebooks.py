"""The walkthrough notebooks run headlessly from top to bottom, and are committed without outputs."""

import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds for one cell; the slowest (02's three short SSL runs) takes well under a minute
MAX_LINES = 60  # what one cell may print: a reader scrolls past walls of settings, dicts and raw tables


def test_the_three_walkthroughs_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_toy_world_and_pseudolabels", "02_model_and_objectives",
                                           "03_train_evaluate_ablate"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} cell {i} holds outputs; clear all outputs before committing")


def printed_lines(cell):
    """Lines of text a code cell shows: its streams, and its results and displays that are text
    (a figure's or an image's placeholder text is not shown, so it does not count)."""
    n = 0
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            n += len(out["text"].splitlines())
        elif out["output_type"] in ("execute_result", "display_data"):
            d = out["data"]
            if not any(k.startswith("image/") for k in d):
                n += len(d.get("text/markdown", d.get("text/plain", "")).splitlines())
        elif out["output_type"] == "error":
            n += len(out["traceback"])
    return n


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # A last cell, in this in-memory copy only, reports the kernel's interpreter: the ipykernel spec
    # "python3" runs `python`, which jupyter_client replaces by sys.executable, so the notebooks see
    # the same environment (this venv) as the tests.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(ROOT)}})  # run from the repo root
    # One torch thread per kernel unless the caller says otherwise: the notebooks' tensors are tiny,
    # and on a small CPU shared with other jobs torch's default (a thread per core) oversubscribes it;
    # measured on 2 shared cores: an older notebook 03 in 31 s with one thread, 178 s with two. The notebooks'
    # tempfile.mkdtemp() folders go under an empty TMPDIR of their own, which must be empty again
    # at the end: a notebook removes what it wrote.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # (torch's import makes an empty compile-cache folder in TMPDIR: it gets a folder of its own.)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "TMPDIR": str(tmp),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torchinductor")}
    try:
        client.execute(env=env)  # raises CellExecutionError naming the failing cell and its traceback
    finally:
        nbformat.write(nb, tmp_path / path.name)  # the executed copy, to read when something fails
    assert nb.cells[-1].outputs[0]["text"] == sys.executable
    long = {i: n for i, c in enumerate(nb.cells) if c.cell_type == "code" and (n := printed_lines(c)) > MAX_LINES}
    assert not long, f"{path.name}: cells print more than {MAX_LINES} lines ({long} as cell: lines); trim them"
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    assert not left, f"{path.name} leaves temporary files behind: {left[:5]}; remove its mkdtemp() folder at the end"
