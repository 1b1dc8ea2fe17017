"""Counts and sizes are validated where they are taken: a negative cap would silently mean "all but N", a 0 batch
size would fall back to the default; each is one error naming the option, before any work. An empty split is
an error naming the task, split and file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from fmn_pl.cli import main, shell
from fmn_pl.data import GLUEDataModule


@pytest.mark.parametrize(
    "option, value",
    [
        ("max_train_samples", -5),
        ("max_train_samples", 0),
        ("batch_size", 0),
        ("max_eval_samples", -3),
        ("holdout_samples", -1),
        ("max_length", 0),
    ],
)
def test_data_module_counts(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"data\.{option} must be an integer >= [01]"):
        GLUEDataModule(task="rte", **{option: value})


def test_fisher_and_merge_counts(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    for flags, name in ((["--num_examples=-5"], "num_examples"), (["--batch_size=0"], "batch_size")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            main(["fisher", f"--checkpoint={cks[0]}", f"--data_dir={tiny_glue}", *flags])
    for flags, name in (
        (["--eval.max_samples=-3"], "eval.max_samples"),
        (["--batch_size=0"], "batch_size"),
        (["--selection.samples=0"], "selection.samples"),
    ):
        with pytest.raises(SystemExit, match="2"):
            shell(
                [
                    "merge",
                    "--method=average",
                    "--checkpoints",
                    *map(str, cks),
                    f"--output={tmp_path / 'o'}",
                    f"--data_dir={tiny_glue}",
                    *flags,
                ]
            )
        assert f"fmn-pl merge: error: {name} must be" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_empty_split_is_named(tiny_glue: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "rte").mkdir()
    table = pq.read_table(tiny_glue / "rte" / "validation.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "rte" / "validation.parquet")
    pq.write_table(pq.read_table(tiny_glue / "rte" / "train.parquet"), tmp_path / "rte" / "train.parquet")
    dm = GLUEDataModule(task="rte", data_dir=str(tmp_path), tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match=r"split 'validation' of task 'rte' has no rows \(.*validation.parquet\)"):
        dm.setup("fit")


def test_one_line_from_the_shell(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", "fisher", f"--checkpoint={tmp_path}", "--num_examples=-5"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fmn-pl fisher: error: num_examples must be an integer >= 1 (or null where that means all), got -5"
    )


def test_a_cap_beyond_the_rows_is_said(tiny_glue: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    dm = GLUEDataModule(task="rte", data_dir=str(tiny_glue), tokenizer=str(tokenizer_dir), max_train_samples=1000)
    dm.setup("fit")
    assert dm.num_train_examples == 64
    assert "note: rte train: 1000 examples asked for, 64 available; using all 64" in capsys.readouterr().err
