"""A stage stopped by a cluster's SIGTERM or by Ctrl-C exits non-zero (143, 130) with one line and leaves nothing
that a rerun could take for finished: real subprocesses, signalled mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fmn_pl.cli", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV
    )


def signal_when(
    proc: subprocess.Popen, ready: Callable[[], bool], signum: int, log: Path, timeout: float = 120
) -> int | None:
    """Send `signum` once `ready()` holds (the stage is mid-work), then wait for the exit status (0: only wait
    for `ready()`, and return None)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the stage ended before it was signalled:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"the stage never got going:\n{log.read_text()[-2000:]}"
        time.sleep(0.2)
    if not signum:
        return None
    proc.send_signal(signum)
    return proc.wait(timeout=120)


def last_line(log: Path) -> str:
    return [line for line in log.read_text().splitlines() if line.strip()][-1]


def fit_args(base: Path, data: Path, root: Path, export: Path) -> list[str]:
    return [
        "fit",
        f"--model.model_name_or_path={base}",
        "--data.task=rte",
        f"--data.data_dir={data}",
        "--data.batch_size=4",
        "--trainer.max_epochs=100000",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        f"--export.dirpath={export}",
    ]


@pytest.mark.parametrize("signum, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_fit_interrupted(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path, signum: int, status: int, name: str
) -> None:
    log, export = tmp_path / "log", tmp_path / "export"
    proc = start(fit_args(tiny_base("bert"), tiny_glue, tmp_path / "root", export), log)
    hparams = lambda: any((tmp_path / "root").rglob("metrics.csv"))  # noqa: E731 - an epoch has been logged
    assert signal_when(proc, hparams, signum, log) == status
    assert f"interrupted by {name}" in last_line(log) and "Traceback" not in log.read_text()
    assert not export.exists()


def test_merge_interrupted_leaves_no_temp_folder(tmp_path: Path, make_checkpoint: Callable, tiny_glue: Path) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    log, out = tmp_path / "log", tmp_path / "merged"
    proc = start(
        [
            "merge",
            "--method=adamerging",
            "--method.steps=100000",
            "--method.batch_size=2",
            "--checkpoints",
            *map(str, cks),
            f"--output={out}",
            f"--data_dir={tiny_glue}",
            "--progress=false",
            "--selection.split=validation",
        ],
        log,
    )
    temp = lambda: any(p.name.startswith(".merged.tmp") for p in tmp_path.iterdir())  # noqa: E731
    assert signal_when(proc, temp, signal.SIGTERM, log) == 143
    assert "interrupted by SIGTERM" in last_line(log) and "Traceback" not in log.read_text()
    assert not out.exists() and not temp()


def test_pipeline_interrupted_stamps_nothing(tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path) -> None:
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "tiny.yaml").read_text())
    cfg |= {"output": str(tmp_path / "run"), "model": str(tiny_base("bert")), "data_dir": str(tiny_glue)}
    cfg["fit"] |= {"max_epochs": 100000, "batch_size": 4}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "log"
    proc = start(["pipeline", "--config", str(tmp_path / "p.yaml")], log)
    logged = lambda: any((tmp_path / "run").rglob("metrics.csv"))  # noqa: E731
    assert signal_when(proc, logged, signal.SIGTERM, log) == 143
    assert "interrupted by SIGTERM" in last_line(log)
    assert not list((tmp_path / "run" / "stamps").rglob("*.json")) if (tmp_path / "run" / "stamps").exists() else True
    assert not (tmp_path / "run" / "checkpoints" / "rte").exists()


