"""Thread settings for shared cores (`fmn_pl.cores`), set at the command's start before torch loads, and the
prepared checks that use them: the shared-cores benchmark and the GPU check (syntax and plan only: no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmn_pl.cores import cgroup_cpus, job_cpus, share_cores
from tests.conftest import REPO, load_benchmark


def fake_cgroup(tmp_path: Path, lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup with `lines` and a cgroup tree with `files` (relative path -> content)."""
    (tmp_path / "proc").write_text(lines)
    for name, text in files.items():
        (tmp_path / "cg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / name).write_text(text)
    return tmp_path / "proc", tmp_path / "cg"


def test_cgroup_quota_v2_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    proc, root = fake_cgroup(
        tmp_path, "0::/job/step\n", {"cpu.max": "max 100000\n", "job/cpu.max": "150000 100000\n", "job/step/x": ""}
    )
    assert cgroup_cpus(proc, root) == 1.5
    (root / "job" / "step" / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpus(proc, root) == 1.5  # a parent's quota binds the child


def test_cgroup_quota_v1_and_none(tmp_path: Path) -> None:
    files = {"cpu,cpuacct/slurm/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/slurm/cpu.cfs_period_us": "100000\n"}
    proc, root = fake_cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/slurm\n", files)
    assert cgroup_cpus(proc, root) == 3.0
    (root / "cpu,cpuacct" / "slurm" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(proc, root) is None
    assert cgroup_cpus(tmp_path / "absent", root) is None


def test_job_cpus_follows_slurm_and_share_cores_keeps_user_values() -> None:
    assert job_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert job_cpus({}) <= len(os.sched_getaffinity(0))
    env = {"OMP_NUM_THREADS": "7"}
    assert share_cores(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_NUM_THREADS"] == "7"
    env = {"SLURM_CPUS_PER_TASK": "1"}
    share_cores(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "1"


def test_the_shell_entry_sets_them_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = (
        "import os, sys; from fmn_pl import cli; sys.argv = ['fmn-pl', '--help']; cli.main(); "
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[-3:] == ["PASSIVE", str(job_cpus()), "False"]


def test_shared_cores_benchmark_runs_the_cli_fit() -> None:
    bench = load_benchmark("shared_cores")
    args = type("A", (), {"model": "m", "data": "d", "rows": 600})()
    command = bench.fit_command(args, Path("out"))
    assert command[1:4] == ["-m", "fmn_pl.cli", "fit"] and "--data.max_train_samples=600" in command


def test_gpu_check_is_well_formed() -> None:
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)
    script = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py")]
    assert "--steps" in subprocess.run([*script, "--help"], capture_output=True, text=True, check=True).stdout
    plan = json.loads(subprocess.run([*script, "--dry_run"], capture_output=True, text=True, check=True).stdout)
    assert "--trainer.precision=bf16-mixed" in plan["fit"] and "--accelerator=gpu" in plan["merge"]
    assert "--trainer.accelerator=cpu" in plan["fisher_cpu"] and "--trainer.accelerator=gpu" in plan["fisher_gpu"]


@pytest.mark.parametrize("name", ["gpu_check"])
def test_gpu_check_imports_without_a_gpu(name: str) -> None:
    assert load_benchmark(name).TOLERANCE == 1e-4
