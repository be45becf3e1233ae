"""The four notebooks run top to bottom on a fresh clone. $RLHF_OUT points to an empty folder, so each
notebook takes its tiny-run path; the tiny runs share one folder ($RLHF_TINY), so SFT is trained once for
all four, the reward model once for notebooks 3 and 4. The notebooks are executed in memory: the files,
and the outputs saved in them, are not touched."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tmp_path_factory.mktemp("empty_out"), tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("name", ["1_model_and_sampling", "2_sft", "3_reward_model", "4_ppo"])
def test_notebook_runs(name, folders):
    from nbclient import NotebookClient

    empty_out, tiny = folders
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})  # cwd notebooks/, as in Jupyter
    # a failing cell raises CellExecutionError with its traceback
    client.execute(env={**os.environ, "RLHF_OUT": str(empty_out), "RLHF_TINY": str(tiny)})
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("tiny run" in o.get("text", "") for o in outputs), "the notebook did not take its tiny-run path"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
    assert not list(empty_out.iterdir()), "a notebook wrote into $RLHF_OUT"
