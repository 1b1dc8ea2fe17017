"""FMN selection rules (issue 8): every candidate body of FMN's choice scored once, then rules compared as choices.

    python research/fmn_rules.py --checkpoints_dir runs/checkpoints --tasks rte cola mrpc stsb sst2 \
        --out runs/rules --max_eval_samples 500

FMN's defaults choose p (`powers`) and s (`scalings`) per merge on the held-out rows (and the normalization from
`normalizes` when `normalize` is null). A rule is a candidate set (some of those (normalize, p, s)) and an
objective (`mean` or `worst_gain`). Instead of running each rule as its own merge
(`research/fmn_study.py` does that, one grid row per rule), this scores each candidate body
theta0 + s (FMN_{normalize, p} - theta0) of every pair once, on the selection split (holdout) and on
validation, with the plain average and the individual checkpoints, and then lets each rule choose by its
objective among the stored holdout scores (`rank`, the criterion `fmn merge` itself uses). The rule's chosen
cell per pair is exactly what the merge with those options returns; its validation gain over the average is
what we report.

Inputs: <checkpoints_dir>/<task>/ with `data.holdout_samples` > 0 and mask_fisher.safetensors beside it
(`fmn-pl fisher --checkpoint <dir>`). Outputs in <out>: cells/<pair>__<candidate>.json (one per scored body:
a rerun recomputes nothing; settings.json, with the checkpoints' and Fishers' fingerprints, refuses a rerun
with other settings or inputs), rules.json (also printed: every rule's choice, gains and wins per split) and
rules.md. `--own_tensors '*.pooler.*'` lets each task keep its
own pooler in every body, the average's included. `--choose_on validation` swaps the splits' roles (rules choose on
the 500 validation rows and are counted on the held-out rows; written to rules.choose_on_validation.{json,md}): an
estimate, without fine-tuning again, of what a larger selection set would carry.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fmn_pl import Evaluator, merge_body
from fmn_pl.artifacts import artifact_path
from fmn_pl.checkpoint import weights_fingerprint
from fmn_pl.evaluate import EvalData
from fmn_pl.files import atomic_write, write_json
from fmn_pl.merging.average import Average
from fmn_pl.merging.fmn import FMN, NORMALIZES, POWERS, SCALINGS, weightings
from fmn_pl.merging.search import rank

REPO = Path(__file__).resolve().parents[1]

SPLITS = ("holdout", "validation")


def candidate(p: float, s: float, normalize: str = "none") -> str:
    """A cell's name: p0.25_s2 (normalize none), mean_p0.5_s2; p = 0 is one body whatever the normalization."""
    return f"p{p:g}_s{s:g}" if normalize == "none" or p == 0 else f"{normalize}_p{p:g}_s{s:g}"


def rules(normalizes: list[str], powers: list[float], scalings: list[float]) -> list[dict[str, Any]]:
    """The rules compared, by each objective: every normalization with every power (FMN's grid), then subsets
    (each normalization alone; each power alone, and each nonzero power with 0); a candidate set once."""

    def braces(xs: list) -> str:
        return "{" + ", ".join(f"{x:g}" if isinstance(x, float) else x for x in xs) + "}"

    norm_sets = [normalizes] + ([[n] for n in normalizes] if len(normalizes) > 1 else [])
    with_zero = len(powers) > 2 and 0.0 in powers
    power_sets = [powers] + [[p] for p in powers] + [[p, 0.0] for p in powers if p != 0 and with_zero]
    out, seen = [], set()
    for ns in norm_sets:
        for ps in power_sets:
            cands = [candidate(p, s, n) for n, p in weightings(ns, ps) for s in scalings]
            if tuple(cands) in seen:
                continue
            seen.add(tuple(cands))
            name = ("" if ns == ["none"] or not any(ps) else f"normalize {braces(ns)}, ") + (
                f"p {ps[0]:g} alone" if len(ps) == 1 else f"p from {braces(ps)}"
            )
            options = {
                "normalize": ns[0] if len(ns) == 1 else None,
                "normalizes": ns,
                "power": ps[0] if len(ps) == 1 else None,
                "powers": ps,
            }
            out += [
                {
                    "label": f"{name}, s by {objective}",
                    "candidates": cands,
                    "objective": objective,
                    "options": {**options, "objective": objective},
                }
                for objective in ("mean", "worst_gain")
            ]
    return out


