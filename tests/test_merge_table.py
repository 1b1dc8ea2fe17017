"""research/merge_table.py end to end on two tiny checkpoints: one `fmn-pl merge` per row, a table whose
normalized column is recomputed here from each report's per-task scores, and a rerun that reuses reports."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import load_benchmark


def test_merge_table(make_checkpoint, tiny_glue: Path, tmp_path: Path, capsys) -> None:
    mt = load_benchmark("merge_table", "research")
    ckpts = [str(make_checkpoint(t, seed=i + 1, name=t)) for i, t in enumerate(["rte", "mrpc"])]
    out = tmp_path / "table"
    argv = [
        "--checkpoints",
        *ckpts,
        "--out",
        str(out),
        "--rows",
        "average",
        "task_arithmetic",
        "--max_eval_samples",
        "16",
        "--data_dir",
        str(tiny_glue),
    ]
    doc = mt.main(argv)
    assert json.loads(capsys.readouterr().out) == doc
    lines = [
        [c.strip() for c in line.strip("|").split("|")] for line in (out / "table.md").read_text().splitlines()[2:]
    ]
    assert [r[0] for r in lines] == ["individual", "average", "task_arithmetic"]  # the average run is the baseline row
    rows = {r[0]: r[1:] for r in lines}
    for label in ("average", "task_arithmetic"):
        report = json.loads((out / label / "report.json").read_text())
        results = report["results"]
        normalized = sum(results[t]["merged"]["score"] / results[t]["individual"]["score"] for t in results) / 2
        assert abs(doc["rows"][label]["summary"]["normalized"] - normalized) < 1e-9
        assert report["options"] == doc["rows"][label]["options"]
        assert doc["rows"][label]["command_s"] >= report["timings"]["total_s"]
        assert doc["rows"][label]["peak_rss_mb"] > 0
    assert rows["task_arithmetic"][2] == f"{100 * doc['rows']['task_arithmetic']['summary']['normalized']:.1f}"
    # The plain-average baseline each report carries equals the `average` method's merged scores.
    baseline = json.loads((out / "task_arithmetic" / "report.json").read_text())["results"]
    assert all(abs(baseline[t]["average"]["score"] - doc["rows"]["average"]["scores"][t]) < 1e-6 for t in baseline)
    assert rows["individual"][:2] == [f"{100 * baseline[t]['individual']['score']:.1f}" for t in ("rte", "mrpc")]
    stamp = (out / "task_arithmetic" / "report.json").stat().st_mtime_ns
    mt.main(argv)
    assert (out / "task_arithmetic" / "report.json").stat().st_mtime_ns == stamp  # reused, not rerun
