"""The README as a new user runs it: the demo, a merge of two of its checkpoints with another method, and the
merged model loaded in Python. The commands are read from README.md, not copied here; the test only shrinks
the demo (extra pipeline options, which `scripts/demo.sh` passes on) and points `runs/demo` at a temp folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_shared

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.real, pytest.mark.slow, requires_shared]

# The demo at smoke-test size: same tasks, stages and methods, a few dozen rows each.
SMALL = [
    "--fit.max_train_samples=48",
    "--fit.max_epochs=1",
    "--fit.per_task={}",
    "--fit.max_eval_samples=32",
    "--fit.holdout_samples=16",
    "--fisher.mask_fisher.num_examples=16",
    "--fisher.full_fisher.num_examples=4",
    "--merge.eval.max_samples=32",
    "--merge.selection.samples=16",
]


def blocks(lang: str) -> list[str]:
    """The README's fenced code blocks in `lang`."""
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def commands(block: str) -> list[str]:
    """A bash block's commands: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n\s*", "", block)
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_demo_merge_and_load(tmp_path: Path) -> None:
    quick = next(b for b in blocks("bash") if "scripts/demo.sh" in b)
    demo = next(c for c in commands(quick) if "scripts/demo.sh" in c)
    merge = next(c for b in blocks("bash") for c in commands(b) if c.startswith("fmn-pl merge") and "runs/demo" in c)
    load = next(b for b in blocks("python") if "runs/demo" in b)
    api = next(b for b in blocks("python") if "run_merge(" in b)
    out = tmp_path / "demo"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # fmn-pl and python of this environment
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": path}

    def run(cmd: str) -> str:
        cmd = cmd.replace("runs/demo", str(out))
        proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    printed = run(f"{demo} --output runs/demo {shlex.join(SMALL)}")
    assert (out / "report.md").is_file() and ": up to date (" not in printed  # every stage ran
    run(merge)
    target = Path(re.search(r"--output (\S+)", merge).group(1).replace("runs/demo", str(out)))
    assert (target / "report.md").is_file()
    assert sorted(p.name for p in target.iterdir() if (p / "config.json").is_file()) == ["sst2", "stsb"]
    printed = run(f"python - <<'PY'\n{load}PY")
    probs = [float(x) for x in re.search(r"tensor\(\[\[(.*?)\]\]", printed).group(1).split(",")]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-3, printed
    score, chosen = run(f"python - <<'PY'\n{api}PY").split()[-2:]  # the typed API: the same merge as the CLI's
    assert -1 <= float(score) <= 1 and 0 < float(chosen) <= 1