def score_cells(
    args: argparse.Namespace, pairs: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """{(pair or task, candidate | 'average' | 'individual'): {task: {split: points}}}, cached per cell."""
    root = Path(args.checkpoints_dir)
    cache = Path(args.out) / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    settings = {
        "checkpoints_dir": str(root.resolve()),
        "data_dir": args.data_dir,
        "own_tensors": args.own_tensors,
        "max_eval_samples": args.max_eval_samples,
        # a checkpoint fine-tuned or a Fisher computed again makes every cached cell stale
        "weights": {t: weights_fingerprint(root / t) for t in args.tasks},
        "mask_fisher": {
            t: hashlib.sha256(artifact_path(root / t, "mask_fisher").read_bytes()).hexdigest()[:16] for t in args.tasks
        },
    }
    stored = Path(args.out) / "settings.json"
    old = json.loads(stored.read_text()) if stored.is_file() else settings
    if old != settings:
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        raise SystemExit(
            f"fmn_rules: {stored} holds cells of other settings ({', '.join(changed)} differ); use another --out"
        )
    write_json(stored, settings)
    ckpts = [root / t for t in args.tasks]
    ev = {
        split: Evaluator(
            ckpts,
            EvalData(args.data_dir, split, args.max_eval_samples if split == "validation" else None, args.batch_size),
            args.accelerator,
            progress=False,
        )
        for split in SPLITS
    }
    cells = {}

    def cell(combo: tuple[str, ...], name: str, body: Callable[[], dict | None]) -> None:
        path = cache / f"{'+'.join(combo)}__{name}.json"
        if not path.is_file():
            t0 = time.time()
            merged = body()
            scores = {
                t: {split: 100 * e.evaluate(args.tasks.index(t), body=merged)["score"] for split, e in ev.items()}
                for t in combo
            }
            write_json(path, {"scores": scores, "seconds": time.time() - t0})
            print(f"fmn_rules: {'+'.join(combo)} {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        cells[("+".join(combo), name)] = json.loads(path.read_text())["scores"]

    for t in args.tasks:
        cell((t,), "individual", lambda: None)
    for pair in pairs:
        cks = [root / t for t in pair]
        own = args.own_tensors
        cell(
            pair,
            "average",
            lambda cks=cks, own=own: merge_body(cks, Average(), evaluator=ev["holdout"], own_tensors=own),
        )
        for n, p in weightings(args.normalizes, args.powers):
            for s in args.scalings:
                cell(
                    pair,
                    candidate(p, s, n),
                    lambda n=n, p=p, s=s, cks=cks, own=own: merge_body(
                        cks,
                        FMN(normalize=n, power=p, scaling=s),
                        evaluator=ev["holdout"],
                        log=lambda msg: None,
                        own_tensors=own,
                    ),
                )
    return cells


def compare(cells: dict, pairs: list[str], rule: dict[str, Any], choose_on: str = "holdout") -> dict[str, Any]:
    """One rule's choice per pair (on `choose_on`) and the gains over the average of the chosen body, per split."""

    def scores(pair: str, name: str) -> dict[str, float]:
        return {t: v[choose_on] for t, v in cells[(pair, name)].items()}

    chosen, gains = {}, {split: [] for split in SPLITS}
    for pair in pairs:
        avg = cells[(pair, "average")]
        # as in FMN.merge: worst_gain's reference is the candidate p = 0, s = 1 (the average) when it is one
        ref = candidate(0.0, 1.0) if candidate(0.0, 1.0) in rule["candidates"] else "average"
        reference = scores(pair, ref) if rule["objective"] == "worst_gain" else None
        best = max(rule["candidates"], key=lambda c: rank(scores(pair, c), reference))
        chosen[pair] = best
        for split in SPLITS:
            gains[split] += [cells[(pair, best)][t][split] - avg[t][split] for t in avg]
    summary = {
        split: {
            "mean_gain": sum(g) / len(g),
            "wins": sum(x > 0 for x in g),
            "losses": sum(x < 0 for x in g),
            "cells": len(g),
        }
        for split, g in gains.items()
    }
    return {**rule, "chosen": chosen, "gains": gains, "summary": summary}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# FMN selection rules on {', '.join(report['tasks'])}",
        "",
        f"Checkpoints: `{report['checkpoints_dir']}`"
        + (f" (each task keeps its own {report['own_tensors']})" if report["own_tensors"] else "")
        + f"; validation capped at {report['max_eval_samples']} examples per "
        f"task; choices on the {report['choose_on']} split; gain = merged - plain average, points; "
        "wins (losses) of the "
        f"{report['rules'][0]['summary']['validation']['cells']} (pair, task) cells.",
        "",
        "| rule | validation gain | wins (losses) | holdout gain | wins (losses) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["rules"]:
        v, h = r["summary"]["validation"], r["summary"]["holdout"]
        lines.append(
            f"| {r['label']} | {v['mean_gain']:+.2f} | {v['wins']} ({v['losses']}) | {h['mean_gain']:+.2f} | "
            f"{h['wins']} ({h['losses']}) |"
        )
    first = report["rules"][0]
    lines += [
        "",
        f"Chosen per pair by `{first['label']}`: " + ", ".join(f"{pair} {c}" for pair, c in first["chosen"].items()),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoints_dir", required=True, help="folder with one fine-tuned checkpoint per task")
    ap.add_argument("--tasks", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="output folder (cells/ cache, rules.json, rules.md)")
    ap.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--normalizes", nargs="+", default=NORMALIZES, help="FMN normalizations the candidates use")
    ap.add_argument("--powers", type=float, nargs="+", default=POWERS)
    ap.add_argument("--scalings", type=float, nargs="+", default=SCALINGS)
    ap.add_argument(
        "--pairs",
        nargs="+",
        default=None,
        help="score only these pairs, e.g. rte+cola (default: every pair of --tasks; two processes "
        "with disjoint --pairs can share one --out)",
    )
    ap.add_argument("--max_eval_samples", type=int, default=500, help="validation cap per task (holdout: all rows)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--choose_on",
        choices=SPLITS,
        default="holdout",
        help="the split rules choose on (validation: the swapped estimate, to rules.choose_on_validation.*)",
    )
    ap.add_argument(
        "--own_tensors",
        nargs="*",
        default=[],
        help="glob patterns of body tensors each task keeps (e.g. '*.pooler.*'), the average too",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pairs = list(itertools.combinations(args.tasks, 2))
    if args.pairs:
        unknown = sorted(set(args.pairs) - {"+".join(p) for p in pairs})
        if unknown:
            raise SystemExit(
                f"fmn_rules: --pairs {unknown} are not pairs of --tasks in their order, e.g. {'+'.join(pairs[0])}"
            )
        pairs = [p for p in pairs if "+".join(p) in args.pairs]
    cells = score_cells(args, pairs)
    names = ["+".join(p) for p in pairs]
    report = {
        "checkpoints_dir": args.checkpoints_dir,
        "tasks": args.tasks,
        "max_eval_samples": args.max_eval_samples,
        "own_tensors": args.own_tensors,
        "choose_on": args.choose_on,
        "normalizes": args.normalizes,
        "powers": args.powers,
        "scalings": args.scalings,
        "rules": [compare(cells, names, r, args.choose_on) for r in rules(args.normalizes, args.powers, args.scalings)],
        "individual": {t: cells[(t, "individual")][t] for t in args.tasks},
    }
    out = Path(args.out)
    stem = "rules" if args.choose_on == "holdout" else f"rules.choose_on_{args.choose_on}"
    write_json(out / f"{stem}.json", report)
    atomic_write(out / f"{stem}.md", markdown(report))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
