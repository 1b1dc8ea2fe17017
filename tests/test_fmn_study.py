"""research/fmn_study.py end to end on tiny random checkpoints (3 tasks, a tiny grid): table rows, wins and
means against a recomputation from study.json, the selection rule, one cell against a saved `fmn-pl merge`,
views that leave the checkpoints untouched, and a resume that recomputes nothing (or only an added option);
plus `merge_body` against the body `run_merge` saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from fmn_pl.checkpoint import read_metadata
from fmn_pl.files import write_json
from fmn_pl.merging.fmn import FMN, REFERENCE
from tests.conftest import load_benchmark

TASKS = ["rte", "mrpc", "stsb"]
GRID = {
    "mask_fisher": {"a": {"num_examples": 16}, "b": {"num_examples": 16, "aggregation": "per_batch"}},
    "full_fisher": {"f": {"num_examples": 8}},
    "merges": [
        {"label": "fmn none/reference", "method": "fmn", "options": {**REFERENCE}, "artifact": "a"},
        {
            "label": "fmn mean/per_node",
            "method": "fmn",
            "options": {**REFERENCE, "normalize": "mean", "broadcast": "per_node"},
        },
        {"label": "fmn [b]", "method": "fmn", "artifact": "b"},  # the defaults: s chosen on the holdout rows
        {"label": "task_arithmetic", "method": "task_arithmetic", "options": {"scaling": None, "scalings": [0.5, 1.0]}},
        {"label": "fisher", "method": "fisher", "artifact": "f"},
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoints(make_checkpoint, tmp_path: Path) -> Path:
    """<tmp>/ckpts/<task>/ for TASKS, each recording 16 held-out training rows."""
    for i, task in enumerate(TASKS):
        path = make_checkpoint(task, seed=i + 1, name=task)
        meta = read_metadata(path)
        write_json(path / "fmn_pl.json", {**meta, "data": {"holdout_samples": 16}})
    return tmp_path


def table(md: str, heading: str) -> dict[str, list[str]]:
    """{option: cells} of the Markdown table under `heading`."""
    block = md.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_study_end_to_end(checkpoints: Path, tiny_glue: Path, tmp_path: Path, capsys) -> None:
    study = load_benchmark("fmn_study", "research")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "study"
    argv = [
        "--checkpoints_dir",
        str(checkpoints),
        "--tasks",
        *TASKS,
        "--out",
        str(out),
        "--data_dir",
        str(tiny_glue),
        "--grid",
        str(grid),
        "--accelerator",
        "cpu",
        "--batch_size",
        "16",
    ]
    report = study.main(argv)
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "study.json").read_text())
    assert printed == saved
    assert (out / "study.png").stat().st_size > 0
    labels = ["individual", "average", *(m["label"] for m in GRID["merges"])]
    pairs = ["rte+mrpc", "rte+stsb", "mrpc+stsb"]
    assert report["computed"] == {"cells": 3 + 3 * (1 + len(GRID["merges"])), "artifacts": 3 * 3}

    # every (option, pair, task) cell once, gains over that cell's average
    cells = saved["cells"]
    assert sorted((c["label"], c["combo"], c["task"]) for c in cells) == sorted(
        (lb, p, t) for lb in labels for p in pairs for t in p.split("+")
    )
    avg = {(c["combo"], c["task"]): c for c in cells if c["label"] == "average"}
    for c in cells:
        for split in ("validation", "holdout"):
            assert c[f"average_{split}"] == avg[(c["combo"], c["task"])][split]
            assert c[f"gain_{split}"] == pytest.approx(c[split] - c[f"average_{split}"])
    individual = {(c["combo"], c["task"]): c["validation"] for c in cells if c["label"] == "individual"}
    assert individual[("rte+mrpc", "rte")] == individual[("rte+stsb", "rte")]  # computed once per task

    # the table: one row per option; means and wins recomputed from the cells
    md = (out / "study.md").read_text()
    rows = table(md, "## Pairs (6 cells)")
    assert list(rows) == labels
    for label in labels:
        mine = [c for c in cells if c["label"] == label]
        for split, (score_col, gain_col, wins_col) in {"validation": (1, 2, 3), "holdout": (4, 5, 6)}.items():
            wins = sum(c[split] > c[f"average_{split}"] for c in mine)
            assert rows[label][wins_col] == f"{wins}/6", (label, split)
            assert float(rows[label][gain_col]) == pytest.approx(
                sum(c[split] - c[f"average_{split}"] for c in mine) / 6, abs=0.006
            )
            assert float(rows[label][score_col]) == pytest.approx(sum(c[split] for c in mine) / 6, abs=0.006)
    assert rows["average"][3] == "0/6"
    per_cell = table(md, "## Validation gain per pair cell")
    assert len(per_cell["fmn [b]"]) == 6

    # selection: the FMN row with the best mean holdout gain; its validation numbers reported
    fmn = [m["label"] for m in GRID["merges"] if m["method"] == "fmn"]
    hold = {lb: sum(c["gain_holdout"] for c in cells if c["label"] == lb) for lb in fmn}
    chosen = max(fmn, key=lambda lb: hold[lb])
    assert saved["selection"]["chosen"] == chosen
    assert saved["selection"]["validation"] == saved["summary"]["pairs"][chosen]["validation"]
    assert saved["selection"]["options"]["broadcast"] in ("reference", "per_node")
    assert f"**{chosen}**" in md

    # costs: each artifact's seconds and size; task arithmetic's chosen lambda in the notes
    costs = saved["costs"]["artifacts"]
    assert set(costs) == {"a", "b", "f"} and set(costs["a"]) == set(TASKS)
    assert all(c["seconds"] > 0 and c["bytes"] > 0 for v in costs.values() for c in v.values())
    assert costs["f"]["rte"]["bytes"] > 10 * costs["a"]["rte"]["bytes"]
    ta = next(c for c in cells if c["label"] == "task_arithmetic")
    assert ta["notes"]["task_arithmetic_scaling"]["chosen"] in (0.5, 1.0)

    # views: hard links of the checkpoints, which get no artifact
    for task in TASKS:
        assert not any(
            (checkpoints / task / f).exists() for f in ("mask_fisher.safetensors", "full_fisher.safetensors")
        )
        assert os.path.samefile(
            checkpoints / task / "model.safetensors", out / "views" / "a" / task / "model.safetensors"
        )
        assert (out / "views" / "f" / task / "full_fisher.safetensors").is_file()

    # one cell against the saved model of `fmn-pl merge` on the same view
    from fmn_pl.merge import run_merge
    from fmn_pl.merge_config import MergeConfig
    from fmn_pl.options import EvalOptions

    views = [str(out / "views" / "a" / t) for t in ("rte", "stsb")]
    merged = run_merge(
        MergeConfig(
            views,
            FMN(**{**REFERENCE, "normalize": "mean", "broadcast": "per_node"}),
            str(tmp_path / "merged"),
            data_dir=str(tiny_glue),
            batch_size=16,
            eval=EvalOptions(cache=False, compare_average=False),
            accelerator="cpu",
            progress=False,
        )
    )
    for task in ("rte", "stsb"):
        cell = next(
            c for c in cells if c["label"] == "fmn mean/per_node" and c["combo"] == "rte+stsb" and c["task"] == task
        )
        score = merged.results[task].score("merged")
        assert score is not None and cell["validation"] == pytest.approx(100 * score, abs=1e-4)

    # resume: nothing recomputed, no cell rewritten; an added option (and the 3-task merge) computes only new cells
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    again = study.main(argv)
    assert again["computed"] == {"cells": 0, "artifacts": 0}
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps
    assert [c for c in again["cells"]] == cells
    grid.write_text(
        yaml.safe_dump(
            {
                **GRID,
                "merges": [
                    *GRID["merges"],
                    {
                        "label": "fmn layer/reference",
                        "method": "fmn",
                        "options": {**REFERENCE, "normalize": "layer"},
                        "artifact": "b",
                    },
                ],
            }
        )
    )
    more = study.main([*argv, "--combos", "all"])
    assert more["computed"] == {"cells": 3 + 1 + len(GRID["merges"]) + 1, "artifacts": 0}
    md = (out / "study.md").read_text()
    assert list(table(md, "## Pairs (6 cells)"))[-1] == "fmn layer/reference"
    assert list(table(md, "## All tasks merged (3 cells)")) == [*labels, "fmn layer/reference"]
    assert more["summary"]["pairs"]["fmn [b]"] == saved["summary"]["pairs"]["fmn [b]"]
    assert study.main([*argv, "--merges", "fmn [b]", "task_*"])["summary"]["pairs"].keys() == {
        "individual",
        "average",
        "fmn [b]",
        "task_arithmetic",
    }
    assert list(table(md, "## Artifact cost (per task)")) == ["a", "b", "f"]  # read back, none recomputed


def test_study_refuses_bad_inputs(checkpoints: Path, tiny_glue: Path, tmp_path: Path) -> None:
    study = load_benchmark("fmn_study", "research")
    base = [
        "--checkpoints_dir",
        str(checkpoints),
        "--tasks",
        "rte",
        "mrpc",
        "--out",
        str(tmp_path / "s"),
        "--data_dir",
        str(tiny_glue),
    ]
    grid = tmp_path / "grid.yaml"
    for bad, match in (
        ({"merges": [{"label": "x", "method": "nope"}]}, "unknown method"),
        ({"merges": [{"label": "x", "method": "fmn", "artifact": "zz"}]}, "needs a mask_fisher variant"),
        ({"merges": [{"label": "x", "method": "fmn", "options": {"normalize": "odd"}}]}, "bad options"),
        ({"merges": [{"label": "x", "method": "tall"}]}, "its own body"),
        ({"colour": 1}, "expected a mapping"),
    ):
        grid.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=match):
            study.main([*base, "--grid", str(grid)])
    meta = read_metadata(checkpoints / "rte")
    write_json(checkpoints / "rte" / "fmn_pl.json", {**meta, "data": {"holdout_samples": 0}})
    with pytest.raises(ValueError, match="holdout_samples"):
        study.main(base)


def test_merge_body_equals_saved_merge(make_checkpoint, tiny_glue: Path, tmp_path: Path) -> None:
    """The in-memory body equals the body `run_merge` writes, including a lambda chosen on selection data."""
    from safetensors.torch import load_file

    from fmn_pl.merge import merge_body, run_merge
    from fmn_pl.merge_config import MergeConfig
    from fmn_pl.merging.task_arithmetic import TaskArithmetic
    from fmn_pl.merging.ties import Ties
    from fmn_pl.options import SelectionOptions

    a, b = make_checkpoint("rte", seed=1), make_checkpoint("mrpc", seed=2)
    for method in (Ties(scaling=0.7), TaskArithmetic(scaling=None, scalings=[0.3, 0.9])):
        notes: dict = {}
        body = merge_body(
            [a, b],
            method,
            data_dir=str(tiny_glue),
            selection=SelectionOptions(split="validation"),
            accelerator="cpu",
            notes=notes,
            log=lambda m: None,
        )
        out = tmp_path / type(method).__name__
        run_merge(
            MergeConfig(
                [str(a), str(b)],
                method,
                str(out),
                data_dir=str(tiny_glue),
                selection=SelectionOptions(split="validation"),
                evaluate=False,
                accelerator="cpu",
                progress=False,
            )
        )
        saved = load_file(out / "model.safetensors")
        assert saved.keys() == body.keys()
        for key in saved:
            assert torch.equal(saved[key], body[key]), key
    assert notes["task_arithmetic_scaling"]["chosen"] in (0.3, 0.9)


def test_pooled_selection_chooses_on_every_holdout_cell(tmp_path: Path) -> None:
    """--pool: the choice is made on this study's and another study's holdout cells together (b wins there by
    more than a wins here); the reported validation numbers stay this study's, the pooled ones beside them."""
    study = load_benchmark("fmn_study", "research")

    def cells(gains: dict[str, tuple[float, float]]) -> list[dict]:
        return [
            {
                "label": lb,
                "pair": True,
                "combo": "x+y",
                "task": t,
                "validation": v,
                "holdout": h,
                "gain_validation": v,
                "gain_holdout": h,
            }
            for lb, (v, h) in gains.items()
            for t in ("x", "y")
        ]

    here = cells({"fmn a": (1.0, 2.0), "fmn b": (3.0, 1.0)})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cells": cells({"fmn a": (0.0, 0.0), "fmn b": (-1.0, 4.0)})}))
    merges = [{"label": lb, "method": "fmn", "resolved": {}, "artifact": None} for lb in ("fmn a", "fmn b")]
    summary = study.summarize(here, ["fmn a", "fmn b"])
    assert study.select(summary, merges)["chosen"] == "fmn a"  # this study alone: a (holdout 2.0 > 1.0)
    pooled = study.pooled_summary(here, ["fmn a", "fmn b"], [str(other)])
    assert pooled["fmn b"]["holdout"] == {"mean_score": 2.5, "mean_gain": 2.5, "wins": 4, "cells": 4}
    sel = study.select(summary, merges, pooled)
    assert sel["chosen"] == "fmn b" and sel["selected_on"] == "holdout, pooled"
    assert sel["validation"] == summary["fmn b"]["validation"]  # reported: this study's cells
    assert sel["pooled_validation"]["mean_gain"] == pytest.approx(1.0) and sel["pooled_validation"]["cells"] == 4
    assert study.pooled_summary(here, ["fmn a"], None) is None
