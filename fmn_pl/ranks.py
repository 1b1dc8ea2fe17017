"""Where the pipeline runs: global ranks under an external launcher (srun, torchrun), which stages run on
every rank, a stage's output sent to its log, and the CPU time a stage used."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from fmn_pl.stages import Stage


# ---------------------------------------------------------------------------------------------- running

# Variables by which a launcher (torchrun, srun, Lightning's own) tells a process its rank; a stage that
# runs on rank 0 alone under such a launcher gets an environment without them.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_JOB_NAME",
)


def is_global_zero() -> bool:
    """True unless a launcher (torchrun, srun, Lightning's own) says this process is another rank."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def global_rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"


def external_world() -> int:
    """Processes started by an external launcher (torchrun's WORLD_SIZE, srun's SLURM_NTASKS), else 1."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_STEP_ID") is not None:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def on_every_rank(stage: Stage) -> bool:
    """True for a stage that needs a launcher (DDP, several devices or nodes): every rank runs it."""
    return stage.launch is not None and not stage.launch.in_process()


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send what this process prints (stdout, stderr, and the stream log handlers, e.g. Lightning's and
    transformers', which hold the stream they were made with) to `log` while the block runs. Python-level: no
    file descriptors are swapped, so what C code writes to them (rare) stays on the console."""
    import logging

    log.parent.mkdir(parents=True, exist_ok=True)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = [
        h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers if type(h) is logging.StreamHandler
    ]
    streams = [h.stream for h in handlers]  # swapped as they are (setStream would flush them: one may be closed)
    with open(log, "a", buffering=1) as f:
        for h in handlers:
            h.stream = f
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            for h, stream in zip(handlers, streams):
                h.stream = stream


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return ""


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system, all threads; a rank that Lightning
    launched counts too): with the load average, it tells a stage's cost on shared cores from its wall time."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
