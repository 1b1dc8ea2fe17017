"""docs/results.md from one pipeline run: the individual models beside their constant baselines, every method
on the pairs and on the all-task merge, its cost, and the published claims checked against these figures.

    fmn-pl pipeline --config configs/pipeline/reference.yaml      # the competent set and every merge
    python research/results.py --run runs/reference --out docs/results.md

Gains are in points (score x 100) over the plain average, per (pair, task) cell; a cell is won or lost when
the gap exceeds 0.05 points. Costs are read from each merge's own report (merge and option selection,
excluding the final evaluation) and from the artifacts' recorded compute time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fmn_pl.report import mean

TIE = 0.0005  # 0.05 points: closer than this to the average is neither a win nor a loss


def load(run: Path) -> dict[str, Any]:
    """The run's combined report (`fmn_pl.pipeline_report.gather`, over the merges finished so far) and every merge's
    own report, keyed (combination, label)."""
    from fmn_pl.pipeline_config import parse_config
    from fmn_pl.pipeline_report import gather

    cfg = parse_config(["--config", str(run / "pipeline.yaml"), f"--output={run}"])[0]
    data = gather(cfg, partial=True)
    data["merge_reports"] = {}
    for path in sorted((run / "merges").glob("*/*/report.json")):
        data["merge_reports"][(path.parent.parent.name, path.parent.name)] = json.loads(path.read_text())
    return data


def cells(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """{(combination, task): {column: row}}."""
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in data["results"]:
        out.setdefault((r["combination"], r["task"]), {})[r["column"]] = r
    return out


def method_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: pair gains, wins/losses, normalized scores, the all-task merge, STS-B MSE and cost."""
    table = cells(data)
    pair_names = {c for c in data["combinations"] if c.count("+") == 1}
    full = [c for c in data["combinations"] if c.count("+") > 1]
    out = []
    for label in data["labels"]:
        gains = [
            100 * (cols[label]["score"] - cols["average"]["score"])
            for (combo, _), cols in table.items()
            if combo in pair_names and label in cols
        ]
        stsb = [
            cols[label]["mse"]
            for (combo, task), cols in table.items()
            if combo in pair_names and task == "stsb" and label in cols and cols[label].get("mse") is not None
        ]
        reports = [r for (combo, lab), r in data["merge_reports"].items() if lab == label and combo in pair_names]
        row = {
            "label": label,
            "cells": len(gains),
            "gain": statistics.mean(gains) if gains else None,
            "wins": sum(g > 100 * TIE for g in gains),
            "losses": sum(g < -100 * TIE for g in gains),
            "normalized": mean([data["summary"][c][label]["normalized"] for c in pair_names]),
            "stsb_mse": statistics.mean(stsb) if stsb else None,
            "merge_s": statistics.median(r["timings"]["merge_s"] for r in reports) if reports else None,
        }
        for combo in full:
            cols = [v for (c, _), v in table.items() if c == combo and label in v]
            row["all_gain"] = mean([100 * (v[label]["score"] - v["average"]["score"]) for v in cols])
            row["all_normalized"] = data["summary"][combo][label]["normalized"]
        out.append(row)
    return out


