"""The typed combined report: every pipeline report.json under runs/ reads into a `PipelineReport` and writes back
byte-identical (key order kept); a mistyped one fails with one line naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmn_pl.pipeline_results import PipelineReport, PipelineReportError

ROOT = Path(__file__).resolve().parents[1]


def test_every_pipeline_report_under_runs_round_trips() -> None:
    """The committed studies' combined reports (git-ignored: skipped where runs/ is absent)."""
    files = sorted(p for p in (ROOT / "runs").glob("**/report.json") if (p.parent / "pipeline.yaml").is_file())
    if not files:
        pytest.skip("no pipeline report under runs/ (the runs are not in git)")
    for path in files:
        report = PipelineReport.read(path)
        assert json.dumps(report.to_dict(), indent=2) + "\n" == path.read_text(), path
        assert report.extra == {} and set(report.summary) == set(report.combinations)
        assert {r.column for r in report.results} <= {"constant", "individual", *report.labels}


def test_a_mistyped_report_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"model": "m", "stages": [{"stage": "fit/rte", "kind": "fit", "wall_s": "slow"}]}))
    with pytest.raises(PipelineReportError) as e:
        PipelineReport.read(path)
    assert str(e.value).startswith(f"{path}: key 'stages[0].wall_s' must be float | None")
