"""Progress inside a pipeline stage: a tiny fine-tuning stage under a pseudo-terminal shows one line updated in place
(epoch, step, loss, ETA) that is gone before the stage's last line; in a log the console gets no progress line
from a stage shorter than 30 s and at most one per 30 s from a longer one; the stage log keeps Lightning's output."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fmn_pl import progress

TINY = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "tiny.yaml"


def pipeline_command(tmp_path: Path, base: Path, data: Path) -> list[str]:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["fit"] |= {"max_epochs": 2, "batch_size": 4}  # 24 steps
    tmp_path.mkdir()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return [
        sys.executable,
        "-m",
        "fmn_pl.cli",
        "pipeline",
        "--config",
        str(config),
        f"--model={base}",
        f"--data_dir={data}",
        f"--output={tmp_path / 'run'}",
        "--only=fit/rte",
    ]


def run_in_pty(cmd: list[str]) -> str:
    """Run `cmd` with a pseudo-terminal as its stdout and stderr; what the terminal received."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.slow
def test_stage_progress_on_a_terminal_and_in_a_log(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> None:
    cmd = pipeline_command(tmp_path / "tty", tiny_base("bert"), tiny_glue)
    shown = run_in_pty(cmd)
    assert "[1/7] fit/rte: running (first run); log: " in shown
    updates = [u for u in shown.split("\r\x1b[K") if u.startswith("[1/7] fit/rte: epoch ")]
    assert updates, shown
    line = r"\[1/7\] fit/rte: epoch [12]/2, step \d+/24, loss \d\.\d{4}, ETA \d+:\d\d"
    assert all(re.fullmatch(line, u) for u in updates), updates
    assert "\r\x1b[K[1/7] fit/rte: done in " in shown.replace("\r\n", "\n")  # the progress line is cleared first
    log = (tmp_path / "tty" / "run" / "logs" / "fit__rte.log").read_text()
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in log and "epoch 1/2" not in log

    # In a log: no terminal codes, and a progress line at most every 30 s (none from a shorter stage).
    cmd = pipeline_command(tmp_path / "log", tiny_base("bert"), tiny_glue)
    with open(tmp_path / "console.log", "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    console = (tmp_path / "console.log").read_text()
    assert "\r" not in console and "\x1b" not in console
    wall = json.loads((tmp_path / "log" / "run" / "stamps" / "fit__rte.json").read_text())["wall_s"]
    lines = [x for x in console.splitlines() if x.startswith("[1/7] fit/rte: epoch ")]
    assert len(lines) <= wall // 30 and all(re.fullmatch(line, x) for x in lines), console
    assert "[1/7] fit/rte: running (first run)" in console and "[1/7] fit/rte: done in " in console


def test_at_most_one_line_per_interval_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    console, stage_out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", console)
    assert progress.stage_line("[1/3] fit/rte", "running (first run)") == "[1/3] fit/rte: running (first run)"
    monkeypatch.setattr(sys, "stdout", stage_out)  # the stage runs: its output goes to its log
    for t in range(0, 95, 5):  # a show every 5 s for 95 s
        clock[0] = 1000.0 + t
        progress.show(f"step {t}")
    assert console.getvalue().splitlines() == [
        "[1/3] fit/rte: step 30",
        "[1/3] fit/rte: step 60",
        "[1/3] fit/rte: step 90",
    ]
    assert stage_out.getvalue() == ""
    monkeypatch.setattr(sys, "stdout", console)  # the stage is over: nothing more is shown
    clock[0] += 60
    progress.show("late")
    assert "late" not in console.getvalue()