def test_fit_sigterm_then_resume_exports_the_best_epoch_of_the_whole_run(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> None:
    """SIGTERM saves a resumable last.ckpt (the export's best epoch inside it); `--ckpt_path last` goes on, and
    the export is the best epoch over both parts of the run."""
    import json

    import yaml

    ckpts, root, export = tmp_path / "ckpts", tmp_path / "root", tmp_path / "export"
    config = tmp_path / "fit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {
                                "dirpath": str(ckpts),
                                "monitor": "val/score",
                                "mode": "max",
                                "save_top_k": 1,
                                "save_last": True,
                            },
                        }
                    ]
                }
            }
        )
    )
    args = [
        *fit_args(tiny_base("bert"), tiny_glue, root, export),
        "--config",
        str(config),
        "--model.learning_rate=1e-3",
    ]
    log = tmp_path / "log"
    two_epochs = lambda: sum(1 for _ in root.rglob("metrics.csv")) and len(scores(root)) >= 2  # noqa: E731
    assert signal_when(start(args, log), two_epochs, signal.SIGTERM, log) == 143
    assert (ckpts / "last.ckpt").is_file() and "saved" in log.read_text() and not export.exists()
    before = scores(root)
    resumed = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", *args, "--ckpt_path=last", f"--trainer.max_epochs={len(before) + 2}"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    every = scores(root)
    logs = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    assert len(logs) == 2 and min(scores(logs[-1].parent)) >= len(before) - 1  # it went on, not from epoch 0
    meta = json.loads((export / "fmn_pl.json").read_text())
    assert meta["metrics"]["val/score"] == pytest.approx(max(every.values()))
    assert meta["epoch"] == max(every, key=every.get)


