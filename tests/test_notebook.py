"""notebooks/walkthrough.ipynb runs top to bottom (nbclient), on tiny caps, so it cannot rot: the real
all-MiniLM-L6-v2 and GLUE data when ../shared is there, else the tiny random model and synthetic data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import GLUE, MINILM

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


@pytest.mark.slow
def test_walkthrough_executes(tmp_path: Path, monkeypatch, tiny_base: Callable[[str], Path], tiny_glue: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed")
    nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed")
    out = tmp_path / "walkthrough"
    real = MINILM.is_dir() and GLUE.is_dir()
    sizes = {
        "OUTPUT": str(out),
        "TRAIN": "48",
        "EVAL": "32",
        "FISHER": "16",
        "EPOCHS": "1",
        "MODEL": str(MINILM if real else tiny_base("bert")),
        "DATA": str(GLUE if real else tiny_glue),
    }
    for key, value in sizes.items():  # the kernel inherits this environment
        monkeypatch.setenv(f"FMN_PL_WALKTHROUGH_{key}", value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["mrpc", "stsb"] and report["labels"] == ["average", "fmn", "task_arithmetic"]
    assert (out / "plots" / "scores-mrpc+stsb.png").is_file()
    shown = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert shown, "the plot is displayed"
