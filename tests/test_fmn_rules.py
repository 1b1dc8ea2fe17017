"""research/fmn_rules.py on tiny random checkpoints: each rule's choice per pair, and the validation score of
that choice, equal what `fmn-pl merge` returns with the rule's options; gains, wins and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmn_pl.checkpoint import read_metadata
from fmn_pl.files import write_json
from fmn_pl.merge_cli import main as merge_main
from tests.conftest import load_benchmark
from tests.test_merge_cli import add_fisher

TASKS = ["rte", "stsb", "mrpc"]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_rules_choose_what_the_merge_chooses(make_checkpoint, tiny_glue: Path, tmp_path: Path, capsys) -> None:
    for i, task in enumerate(TASKS):
        path = make_checkpoint(task, seed=i + 1, name=task, noise=0.5)
        write_json(path / "fmn_pl.json", {**read_metadata(path), "data": {"holdout_samples": 16}})
        add_fisher(path, i)
    ckdir = path.parent
    rules = load_benchmark("fmn_rules", "research")
    out = tmp_path / "rules"
    argv = [
        "--checkpoints_dir",
        str(ckdir),
        "--tasks",
        *TASKS,
        "--out",
        str(out),
        "--data_dir",
        str(tiny_glue),
        "--max_eval_samples",
        "16",
        "--accelerator",
        "cpu",
        "--scalings",
        "1",
        "3",
        "--normalizes",
        "none",
        "mean",
        "--powers",
        "0.25",
        "0",
    ]
    report = rules.main(argv)
    assert json.loads(capsys.readouterr().out) == json.loads((out / "rules.json").read_text()) == report
    assert len(list((out / "cells").glob("*.json"))) == 3 + 3 * (1 + 3 * 2)  # none p0.25, mean p0.25, p0 (once)
    by_label = {r["label"]: r for r in report["rules"]}
    assert list(by_label) == [
        f"{c}, s by {o}"
        for c in (
            "normalize {none, mean}, p from {0.25, 0}",
            "normalize {none, mean}, p 0.25 alone",
            "p 0 alone",
            "p from {0.25, 0}",
            "p 0.25 alone",
            "normalize {mean}, p from {0.25, 0}",
            "normalize {mean}, p 0.25 alone",
        )
        for o in ("mean", "worst_gain")
    ]

    for k, label in enumerate(
        [
            "normalize {none, mean}, p from {0.25, 0}, s by mean",
            "p from {0.25, 0}, s by mean",
            "p from {0.25, 0}, s by worst_gain",
            "p 0.25 alone, s by worst_gain",
        ]
    ):
        rule = by_label[label]
        options = [
            f"--method.{name}={value if isinstance(value, str) else json.dumps(value)}"
            for name, value in rule["options"].items()
        ]
        for n, pair in enumerate(["rte+stsb", "rte+mrpc", "stsb+mrpc"]):
            cks = [str(ckdir / t) for t in pair.split("+")]
            merged = merge_main(
                [
                    "--method",
                    "fmn",
                    "--checkpoints",
                    *cks,
                    *options,
                    "--method.scalings",
                    "[1, 3]",
                    "--output",
                    str(tmp_path / f"m{k}_{n}"),
                    "--data_dir",
                    str(tiny_glue),
                    "--eval.max_samples",
                    "16",
                    "--progress",
                    "false",
                    "--selection.precision",
                    "32",
                    "--selection.screen",
                    "null",
                ]
            )  # the rules' exact search
            assert merged is not None
            notes = merged.notes
            p = notes["fmn_power"]["chosen"] if "fmn_power" in notes else rule["options"]["power"]
            norm = notes["fmn_normalize"]["chosen"] if "fmn_normalize" in notes else rule["options"]["normalize"]
            assert rule["chosen"][pair] == rules.candidate(p, notes["fmn_scaling"]["chosen"], norm), (label, pair)
            if rule["options"]["normalize"] is None:  # the report names the chosen normalization
                assert (
                    f"fmn normalize {norm} (of ['none', 'mean'])" in (tmp_path / f"m{k}_{n}" / "report.md").read_text()
                )
            cell = json.loads((out / "cells" / f"{pair}__{rule['chosen'][pair]}.json").read_text())["scores"]
            for task, result in merged.results.items():
                score = result.score("merged")
                assert score is not None and 100 * score == pytest.approx(cell[task]["validation"], abs=1e-4)

    # gains and wins recomputed from the cells
    rule = by_label["p from {0.25, 0}, s by mean"]
    cells = {p.stem: json.loads(p.read_text())["scores"] for p in (out / "cells").glob("*.json")}
    gains = [
        cells[f"{pair}__{c}"][t]["validation"] - cells[f"{pair}__average"][t]["validation"]
        for pair, c in rule["chosen"].items()
        for t in pair.split("+")
    ]
    assert rule["gains"]["validation"] == pytest.approx(gains)
    assert rule["summary"]["validation"]["wins"] == sum(g > 0 for g in gains)
    assert "| p from {0.25, 0}, s by mean |" in (out / "rules.md").read_text()

    # --choose_on validation: the same cells, each rule's choice by its objective on validation (a slow argmax
    # here), counted on both splits, beside rules.json, which it leaves as it was
    before = (out / "rules.json").read_text()
    swapped = {r["label"]: r for r in rules.main([*argv, "--choose_on", "validation"])["rules"]}
    assert (out / "rules.json").read_text() == before
    assert json.loads((out / "rules.choose_on_validation.json").read_text())["choose_on"] == "validation"
    assert "choices on the validation split" in (out / "rules.choose_on_validation.md").read_text()
    for label in ("p from {0.25, 0}, s by mean", "p from {0.25, 0}, s by worst_gain"):
        for pair, chosen in swapped[label]["chosen"].items():
            val = {
                c: {t: v["validation"] for t, v in cells[f"{pair}__{c}"].items()} for c in swapped[label]["candidates"]
            }
            ref = val["p0_s1"]
            key = (
                (lambda c: sum(val[c].values()))
                if label.endswith("mean")
                else (lambda c: (min(val[c][t] - ref[t] for t in ref), sum(val[c].values())))
            )
            assert key(chosen) == max(key(c) for c in val), (label, pair)
            assert chosen == next(c for c in val if key(c) == key(chosen))  # ties: the first candidate, as the merge
        assert swapped[label]["gains"]["holdout"] == pytest.approx(
            [
                cells[f"{pair}__{c}"][t]["holdout"] - cells[f"{pair}__average"][t]["holdout"]
                for pair, c in swapped[label]["chosen"].items()
                for t in pair.split("+")
            ]
        )

    # a rerun scores nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert rules.main(argv)["rules"] == report["rules"]
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    # --pairs: a subset of the pairs (cached here), in the tasks' order
    assert list(rules.main([*argv, "--pairs", "rte+stsb"])["rules"][0]["chosen"]) == ["rte+stsb"]
    with pytest.raises(SystemExit, match="not pairs of --tasks"):
        rules.main([*argv, "--pairs", "stsb+rte"])
    # other settings in the same folder are refused, not mixed with the cached cells
    with pytest.raises(SystemExit, match="max_eval_samples differ"):
        rules.main([*argv, "--max_eval_samples", "8"])  # the last value given wins
    add_fisher(ckdir / "rte", 99)  # a Fisher computed again: the cached cells are stale
    with pytest.raises(SystemExit, match="mask_fisher differ"):
        rules.main(argv)