def scores(root: Path) -> dict[int, float]:
    """{epoch: val/score} over every CSV log under `root` (the interrupted run and the resumed one)."""
    import csv

    out = {}
    for path in sorted(root.rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("val/score"):
                out[int(row["epoch"])] = float(row["val/score"])
    return out


def test_pipeline_fit_sigterm_then_rerun_resumes(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> None:
    """A pipeline stopped by SIGTERM mid fine-tuning leaves a resumable checkpoint, and the rerun with the same
    options goes on from it (not from epoch 0), then clears it; other options would start afresh."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "tiny.yaml").read_text())
    cfg |= {"output": str(tmp_path / "run"), "model": str(tiny_base("bert")), "data_dir": str(tiny_glue)}
    cfg["fit"] |= {"max_epochs": 40, "batch_size": 4}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    log, run = tmp_path / "log", tmp_path / "run"
    two_epochs = lambda: len(scores(run / "logs")) >= 2  # noqa: E731
    assert (
        signal_when(
            start(["pipeline", "--config", str(tmp_path / "p.yaml"), "--only", "fit/rte"], log),
            two_epochs,
            signal.SIGTERM,
            log,
        )
        == 143
    )
    saved = list((run / "resume").glob("rte-*/last.ckpt"))
    assert len(saved) == 1 and not (run / "checkpoints" / "rte").exists()
    interrupted = max(scores(run / "logs"))
    proc = subprocess.run(
        [sys.executable, "-m", "fmn_pl.cli", "pipeline", "--config", str(tmp_path / "p.yaml"), "--only", "fit/rte"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {saved[0]}" in proc.stderr
    fit_log = (run / "logs" / "fit__rte.log").read_text()
    assert "Restored all states from the checkpoint" in fit_log or "Restoring states" in fit_log, fit_log[-2000:]
    assert (run / "checkpoints" / "rte" / "fmn_pl.json").is_file() and not list((run / "resume").iterdir())
    assert max(scores(run / "logs")) == 39 and interrupted < 39


@pytest.mark.parametrize("signum, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_fisher_interrupted_writes_no_artifact(
    tmp_path: Path, make_checkpoint: Callable, tiny_glue: Path, signum: int, status: int, name: str
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "glue"
    (data / "rte").mkdir(parents=True)
    rows = pq.read_table(tiny_glue / "rte" / "train.parquet")
    pq.write_table(pa.concat_tables([rows] * 200), data / "rte" / "train.parquet")  # 12,800 rows: a long pass
    ck = make_checkpoint("rte")
    log = tmp_path / "log"
    proc = start(
        [
            "fisher",
            f"--checkpoint={ck}",
            f"--data_dir={data}",
            "--kind=full",
            "--num_examples=12800",
            "--batch_size=4",
            "--trainer.accelerator=cpu",
        ],
        log,
    )
    started = time.monotonic()
    built = lambda: "TPU available" in log.read_text() and time.monotonic() - started > 1  # noqa: E731
    assert signal_when(proc, built, 0, log) is None  # the Trainer is built: the pass starts now
    time.sleep(3)
    passing = lambda: proc.poll() is None  # noqa: E731 - still in the pass (it takes a minute)
    assert signal_when(proc, passing, signum, log) == status
    assert f"interrupted by {name}" in last_line(log) and "Traceback" not in log.read_text()
    assert not list(ck.glob("*fisher*")), list(ck.iterdir())


class SigtermAt(L.Callback):
    """Test helper (`--trainer.callbacks+=tests.test_interrupts.SigtermAt`): the process sends itself SIGTERM after
    step `batch` of epoch `epoch`, once (a marker file beside `marker` remembers), as a cluster's time limit would."""

    def __init__(self, marker: str, epoch: int = 2, batch: int = 3) -> None:
        self.marker, self.epoch, self.batch = Path(marker), epoch, batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch) and not self.marker.exists():
            self.marker.write_text("sent")
            os.kill(os.getpid(), signal.SIGTERM)


def test_fit_sigterm_in_epoch_2_then_ckpt_path_last_exports_the_uninterrupted_weights(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> None:
    """The documented resume: SIGTERM in epoch 2 (0-based) ends with one line naming the saved checkpoint; the same
    command with `--ckpt_path last` finds it beside the export and exports exactly the weights of a run never
    stopped (same seed); with no checkpoint to resume, `--ckpt_path last` is one line."""
    from safetensors.torch import load_file

    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), ENV.get("PYTHONPATH", "")])}

    def fit(export: Path, *extra: str) -> subprocess.CompletedProcess:
        args = fit_args(tiny_base("bert"), tiny_glue, tmp_path / f"root-{export.name}", export)
        args = [a for a in args if not a.startswith("--trainer.max_epochs")]
        callback = f'{{"class_path": "tests.test_interrupts.SigtermAt", "init_args": {{"marker": "{export}.sent"}}}}'
        return subprocess.run(
            [sys.executable, "-m", "fmn_pl.cli", *args, "--trainer.max_epochs=4", "--model.learning_rate=1e-3",
             "--export.select=last", f"--trainer.callbacks=[{callback}]", *extra],
            capture_output=True, text=True, env=env, cwd=tmp_path,
        )  # fmt: skip

    whole = tmp_path / "whole"
    (tmp_path / "whole.sent").write_text("never")  # this run is not stopped
    assert fit(whole).returncode == 0
    nothing = fit(tmp_path / "none", "--ckpt_path=last")  # no marker, but nothing saved yet: refused first
    lines = [line for line in nothing.stderr.splitlines() if line.strip()]
    assert nothing.returncode == 2 and len(lines) == 1 and "--ckpt_path last: no interrupted fit" in lines[0], lines
    stopped = tmp_path / "stopped"
    first = fit(stopped)
    assert first.returncode == 143, first.stderr[-2000:]
    resume = tmp_path / ".stopped.resume" / "last.ckpt"
    last = [line for line in first.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("fmn-pl: interrupted by SIGTERM") and f"saved {resume}" in last, last
    assert "--ckpt_path last" in last and "run it again" not in first.stderr and not stopped.exists()
    second = fit(stopped, "--ckpt_path=last")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming from {resume}" in second.stderr and not resume.parent.exists()
    a, b = load_file(whole / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((whole / "fmn_pl.json").read_text())["metrics"]
        == json.loads((stopped / "fmn_pl.json").read_text())["metrics"]
    )
