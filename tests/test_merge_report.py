"""The typed merge report: every report.json reads into a `MergeReport` and writes back byte-identical (key order,
absent keys and unknown keys kept), a fresh merge's too; a bad file fails with one line naming it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from fmn_pl.merge_report import CheckpointEntry, MergeReport, ReportError, TaskResult

ROOT = Path(__file__).resolve().parents[1]


def as_json(data: Any) -> str:
    """The text `fmn_pl.files.write_json` writes."""
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def assert_round_trip(path: Path) -> MergeReport:
    """`path` read as a report and written back: the same JSON text, key order included."""
    data = json.loads(path.read_text())
    report = MergeReport.read(path)
    assert as_json(report.to_dict()) == as_json(data), path
    return report


def test_every_report_under_runs_round_trips() -> None:
    """The merges of the committed studies' runs (git-ignored: skipped where runs/ is absent)."""
    files = sorted((ROOT / "runs").glob("**/merges/*/*/report.json"))
    if not files:
        pytest.skip("no merge report under runs/ (the runs are not in git)")
    for path in files:
        report = assert_round_trip(path)
        assert list(report.results) == report.tasks or not report.results


def test_a_fresh_merge_round_trips(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    """A merge that chose its scaling and was scored, and one that was not scored: each reads back as written."""
    from fmn_pl.merge_cli import main

    cks = [str(make_checkpoint(t, seed=s, noise=0.05)) for s, t in enumerate(["rte", "stsb"])]
    common = ["--data_dir", str(tiny_glue), "--eval.max_samples", "16", "--progress", "false"]
    out = tmp_path / "ta"
    written = main(
        ["--method", "task_arithmetic", "--method.scalings", "[0.5, 1.0]", "--selection.samples", "8"]
        + ["--checkpoints", *cks, "--output", str(out), "--save_model", "false", *common]
    )
    report = assert_round_trip(out / "report.json")
    assert isinstance(written, MergeReport) and report == written  # what main returns is what it wrote
    assert report.to_dict() == written.to_dict() and report.extra == {}
    assert report.name == "task_arithmetic" and report.tasks == ["rte", "stsb"]
    assert [c.task for c in report.checkpoints] == ["rte", "stsb"] and report.checkpoints[0].fingerprint
    assert report.selection is not None and report.selection.evaluations == 2
    assert report.chosen()["task_arithmetic_scaling"].chosen in (0.5, 1.0)
    assert report.evaluation is not None and report.evaluation.max_samples == 16
    stsb = report.results["stsb"]
    assert stsb.mse("merged") is not None and stsb.metric_names() == ["pearson", "spearman"]
    assert stsb.score("merged") == stsb.merged["score"]  # type: ignore[index]
    assert report.summary is not None and report.summary.merged_score is not None

    bare = tmp_path / "avg"
    main(["--method", "average", "--checkpoints", *cks, "--output", str(bare), "--evaluate", "false", *common])
    report = assert_round_trip(bare / "report.json")
    assert report.results == {} and report.summary is None and report.selection is None
    assert not {"results", "summary", "evaluation", "selection"} & set(report.to_dict())
    assert "Not evaluated." in (bare / "report.md").read_text()


def test_unknown_keys_and_the_order_read_are_kept() -> None:
    """A key this version does not know (a script's own, a nested one) stays where it was, and so does a known key
    written in another order."""
    result = {"merged": None, "individual": {"score": 0.5}, "average": None, "normalized": None}
    data = {
        "tasks": ["rte"],
        "command_s": 3.5,
        "method": "ties",
        "checkpoints": [{"task": "rte", "path": "ck", "fingerprint": "ab", "shard": 1}],
        "results": {"rte": {**result, "normalized_average": None, "note": "x"}},
    }
    report = MergeReport.from_dict(data)
    assert report.extra == {"command_s": 3.5} and report.checkpoints[0].extra == {"shard": 1}
    assert report.results["rte"].extra == {"note": "x"} and report.results["rte"].score("individual") == 0.5
    assert as_json(report.to_dict()) == as_json(data)


def test_a_report_built_here_writes_its_set_keys_in_field_order() -> None:
    """Built rather than read: the required keys and the optional ones that are set, in field order."""
    result = TaskResult(merged=None, individual=None, average=None, normalized=None, normalized_average=None)
    report = MergeReport(
        tasks=["rte"],
        method="x",
        checkpoints=[CheckpointEntry(task="rte", path="ck", fingerprint="ab")],
        results={"rte": result},
        extra={"command_s": 1.0},
    )
    out = report.to_dict()
    assert list(out) == ["method", "tasks", "checkpoints", "results", "command_s"]
    assert out["checkpoints"] == [{"task": "rte", "path": "ck", "fingerprint": "ab"}]
    assert MergeReport.from_dict(out) == report


@pytest.mark.parametrize(
    "text, says",
    [
        (None, "no merge report there"),
        ('{"method": "ties",', "is not valid JSON"),
        ("[1, 2]", "it holds a list, not an object"),
        ('{"method": "ties"}', "lacks key 'tasks'"),
        ('{"method": "ties", "tasks": [], "results": {"rte": {"merged": null}}}', "lacks key 'results.rte.individual'"),
        ('{"method": "ties", "tasks": [], "checkpoints": {}}', "key 'checkpoints' must be list[dict], got dict"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, text: str | None, says: str) -> None:
    path = tmp_path / "report.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises((FileNotFoundError, ReportError)) as e:
        MergeReport.read(tmp_path)  # the merge's folder, or the file itself
    message = str(e.value)
    assert str(path) in message and says in message and "\n" not in message


def test_reports_are_read_without_torch() -> None:
    """The report modules read reports without loading torch (a report is rendered by `fmn-pl` in milliseconds)."""
    import subprocess

    modules = "fmn_pl.merge_report, fmn_pl.pipeline_results, fmn_pl.report, fmn_pl.bundle"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
