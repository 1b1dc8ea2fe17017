"""A small real fit alone and beside a neighbour that keeps 2 threads busy, with fmn-pl's thread settings
(`fmn_pl.cores`: passive OpenMP waits, threads = the job's CPUs). Prints one JSON object.

    python benchmarks/shared_cores.py                  # MiniLM, 600 SST-2 rows, 1 epoch, alone then beside
    python benchmarks/shared_cores.py --spin           # also the old default (OpenMP threads spin while waiting)

The fair share of a fit beside the neighbour is half the cores, so twice its quiet time: `ratio_to_fair_share`
= beside / (2 x alone), 1.0 being fair and above 1 the time lost to threads that wait on a busy core. Each run is
`fmn-pl fit` in its own process (the thread settings are made at the command's start), timed from start to exit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def neighbour(threads: int = 2) -> None:
    """Keep `threads` cores busy until killed: sha256 over a 4 MiB buffer releases the GIL, so the threads of
    this one process run at once."""
    data = os.urandom(4 << 20)

    def spin() -> None:
        while True:
            hashlib.sha256(data).digest()

    for _ in range(threads):
        threading.Thread(target=spin, daemon=True).start()
    while True:
        time.sleep(3600)


def _absolute(path: str) -> str:
    """A local path made absolute (the fit runs in a temp folder); a hub name unchanged."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def fit_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fmn_pl.cli",
        "fit",
        f"--model.model_name_or_path={_absolute(args.model)}",  # the fit runs in a temp folder
        "--data.task=sst2",
        f"--data.data_dir={_absolute(args.data)}",
        f"--data.max_train_samples={args.rows}",
        "--data.max_eval_samples=200",
        "--data.holdout_samples=0",
        "--data.max_length=64",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--export.dirpath={out}",
    ]


def timed_fit(args: argparse.Namespace, env: dict[str, str], busy: bool) -> dict[str, float]:
    """One fit in a fresh process (beside a fresh neighbour when `busy`): its wall and CPU seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        side = None
        if busy:
            side = subprocess.Popen([sys.executable, __file__, "--neighbour"])
            time.sleep(1)  # its threads are running
        try:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            proc = subprocess.run(  # in the temp folder: Lightning saves its config.yaml where it runs
                fit_command(args, Path(tmp) / "export"), env=env, capture_output=True, text=True, cwd=tmp
            )
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            if side is not None:
                side.kill()
                side.wait()
        if proc.returncode != 0:
            raise SystemExit(f"fit failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def measure(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    alone = timed_fit(args, env, busy=False)
    beside = timed_fit(args, env, busy=True)
    return {
        "alone": alone,
        "beside_neighbour": beside,
        "ratio_to_fair_share": round(beside["wall_s"] / (2 * alone["wall_s"]), 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--data", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--rows", type=int, default=600, help="SST-2 training rows (one epoch)")
    parser.add_argument("--spin", action="store_true", help="also measure OpenMP's own default wait policy")
    parser.add_argument("--neighbour", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.neighbour:
        neighbour()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    base |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result: dict[str, Any] = {
        "fit": f"all-MiniLM-L6-v2, {args.rows} SST-2 rows, 1 epoch, max_length 64, batch 32",
        "neighbour": "one process keeping 2 threads busy",
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "load_before": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "fmn_pl_settings": measure(args, base),
    }
    if args.spin:  # an empty value is not one OpenMP knows: it keeps its own default (spin, then sleep)
        result["openmp_default_wait"] = measure(args, {**base, "OMP_WAIT_POLICY": ""})
    result["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
