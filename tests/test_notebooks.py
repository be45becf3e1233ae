"""The five notebooks run top to bottom on a fresh clone. $RLHF_OUT points to an empty folder, so each
notebook takes its tiny-run path; the tiny runs share one folder ($RLHF_TINY), so SFT is trained once for
all five, the reward model once for notebooks 3 to 5, PPO once for 4 and 5. The notebooks are executed in
memory: the files, and the outputs saved in them, are not touched. Two cheap checks read the committed files
as they are: the shared setup stays in notebooks/course.py, and the saved outputs come from a real run
without errors."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["1_model_and_sampling", "2_sft", "3_reward_model", "4_ppo", "5_beyond_ppo"]


def code_cells(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    return [cell for cell in nb.cells if cell.cell_type == "code"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tmp_path_factory.mktemp("empty_out"), tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, folders):
    from nbclient import NotebookClient

    empty_out, tiny = folders
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})  # cwd notebooks/, as in Jupyter
    # a failing cell raises CellExecutionError with its traceback
    client.execute(env={**os.environ, "RLHF_OUT": str(empty_out), "RLHF_TINY": str(tiny)})
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("a tiny run into" in o.get("text", "") for o in outputs), "the notebook did not take its tiny-run path"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
    assert not list(empty_out.iterdir()), "a notebook wrote into $RLHF_OUT"


@pytest.mark.parametrize("name", NAMES)
def test_setup_is_imported_not_copied(name):
    """The first code cell is a few lines around `course.outputs`: what every notebook shares lives in
    notebooks/course.py, written once, not pasted into each notebook again."""
    first = code_cells(name)[0].source
    assert "import course" in first and "course.outputs(" in first, f"{name}: the first code cell does not use course"
    assert len(first.splitlines()) <= 8, f"{name}: the first code cell has grown; move shared code to course.py"


@pytest.mark.parametrize("name", NAMES)
def test_saved_outputs_are_clean(name):
    """The committed notebooks carry the outputs of a real pipeline run: no cell failed, and none came
    from the tiny stand-in run."""
    cells = code_cells(name)
    assert any(cell.outputs for cell in cells), f"{name} is saved without outputs; see notebooks/README.md"
    for cell in cells:
        for o in cell.outputs:
            text = o.get("text", "") + "".join(o.get("traceback", []))
            assert o.output_type != "error" and "Traceback" not in text, f"{name}: a cell failed: {o.get('ename')}"
            assert "a tiny run into" not in text, f"{name} is saved with the outputs of the tiny run"
    # the saved run's folder was on another machine: the first cell also says where a reader's run goes
    first = "".join(o.get("text", "") for o in cells[0].outputs)
    assert first.startswith("outputs: the run in ") and "out/, where your own `bash pipeline.sh` writes" in first
