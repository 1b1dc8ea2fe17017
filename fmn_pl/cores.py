"""Thread settings for shared cores, set once where every command starts (`fmn_pl.cli.main`) before torch loads:
OpenMP threads that sleep rather than spin while they wait (a spinning thread steals a core a neighbour needs),
as many as the CPUs this job was given (affinity, cgroup quota, `SLURM_CPUS_PER_TASK`), not the machine's."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import MutableMapping

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup and its parents (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`) in CPUs, the smallest along the path; None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    files: tuple[str, ...]
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, cpu.max = "QUOTA PERIOD" or "max PERIOD"
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            base = next((root / n for n in (controllers, "cpu,cpuacct", "cpu") if (root / n).is_dir()), root / "cpu")
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        folder = base / path.lstrip("/")
        for level in (folder, *folder.parents):
            if level != base and base not in level.parents:
                break
            quota = _quota(level, files)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            value, period = (folder / files[0]).read_text().split()[:2]
        else:
            value, period = ((folder / f).read_text().strip() for f in files)
        if value in ("max", "-1") or int(period) <= 0:
            return None
        return int(value) / int(period)
    except (OSError, ValueError):
        return None


def job_cpus(environ: MutableMapping[str, str] = os.environ) -> int:
    """The CPUs this job may use: the affinity mask, capped by the cgroup quota (rounded up) and by
    `SLURM_CPUS_PER_TASK`; at least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, math.ceil(quota))
    slurm = environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def share_cores(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set `OMP_WAIT_POLICY=PASSIVE` and `OMP_NUM_THREADS` (`job_cpus`) where the user has not set them, and
    return what was set. Only before torch loads: OpenMP reads them once, when it starts."""
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(job_cpus(environ))}
    chosen = {k: v for k, v in wanted.items() if k not in environ}
    environ.update(chosen)
    return chosen
