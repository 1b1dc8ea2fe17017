"""Every merge method on one set of real task checkpoints: scores, normalized scores, time and peak memory.

Runs `fmn-pl merge` once per row of the table, each in a fresh process (so each peak resident memory is its
own), with the saved model off and the individual/average scores cached beside the checkpoints (computed by
the first row, reused by the rest). Then reads every report.json and prints one JSON document, and writes
<out>/table.md: individual and average rows, one row per method with its score per task, the normalized score
(merged / individual, mean over the tasks), the wall time of the merge (choosing options on selection data
included; evaluation excluded) and of the whole command, and the process's peak RSS.

    python research/merge_table.py --checkpoints runs/checkpoints/{rte,cola,mrpc,stsb,sst2} \
        --out runs/merges/all5 --max_eval_samples 500 [--rows average fmn ties ...]

Every checkpoint needs the artifacts of the rows asked for (`fmn-pl fisher --kind mask|full|grams`). A row
whose report.json exists is not rerun (delete its folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fmn_pl.files import write_json
from fmn_pl.merging.fmn import REFERENCE

# the FMN defaults before question 5 (8 candidates: normalize none, p from [0.25, 0] x s)
FMN_PREVIOUS = ["--method", "fmn", "--method.normalize", "none", "--method.powers", "[0.25, 0]"]
# the paper's rule, from the one place that states it (a partial copy here went stale when the defaults changed)
FMN_REFERENCE = ["--method", "fmn", *(f"--method.{k}={v}" for k, v in REFERENCE.items())]
# label -> `fmn-pl merge` method arguments. Options left out take the method's defaults (TA/TIES/TALL/Consensus
# choose lambda on the selection split; AdaMerging's steps cut from 500 to fit a CPU).
ROWS: dict[str, list[str]] = {
    "average": ["--method", "average"],
    # the defaults: per_node; normalization from {none, mean}, p from {0.25, 0.5, 0} and s chosen by the mean score
    "fmn": ["--method", "fmn"],
    "fmn worst_gain": ["--method", "fmn", "--method.objective", "worst_gain"],
    "fmn previous defaults": FMN_PREVIOUS,
    "fmn reference": FMN_REFERENCE,
    "fmn reference per_node": [*FMN_REFERENCE, "--method.broadcast=per_node"],  # the last value given wins
    "fmn mean/per_node/scaled": [
        "--method",
        "fmn",
        "--method.normalize",
        "mean",
        "--method.power",
        "1",
        "--method.objective",
        "mean",
    ],
    "fisher": ["--method", "fisher"],
    "task_arithmetic": ["--method", "task_arithmetic"],
    "task_arithmetic dare": ["--method", "task_arithmetic", "--method.dare_p", "0.5"],
    "ties": ["--method", "ties"],
    "ties dare": ["--method", "ties", "--method.dare_p", "0.5"],
    "regmean": ["--method", "regmean"],
    "adamerging task": ["--method", "adamerging", "--method.steps", "100"],
    "adamerging layer": ["--method", "adamerging", "--method.granularity", "layer", "--method.steps", "100"],
    "adamerging++ layer": [
        "--method",
        "adamerging",
        "--method.granularity",
        "layer",
        "--method.plus",
        "true",
        "--method.steps",
        "100",
    ],
    "tall": ["--method", "tall"],
    "consensus ta": ["--method", "consensus"],
    "consensus ties": ["--method", "consensus", "--method.over", "ties"],
}


def run_row(label: str, checkpoints: list[str], out: Path, common: list[str]) -> dict:
    """One `fmn-pl merge` in a fresh process (or its existing report); adds the command's own wall time."""
    folder = out / label.replace(" ", "_").replace("/", "-").replace("+", "p")
    report = folder / "report.json"
    if not report.is_file():
        argv = [
            sys.executable,
            "-m",
            "fmn_pl.cli",
            "merge",
            *ROWS[label],
            "--checkpoints",
            *checkpoints,
            "--output",
            str(folder),
            "--overwrite",
            "true",
            "--save_model",
            "false",
            "--label",
            label,
            *common,
        ]
        start = time.perf_counter()
        with open(folder.with_suffix(".log"), "w") as log:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"{label}: fmn-pl merge failed (exit {proc.returncode}); see {folder.with_suffix('.log')}")
        data = json.loads(report.read_text())
        data["command_s"] = time.perf_counter() - start
        write_json(report, data)  # atomic: a rerun never reads half a report
    return json.loads(report.read_text())


def table(reports: dict[str, dict]) -> str:
    """The Markdown table: scores x100 per task, normalized %, time and memory per row."""
    first = next(iter(reports.values()))
    tasks = list(first["tasks"])
    res = first["results"]
    head = "| method | " + " | ".join(tasks) + " | normalized % | merge s | command s | peak RSS GB |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 4)]
    for base in ("individual", "average")[: 1 if "average" in reports else 2]:  # a run average row has its cost
        cells = [f"{100 * res[t][base]['score']:.1f}" for t in tasks]
        norm = 100.0 if base == "individual" else 100 * first["summary"]["normalized_average"]
        lines.append(f"| {base} | " + " | ".join(cells) + f" | {norm:.1f} | | | |")
    for label, r in reports.items():
        cells = [f"{100 * r['results'][t]['merged']['score']:.1f}" for t in tasks]
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {100 * r['summary']['normalized']:.1f} | "
            f"{r['timings']['merge_s']:.0f} | {r.get('command_s', float('nan')):.0f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        metavar="ROW",
        help=f"rows to run, of: {', '.join(ROWS)}",
    )
    parser.add_argument("--max_eval_samples", type=int, default=500)
    parser.add_argument("--base", default=None, help="the pretrained model (default: the checkpoints' recorded one)")
    parser.add_argument("--data_dir", default=None, help="GLUE data (default: `fmn-pl merge`'s)")
    args = parser.parse_args(argv)
    common = ["--eval.max_samples", str(args.max_eval_samples), "--progress", "false"]
    for option in ("base", "data_dir"):
        if getattr(args, option):
            common += [f"--{option}", getattr(args, option)]
    args.out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for label in args.rows:
        reports[label] = run_row(label, args.checkpoints, args.out, common)
        print(f"{label}: normalized {100 * reports[label]['summary']['normalized']:.1f}%", file=sys.stderr)
    (args.out / "table.md").write_text(table(reports))
    doc = {
        "checkpoints": args.checkpoints,
        "max_eval_samples": args.max_eval_samples,
        "rows": {
            label: {
                "options": r["options"],
                "summary": r["summary"],
                "timings": r["timings"],
                "command_s": r.get("command_s"),
                "peak_rss_mb": r["peak_rss_mb"],
                "notes": r.get("notes", {}),
                "remarks": r.get("remarks", []),
                "scores": {t: v["merged"]["score"] for t, v in r["results"].items()},
            }
            for label, r in reports.items()
        },
    }
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
