"""Bad inputs found before any work, each one line naming the file: a checkpoint whose config disagrees with
its weights, a non-float artifact, an output that cannot be written; and temp folders a killed run left behind
are removed by the next run on the same output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from fmn_pl.artifacts import artifact_path, load_artifact, save_artifact
from fmn_pl.checkpoint import weights_fingerprint
from fmn_pl.files import atomic_dir, check_writable
from fmn_pl.module import load_model
from fmn_pl.owners import owner
from fmn_pl.tasks import get_task


def test_config_that_disagrees_with_the_weights(make_checkpoint: Callable) -> None:
    ck = make_checkpoint("rte")
    config = json.loads((ck / "config.json").read_text())
    config["num_hidden_layers"] = 1  # 2 stored
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json disagrees with the stored weights"):
        load_model(str(ck), get_task("rte"))


def test_integer_artifact_is_refused(make_checkpoint: Callable) -> None:
    ck = make_checkpoint("rte")
    meta = {"kind": "mask_fisher", "task": "rte", "fingerprint": weights_fingerprint(ck)}
    save_artifact(
        artifact_path(ck, "mask_fisher"),
        {"head": torch.ones(2, 4, dtype=torch.int64), "neuron": torch.ones(2, 37, dtype=torch.int64)},
        meta,
    )
    with pytest.raises(ValueError, match="tensor 'head' is int64; artifacts hold floating-point"):
        load_artifact(ck, "mask_fisher")


def test_unwritable_output_is_found_first(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="a-file is a file, not a folder"):
        check_writable(tmp_path / "a-file" / "out")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not writable"):
            check_writable(tmp_path / "ro" / "out")


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".out.tmp-{dead}-123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"0" * 1000)
    Path(f"{stale}.owner").write_text(json.dumps({**owner(), "pid": int(dead), "start": "1"}))
    live = tmp_path / f".out.tmp-{os.getpid()}-456"  # a run still going (this one): kept
    live.mkdir()
    Path(f"{live}.owner").write_text(json.dumps(owner()))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("done")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "f").read_text() == "done"
    assert f"removed {stale}: left by an interrupted run (process {dead} on " in capsys.readouterr().err


def test_null_text_cell_is_named(tiny_glue: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from fmn_pl.sources import read_split

    (tmp_path / "rte").mkdir()
    table = pq.read_table(tiny_glue / "rte" / "train.parquet").to_pydict()
    table["sentence2"][3] = None
    import pyarrow as pa

    pq.write_table(pa.table(table), tmp_path / "rte" / "train.parquet")
    with pytest.raises(ValueError, match=r"train.parquet: row 3: column 'sentence2' holds None, not text"):
        read_split(str(tmp_path), "rte", "train")


def test_yaml_and_option_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [fmn\n  x: : y\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (
        ["merge", "--config", str(bad)],
        ["fit", "--config", str(bad)],
        ["fit", "--model.model_name_or_path=x", "--data.max_train_samples=abc"],
    ):
        proc = subprocess.run([sys.executable, "-m", "fmn_pl.cli", *args], capture_output=True, text=True, env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "LightningCLI's args" not in line]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"fmn-pl {args[0]}: error: "), (
            proc.stderr
        )
    assert "YAML syntax error" in lines[0] or "data.max_train_samples" in lines[0]


@pytest.mark.parametrize(
    "args, hint",
    [
        (["merge", "--max_eval_samples=3"], "(max_eval_samples is now eval.max_samples, in a pipeline"),
        (["merge", "--selection_samples=3"], "(selection_samples is now selection.samples)"),
        (["pipeline", "--merge.args={selection_samples: 3}"], "(args is now typed options: merge.selection,"),
    ],
)
def test_a_renamed_option_names_its_new_name(args: list[str], hint: str) -> None:
    """Options renamed by the typed configs: the one error line says what they are called now."""
    proc = subprocess.run([sys.executable, "-m", "fmn_pl.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and hint in proc.stderr.strip().splitlines()[-1], proc.stderr