def fisher_cost(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Seconds per example of each artifact kind, per task, as the artifacts record them."""
    rows = []
    for task, c in data["checkpoints"].items():
        arts = c.get("artifacts") or {}
        per = {
            k: a["seconds"] / a["num_examples"] for k, a in arts.items() if a.get("seconds") and a.get("num_examples")
        }
        rows.append(
            {
                "task": task,
                **{f"{k}_s": arts[k]["seconds"] for k in per},
                **{f"{k}_examples": arts[k]["num_examples"] for k in per},
                "per_example": per,
            }
        )
    return rows


def parity_lines(folder: Path) -> list[str]:
    """The fine-tuning parity table from `benchmarks/fit_parity.py` outputs (*.json) in `folder`."""
    lines = [
        "## Fine-tuning parity: `fmn-pl fit` against a plain PyTorch loop",
        "",
        "`python benchmarks/fit_parity.py` per task (JSON in the run folder): the same model, rows, recipe and "
        "seed on both sides; validation score x100 after each epoch; `grouped` is `fmn-pl fit` with "
        "`--data.group_by_length true`, the old default.",
        "",
        "| task | rows, epochs, lr | seed | epoch | plain loop | fmn-pl fit | fmn-pl fit, grouped |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    final: dict[tuple[str, str], dict[str, list[float]]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # a run still going
        setup, scores = run["setup"], run["scores"]
        budget = f"{setup['train_samples']}, {setup['epochs']}, {setup['lr']:g}"
        for side, runs in scores.items():
            final.setdefault((setup["task"], budget), {}).setdefault(side, []).extend(
                r[-1]["score"] for r in runs.values()
            )
        for seed in scores["plain"]:
            for epoch, plain in enumerate(scores["plain"][seed]):
                cells = [
                    scores.get(side, {}).get(seed, [None] * (epoch + 1))[epoch] for side in ("fmn_pl", "fmn_pl_grouped")
                ]
                lines.append(
                    f"| {setup['task']} | {budget} | {seed} | {epoch + 1} | {100 * plain['score']:.1f} | "
                    + " | ".join("–" if c is None else f"{100 * c['score']:.1f}" for c in cells)
                    + " |"
                )
    lines += ["", "Last epoch, mean over seeds (seeds):", ""]
    for (task, budget), sides in final.items():
        lines.append(
            f"- {task} ({budget}): "
            + ", ".join(f"{side} {100 * statistics.mean(v):.1f} ({len(v)})" for side, v in sides.items())
        )
    return lines + [""]


def _f(x: float | None, fmt: str = "{:+.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def claims(
    methods: dict[str, dict[str, Any]], cost: list[dict[str, Any]], data: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """(claim, verdict, figure) for each published claim this run can test."""
    out = []
    fmn = methods.get("fmn")
    if fmn:
        best = max(g for g in [fmn["gain"], methods.get("fmn_reference", {}).get("gain")] if g is not None)
        out.append(
            (
                "FMN beats the plain average (the paper: up to +6.5 points)",
                "holds" if best > 0 else "does not hold",
                f"pairs: defaults {_f(fmn['gain'])} ({fmn['wins']}/{fmn['cells']} won, {fmn['losses']} lost), "
                "paper's rule "
                f"{_f(methods.get('fmn_reference', {}).get('gain'))}; all tasks: {_f(fmn.get('all_gain'))}",
            )
        )
    ratios = [
        c["per_example"]["full_fisher"] / c["per_example"]["mask_fisher"]
        for c in cost
        if {"full_fisher", "mask_fisher"} <= set(c["per_example"])
    ]
    if ratios and fmn and "fisher" in methods:
        close = fmn["gain"] >= methods["fisher"]["gain"]
        out.append(
            (
                "FMN matches full Fisher merging at a fraction of the cost (the paper: 57x-322x cheaper)",
                "holds" if close else "cost holds, score does not",
                f"full Fisher costs {min(ratios):.0f}x-{max(ratios):.0f}x more per example; gain over the average: "
                f"FMN {_f(fmn['gain'])}, Fisher {_f(methods['fisher']['gain'])}",
            )
        )
    for a, b, claim in (
        ("regmean", "fisher", "RegMean is ahead of Fisher averaging"),
        ("adamerging", "task_arithmetic", "AdaMerging is ahead of task arithmetic"),
        ("consensus", "task_arithmetic", "Consensus improves task arithmetic"),
        ("consensus", "ties", "Consensus (over task arithmetic) is ahead of TIES"),
    ):
        if a in methods and b in methods and methods[a]["gain"] is not None:
            out.append(
                (
                    claim,
                    "holds" if methods[a]["gain"] > methods[b]["gain"] else "does not hold",
                    f"pairs: {a} {_f(methods[a]['gain'])}, {b} {_f(methods[b]['gain'])}; all tasks: "
                    f"{_f(methods[a].get('all_gain'))} vs {_f(methods[b].get('all_gain'))}",
                )
            )
    if "tall" in methods:
        table = cells(data)
        kept = [cols["tall"]["normalized"] for cols in table.values() if "tall" in cols and cols["tall"]["normalized"]]
        share = sum(k >= 0.99 for k in kept)
        out.append(
            (
                "TALL masks keep over 99% of each task's score",
                "holds" if kept and share == len(kept) else "does not hold",
                f"{share} of {len(kept)} cells at >= 99% of the individual score (lowest {100 * min(kept):.1f}%)"
                if kept
                else "no TALL cells",
            )
        )
    return out


def speed_lines(folder: Path) -> list[str]:
    """One merge alone, from `benchmarks/merge_speed.py` outputs (*.json) in `folder`."""
    rows = []
    for path in sorted(folder.glob("merge_speed*.json")):
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        setup = run.pop("setup")
        pair = "+".join(Path(c).name for c in setup["checkpoints"])
        for method, m in run.items():
            rows.append(
                f"| {pair} | {method} | {m['wall_s']:.1f} | {m['check_s']:.1f} | {m['merge_s']:.1f} | "
                f"{m['peak_rss_mb']:.0f} | {m['evaluations']} | {setup['reps']} | "
                f"{setup['load_average_after'][0]:.1f} |"
            )
    if not rows:
        return []
    return [
        "",
        "## One merge alone",
        "",
        "`python benchmarks/merge_speed.py --checkpoints <two reference checkpoints> --reps 3`: `fmn-pl merge` in a "
        "fresh process without the final evaluation, start-up included, median of the reps; check: inputs and "
        "fingerprints; merge: merging with option selection (300 held-out rows per task, the default). The goal "
        "for FMN's defaults is 30 s on 2 CPU cores.",
        "",
        "| pair | method | wall s | check s | merge s | peak MB | scorings | reps | load after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def markdown(data: dict[str, Any], why: dict[str, str], parity: Path | None = None, speed: Path | None = None) -> str:
    methods = {m["label"]: m for m in method_rows(data)}
    cost = fisher_cost(data)
    table = cells(data)
    lines = [
        "# Results on the competent reference set",
        "",
        f"Model `{data['model']}`; tasks {', '.join(data['tasks'])}; produced by `python research/results.py` "
        "from `fmn-pl pipeline --config configs/pipeline/reference.yaml`.",
        "",
        *(parity_lines(parity) if parity is not None and parity.is_dir() else []),
        f"Merges in this run: {len(data['merge_reports'])} of {len(data['combinations']) * (len(data['labels']) - 1)}.",
        "",
        "## The individual models",
        "",
        "Each validation score beside the best constant prediction on the same examples (majority class, or the "
        "label mean for STS-B): a model counts only when it is clearly above it.",
        "",
        "| task | metrics | constant | individual (merge sample) | individual (full validation) | "
        "mean squared error (constant / model) | training rows | best epoch |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for task, c in data["checkpoints"].items():
        cols = next(v for (combo, t), v in table.items() if t == task)
        ind, const = cols["individual"], cols["constant"]
        full = (c.get("metrics") or {}).get("val/score")
        mse = "–" if ind.get("mse") is None else f"{const['mse']:.3f} / {ind['mse']:.3f}"
        lines.append(
            f"| {task} | {', '.join(ind['metrics'])} | {100 * const['score']:.1f} | {100 * ind['score']:.1f} | "
            f"{_f(full and 100 * full, '{:.1f}')} | {mse} | {c.get('num_train_examples')} | {c.get('epoch')} |"
        )
    lines += [
        "",
        "## Every method against the plain average",
        "",
        "Gain: points over the plain average, mean over the cells (pair, task) of the "
        f"{sum(1 for c in data['combinations'] if c.count('+') == 1)} pairs; won/lost: cells more than 0.05 points "
        "above/below it; normalized: merged / individual (%), mean over the pairs; all tasks: the merge of "
        "every task at once; merge s: median wall time of merge plus option selection over the pairs, on cores shared "
        "with other jobs (`benchmarks/merge_speed.py` times one merge alone).",
        "",
        "| method | gain (pairs) | won / lost of cells | normalized (pairs) | gain (all tasks) | normalized (all) "
        "| STS-B MSE (pairs) | merge s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods.values():
        lines.append(
            f"| {m['label']} | {_f(m['gain'])} | {m['wins']} / {m['losses']} of {m['cells']} | "
            f"{_f(m['normalized'] and 100 * m['normalized'], '{:.1f}')} | {_f(m.get('all_gain'))} | "
            f"{_f(m.get('all_normalized') and 100 * m['all_normalized'], '{:.1f}')} | "
            f"{_f(m['stsb_mse'], '{:.3f}')} | {_f(m['merge_s'], '{:.1f}')} |"
        )
    lines += [
        "",
        "### Per cell (points over the plain average)",
        "",
        "| cell | constant | individual | average | " + " | ".join(l for l in data["labels"] if l != "average") + " |",
        "|---|---:|---:|---:|" + "---:|" * (len(data["labels"]) - 1),
    ]
    for (combo, task), cols in table.items():
        avg = cols["average"]["score"]
        lines.append(
            f"| {combo}: {task} | {100 * cols['constant']['score']:.1f} | {100 * cols['individual']['score']:.1f} | "
            f"{100 * avg:.1f} | "
            + " | ".join(
                _f(100 * (cols[l]["score"] - avg)) if l in cols else "–" for l in data["labels"] if l != "average"
            )
            + " |"
        )
    if cost:
        lines += [
            "",
            "## Artifact cost",
            "",
            "| task | " + " | ".join(f"{k} (s / examples)" for k in cost[0]["per_example"]) + " |",
            "|---|" + "---:|" * len(cost[0]["per_example"]),
        ]
        for c in cost:
            lines.append(
                f"| {c['task']} | "
                + " | ".join(f"{c[k + '_s']:.1f} / {c[k + '_examples']}" for k in c["per_example"])
                + " |"
            )
    lines += speed_lines(speed) if speed is not None and speed.is_dir() else []
    lines += ["", "## The published claims, here", "", "| claim | here | figures | why |", "|---|---|---|---|"]
    for claim, verdict, figure in claims(methods, cost, data):
        lines.append(f"| {claim} | **{verdict}** | {figure} | {why.get(claim, '')} |")
    if data.get("flags"):
        lines += ["", "## Flags raised by the reports", "", *[f"- {f}" for f in data["flags"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/reference"), help="a finished pipeline output folder")
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    p.add_argument("--parity", type=Path, default=Path("runs/parity"), help="benchmarks/fit_parity.py outputs (*.json)")
    p.add_argument("--speed", type=Path, default=Path("runs/bench"), help="benchmarks/merge_speed.py outputs (*.json)")
    p.add_argument(
        "--why",
        type=Path,
        default=Path(__file__).with_name("results_why.json"),
        help="JSON {claim: why we think it (does not) hold}, written after reading the figures",
    )
    args = p.parse_args()
    why = json.loads(args.why.read_text()) if args.why.is_file() else {}
    text = markdown(load(args.run), why, args.parity, args.speed)
    from fmn_pl.files import atomic_write

    atomic_write(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
