"""The published figures regenerate: docs/results.md and docs/demo/report.md are exactly what their committed
bundles (docs/evidence/) give, and every figure the README quotes from them is in them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_documents_regenerate_from_committed_bundles() -> None:
    """The command the pages name, as a user runs it: `--check` compares and writes nothing."""
    run = subprocess.run(
        [sys.executable, "research/results.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr


def test_readme_quotes_only_regenerated_figures() -> None:
    """Every number the README's Results and demo paragraphs print in bold is in docs/results.md or the demo's
    report (so it came from a committed bundle)."""
    readme = (ROOT / "README.md").read_text()
    sources = (ROOT / "docs" / "results.md").read_text() + (ROOT / "docs" / "demo" / "report.md").read_text()
    quoted = re.findall(r"\*\*([+-]?\d+\.\d \[[+-]?\d+\.\d, [+-]?\d+\.\d\])\*\*", readme)
    assert quoted, "the README quotes no interval from the results"
    for figure in quoted:
        assert figure in sources, f"README quotes {figure}, which no committed result holds"
