"""Wall time and peak memory of one pair merge, merge and option selection together (no final evaluation),
as a user runs it: `fmn-pl merge` in a fresh process, start-up included. Prints one JSON object.

    python benchmarks/merge_speed.py --checkpoints runs/reference/checkpoints/rte runs/reference/checkpoints/mrpc

Each method (default: FMN's defaults, the paper's rule, task arithmetic with lambda chosen) runs `--reps` times,
interleaved; the median is reported with the merge's own split of its time (`check_s`, `merge_s`: the merge
with its candidate scorings) and the process's peak resident memory. The goal for FMN's defaults is 30 s on 2
CPU cores for a MiniLM pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "fmn_defaults": ["--method=fmn"],
    "fmn_reference": [
        "--method=fmn",
        "--method.broadcast=reference",
        "--method.normalize=none",
        "--method.power=1.0",
        "--method.scaling=1.0",
    ],
    "task_arithmetic": ["--method=task_arithmetic", "--method.scaling=null"],
}


def run_once(name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [
        sys.executable,
        "-m",
        "fmn_pl.cli",
        "merge",
        *METHODS[name],
        "--checkpoints",
        *args.checkpoints,
        "--output",
        str(out),
        "--overwrite=true",
        "--evaluate=false",
        "--progress=false",
        "--eval.cache=false",
        f"--data_dir={args.data_dir}",
        f"--batch_size={args.batch_size}",
    ]
    if args.selection_samples is not None:
        cmd.append(f"--selection.samples={args.selection_samples}")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    t = report["timings"]
    return {
        "wall_s": wall,
        "check_s": t.get("check_s", 0.0),
        "merge_s": t.get("merge_s", 0.0),
        "peak_rss_mb": report.get("peak_rss_mb", 0.0),
        "evaluations": (report.get("selection") or {}).get("evaluations", 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs=2, required=True, help="two task checkpoints with mask_fisher artifacts")
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--selection_samples", type=int, default=None, help="selection rows per task (default: merge's)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in args.methods if rep % 2 == 0 else args.methods[::-1]:
                runs[name].append(run_once(name, args, Path(tmp) / name))
    print(
        json.dumps(
            {
                "setup": {
                    "checkpoints": args.checkpoints,
                    "selection_samples": args.selection_samples,
                    "reps": args.reps,
                    "cpus": os.cpu_count(),
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                },
                **{
                    name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in runs.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
