"""FMN study (issue 8): a grid of Fisher and merge options over every pair of task checkpoints, scored against
the plain average on the holdout split (selection) and on the GLUE validation split (report).

    python research/fmn_study.py --checkpoints_dir runs/checkpoints --tasks cola sst2 mrpc stsb rte --out runs/study
    python research/fmn_study.py --print_grid > grid.yaml     # the default grid, to edit and pass as --grid

Inputs: one task checkpoint per task, <checkpoints_dir>/<task>/, fine-tuned with `data.holdout_samples` > 0
(the held-out training rows are the selection split). Nothing is fine-tuned and the checkpoints are not
written to: each artifact variant (mask Fisher with its options, full Fisher, Grams) is computed once per
task into a view of the checkpoint, <out>/views/<variant>/<task>/, which holds hard links to the checkpoint's
files (its own artifacts and evaluation cache left out; artifacts check the model*.safetensors fingerprint,
so they verify against the view). Merges are held in memory (`fmn_pl.merge.merge_body`), never saved.

Per combination of tasks (the 10 pairs of 5 tasks; `--combos all` adds the merge of all tasks), every merge
of the grid is scored with each task's own head on both splits, beside the individual checkpoints and the
plain average (computed once). Scores are points (score x 100); gain = merged - plain average on the same
(combination, task) cell; a win is a gain > 0. Selection protocol: among the FMN rows, the option with the
best mean holdout gain over the pair cells is chosen; its validation numbers are the reported result.

Outputs in <out>: study.json (also printed on stdout: settings, every cell, summaries, selection, costs),
study.md (the table), study.png (mean gain per option, gain per cell), cells/*.json (one file per
(option, combination): a rerun, or a grid with added options, computes only cells whose inputs changed).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from fmn_pl import KINDS, METHODS, CheckpointMeta, Evaluator, MergeMethod, method_class
from fmn_pl.artifacts import Artifact, artifact_path
from fmn_pl.checkpoint import weights_fingerprint
from fmn_pl.evaluate import CACHE_FILE, EvalData
from fmn_pl.files import atomic_write, save_figure, write_json
from fmn_pl.merging.fmn import REFERENCE
from fmn_pl.report import mean

VIEW_RECORD = "study_artifact.json"  # in a view: the options its artifact was computed with
BASELINES = ("individual", "average")
GOAL = {"mean_gain": 3.0, "wins_fraction": 0.75}  # issue 8: +3.0 points over the average, >= 15 of 20 cells

_MASK = {"num_examples": 512, "aggregation": "per_example", "labels": "empirical"}
DEFAULT_GRID: dict[str, Any] = {
    # Artifact variants: name -> `run_fisher` options (seed 0 unless given). The first mask variant is the default;
    # the others change one factor. Names are unique over all kinds (each names one view folder).
    "mask_fisher": {
        "n512": _MASK,
        "n128": {**_MASK, "num_examples": 128},
        "n2048": {**_MASK, "num_examples": 2048},
        "per_batch": {**_MASK, "aggregation": "per_batch"},
        "sampled": {**_MASK, "labels": "sampled"},
        "expected": {**_MASK, "labels": "expected"},
    },
    "full_fisher": {"full256": {"num_examples": 256}},
    "grams": {},
    # Merges: label, registered method, its options, and `artifact` (a variant of the kind the method needs;
    # default: the first of that kind). Options not given take the method's defaults (recorded resolved).
    "merges": [
        *(
            {
                "label": f"fmn {n}/{b}",
                "method": "fmn",
                "options": {**REFERENCE, "normalize": n, "broadcast": b},
                "artifact": "n512",
            }
            for b in ("reference", "per_node")
            for n in ("none", "mean", "type", "layer")
        ),
        *(
            {"label": f"fmn defaults [{v}]", "method": "fmn", "options": {}, "artifact": v}
            for v in ("n512", "n128", "n2048", "per_batch", "sampled", "expected")
        ),
        {"label": "task_arithmetic", "method": "task_arithmetic", "options": {"scaling": None}},
        {"label": "ties", "method": "ties", "options": {"scaling": None}},
        {"label": "fisher", "method": "fisher", "options": {}, "artifact": "full256"},
    ],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- grid


def load_grid(path: str | None, full_fisher_examples: int | None) -> dict[str, Any]:
    """The default grid with the keys a YAML/JSON file gives replaced, and `--full_fisher_examples` applied."""
    import yaml

    grid = json.loads(json.dumps(DEFAULT_GRID))
    if path:
        given = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(given, dict) or set(given) - set(grid):
            got = sorted(given) if isinstance(given, dict) else type(given).__name__
            raise ValueError(f"{path}: expected a mapping with keys among {sorted(grid)}, got {got}")
        grid.update(given)
    if full_fisher_examples is not None:
        grid["full_fisher"] = {f"full{full_fisher_examples}": {"num_examples": full_fisher_examples}}
        for m in grid["merges"]:
            if m.get("artifact") and m["method"] == "fisher":
                m["artifact"] = f"full{full_fisher_examples}"
    return grid


def check_grid(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """The merges of the grid, each checked and completed: `kind` (artifact kind or None), `artifact`, `resolved`
    (the options as the method records them). One-line errors name the entry."""
    names = [n for kind in KINDS for n in grid.get(kind) or {}]
    if len(names) != len(set(names)):
        raise ValueError(f"grid: artifact variant names must be unique over all kinds, got {names}")
    merges, labels = [], set()
    for j, m in enumerate(grid["merges"]):
        label = m.get("label")
        if not label or label in labels or label in BASELINES:
            raise ValueError(
                f"grid merges[{j}]: label {label!r} is missing, repeated or reserved ({', '.join(BASELINES)})"
            )
        labels.add(label)
        if m.get("method") not in METHODS:
            raise ValueError(
                f"grid merge {label!r}: unknown method {m.get('method')!r}; expected one of {', '.join(METHODS)}"
            )
        cls = method_class(m["method"])
        if cls.task_body is not MergeMethod.task_body:
            raise ValueError(
                f"grid merge {label!r}: method {m['method']} gives each task its own body; the study "
                "holds one merged body per combination"
            )
        try:
            method = cls(**(m.get("options") or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid merge {label!r}: bad options {m.get('options')}: {e}") from None
        kinds = [k for k in KINDS if k in cls.needs]
        kind = kinds[0] if kinds else None
        artifact = m.get("artifact")
        if kind is None and artifact is not None:
            raise ValueError(f"grid merge {label!r}: method {m['method']} uses no artifact, but artifact={artifact!r}")
        if kind is not None:
            variants = grid.get(kind) or {}
            artifact = artifact or next(iter(variants), None)
            if artifact not in variants:
                raise ValueError(
                    f"grid merge {label!r}: method {m['method']} needs a {kind} variant; "
                    f"{artifact!r} is not one of {sorted(variants)}"
                )
        merges.append(
            {
                "label": label,
                "method": m["method"],
                "options": dict(m.get("options") or {}),
                "kind": kind,
                "artifact": artifact,
                "resolved": json.loads(json.dumps(method.options(), default=str)),
            }
        )
    return merges


# ---------------------------------------------------------------------------------------------- artifacts in views


def make_view(src: Path, dst: Path) -> Path:
    """dst: hard links to every file of checkpoint `src` except artifacts and the evaluation cache (relinked when
    the checkpoint's file changed)."""
    from fmn_pl.merge_output import link_or_copy

    own = {k.file for k in KINDS.values()} | {CACHE_FILE, VIEW_RECORD}
    dst.mkdir(parents=True, exist_ok=True)
    wanted = {f.name for f in src.iterdir() if f.is_file() and f.name not in own and not f.name.startswith(".")}
    for f in dst.iterdir():
        if f.is_file() and f.name not in own and f.name not in wanted:
            f.unlink()
    for name in sorted(wanted):
        target = dst / name
        if target.exists() and os.path.samefile(src / name, target):
            continue
        target.unlink(missing_ok=True)
        link_or_copy(src / name, target, log)
    return dst


def ensure_artifact(view: Path, kind: str, options: dict[str, Any], data_dir: str, accelerator: str) -> bool:
    """The `kind` artifact of a view computed with `options`, unless its record and fingerprint match (then
    reused). True when it was computed now."""
    from fmn_pl import FisherConfig, run_fisher

    want = {
        "kind": kind,
        "options": options,
        "data_dir": str(Path(data_dir).resolve()) if Path(data_dir).exists() else data_dir,
    }
    record = view / VIEW_RECORD
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    art = None
    if recorded.get(kind) == want:
        try:
            art = Artifact(artifact_path(view, kind), kind, view)
        except (FileNotFoundError, ValueError):
            art = None
    if art is not None:
        return False
    record.unlink(missing_ok=True)
    trainer = {"accelerator": accelerator, "devices": 1, "enable_progress_bar": False}
    run_fisher(FisherConfig(str(view), KINDS[kind].cli, data_dir=data_dir, **{"seed": 0, **options}, trainer=trainer))
    write_json(record, {**recorded, kind: want})
    return True


def artifact_cost(view: Path, kind: str) -> dict[str, Any] | None:
    """{seconds, bytes, num_examples} of a view's artifact, from its header (None when absent)."""
    path = artifact_path(view, kind)
    if not path.is_file():
        return None
    meta = Artifact(path, kind).metadata
    return {
        "kind": kind,
        "seconds": meta.get("seconds"),
        "bytes": path.stat().st_size,
        "num_examples": meta.get("num_examples"),
    }


# ---------------------------------------------------------------------------------------------- the study


class Study:
    """Checkpoints, evaluators (tokenized data kept for the whole run), and the cell cache."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.tasks = list(args.tasks)
        self.checkpoints = {t: Path(args.checkpoints_dir) / t for t in self.tasks}
        for t, c in self.checkpoints.items():
            meta = CheckpointMeta.read(c)
            if meta.task != t:
                raise ValueError(f"{c} is a {meta.task!r} checkpoint, not {t!r}")
            if meta.data.holdout_samples <= 0:
                raise ValueError(
                    f"{c} held out no training rows (data.holdout_samples is 0): the study selects on "
                    "them; fine-tune with --data.holdout_samples N"
                )
        paths = [self.checkpoints[t] for t in self.tasks]
        self.evaluators = {
            "validation": Evaluator(
                paths,
                EvalData(args.data_dir, "validation", args.max_eval_samples, args.batch_size),
                args.accelerator,
                progress=False,
            ),
            "holdout": Evaluator(
                paths,
                EvalData(args.data_dir, "holdout", args.selection_samples, args.batch_size),
                args.accelerator,
                progress=False,
            ),
        }
        self.fingerprints = {t: weights_fingerprint(c) for t, c in self.checkpoints.items()}
        self.checked: set[tuple[str, str]] = set()  # (variant, task) artifacts checked in this run
        self.computed = {"cells": 0, "artifacts": 0}
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()

    def elapsed(self) -> str:
        return f"[{time.perf_counter() - self.start:8.1f} s]"

    def view(self, merge: dict[str, Any], task: str) -> Path:
        """The checkpoint of `task` with the merge's artifact variant beside it (computed on first use)."""
        if merge["kind"] is None:
            return self.checkpoints[task]
        name, kind = merge["artifact"], merge["kind"]
        view = make_view(self.checkpoints[task], self.out / "views" / name / task)
        if (name, task) not in self.checked:
            self.checked.add((name, task))
            t0 = time.perf_counter()
            if ensure_artifact(view, kind, self.args.grid[kind][name], self.args.data_dir, self.args.accelerator):
                self.computed["artifacts"] += 1
                cost = artifact_cost(view, kind) or {}
                log(
                    f"{self.elapsed()} {kind} {name} {task}: {cost.get('seconds')} s, {cost.get('bytes')} bytes "
                    f"({time.perf_counter() - t0:.1f} s with loading)"
                )
        return view

    def costs(self, merges: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """{variant: {task: cost}} of the artifacts the merges use (read from the views' artifact headers)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for m in merges:
            for t in self.tasks if m["kind"] else ():
                cost = artifact_cost(self.out / "views" / m["artifact"] / t, m["kind"])
                if cost is not None:
                    out.setdefault(m["artifact"], {})[t] = cost
        return out

    def identity(self, merge: dict[str, Any] | None, combo: tuple[str, ...]) -> dict[str, Any]:
        """Everything a cell's scores depend on: the merge (resolved options, artifact options), the checkpoints'
        weights, both splits' data, the base model argument."""
        ev = {s: [e.identity(e.tasks.index(t)) for t in combo] for s, e in self.evaluators.items()}
        ident: dict[str, Any] = {
            "combo": list(combo),
            "fingerprints": [self.fingerprints[t] for t in combo],
            "data": ev,
        }
        if merge is None:
            ident["baseline"] = "individual" if len(combo) == 1 else "average"
        else:
            ident["merge"] = {k: merge[k] for k in ("method", "resolved", "kind")}
            ident["artifact"] = None if merge["kind"] is None else self.args.grid[merge["kind"]][merge["artifact"]]
            ident["base"] = self.args.base
        return ident

    def cell(self, label: str, combo: tuple[str, ...], merge: dict[str, Any] | None) -> dict[str, Any]:
        """Scores of one (option, combination) on both splits: cached in cells/, computed when absent or stale."""
        from fmn_pl.merge import merge_body
        from fmn_pl.merging.average import Average
        from fmn_pl.options import SelectionOptions

        ident = self.identity(merge, combo)
        key = digest(ident)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
        path = self.out / "cells" / f"{slug}-{digest(label)[:6]}__{'+'.join(combo)}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached
        if self.args.cached_only:
            return None
        t0 = time.perf_counter()
        notes: dict[str, Any] = {}
        body = None
        if label == "average":
            body = merge_body([self.checkpoints[t] for t in combo], Average(), evaluator=self.evaluators["holdout"])
        elif merge is not None:
            method = method_class(merge["method"])(**merge["options"])
            views = [self.view(merge, t) for t in combo]
            t0 = time.perf_counter()
            body = merge_body(
                views,
                method,
                base=self.args.base,
                evaluator=self.evaluators["holdout"],
                selection=SelectionOptions(screen=None),  # every candidate on every holdout row, as the cells were
                notes=notes,
                accelerator=self.args.accelerator,
                log=lambda m: log(f"    {m}"),
            )
        t1 = time.perf_counter()
        scores = {
            t: {s: 100 * e.evaluate(e.tasks.index(t), body=body)["score"] for s, e in self.evaluators.items()}
            for t in combo
        }
        t2 = time.perf_counter()
        result = {
            "key": key,
            "label": label,
            "combo": list(combo),
            "scores": scores,
            "notes": notes,
            "merge_s": round(t1 - t0, 3),
            "eval_s": round(t2 - t1, 3),
            "identity": ident,
        }
        write_json(path, result)
        self.computed["cells"] += 1
        log(
            f"{self.elapsed()} {label:<24} {'+'.join(combo):<16} merge {t1 - t0:5.1f} s, eval {t2 - t1:5.1f} s: "
            + "; ".join(f"{t} val {v['validation']:.2f} hold {v['holdout']:.2f}" for t, v in scores.items())
        )
        return result


def combos(tasks: list[str], which: str) -> list[tuple[str, ...]]:
    out = list(itertools.combinations(tasks, 2))
    if which == "all" and len(tasks) > 2:
        out.append(tuple(tasks))
    return out


def summarize(cells: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per label, per split: mean score, mean gain over the average, wins (gain > 0) out of the cells."""
    out = {}
    for label in labels:
        rows = [c for c in cells if c["label"] == label]
        out[label] = {}
        for split in ("validation", "holdout"):
            gains = [c[f"gain_{split}"] for c in rows]
            out[label][split] = {
                "mean_score": sum(c[split] for c in rows) / len(rows),
                "mean_gain": sum(gains) / len(gains),
                "wins": sum(g > 0 for g in gains),
                "cells": len(rows),
            }
    return out


def pooled_summary(cells: list[dict[str, Any]], labels: list[str], pool: list[str] | None) -> dict[str, Any] | None:
    """The pair-cell summary of this study plus the pair cells of other studies' study.json (e.g. the same grid on
    checkpoints of another fine-tuning setting), so that one choice is made on every holdout cell; None if no pool."""
    if not pool:
        return None
    pooled = [c for c in cells if c["pair"]]
    for path in pool:
        other = json.loads(Path(path).read_text())
        pooled += [c for c in other["cells"] if c["pair"]]
    return summarize(pooled, [lb for lb in labels if any(c["label"] == lb for c in pooled)])


def select(
    summary: dict[str, dict[str, Any]], merges: list[dict[str, Any]], pooled: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The FMN option with the best mean holdout gain (first in grid order on ties), with its validation numbers;
    the best on validation is shown for reference only (choosing on it would tune on the reported numbers).
    `pooled`: the summary of this study's cells plus other studies' (`--pool`), chosen on instead of `summary`."""
    on = pooled or summary
    fmn = [m for m in merges if m["method"] == "fmn" and m["label"] in summary]  # pooled has every such label
    if not fmn:
        return None
    most = max(on[m["label"]]["holdout"]["cells"] for m in fmn)
    fmn = [m for m in fmn if on[m["label"]]["holdout"]["cells"] == most]  # compare rows on the same cells
    chosen = max(fmn, key=lambda m: on[m["label"]]["holdout"]["mean_gain"])
    oracle = max(fmn, key=lambda m: summary[m["label"]]["validation"]["mean_gain"])
    v = summary[chosen["label"]]["validation"]
    out = {
        "chosen": chosen["label"],
        "method": chosen["method"],
        "options": chosen["resolved"],
        "artifact": chosen["artifact"],
        "selected_on": "holdout" if pooled is None else "holdout, pooled",
        "holdout": on[chosen["label"]]["holdout"],
        "validation": v,
        "goal": GOAL,
        "goal_met": v["mean_gain"] >= GOAL["mean_gain"] and v["wins"] >= GOAL["wins_fraction"] * v["cells"],
        "best_on_validation_for_reference": oracle["label"],
    }
    if pooled is not None:
        out["pooled_validation"] = on[chosen["label"]]["validation"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.grid = load_grid(args.grid_file, args.full_fisher_examples)
    merges = check_grid(args.grid)
    if args.merges:
        merges = [m for m in merges if any(m["label"] == p or fnmatch.fnmatchcase(m["label"], p) for p in args.merges)]
    study = Study(args)
    todo = combos(study.tasks, args.combos)
    log(
        f"fmn study: {len(study.tasks)} tasks, {len(todo)} combinations, {len(merges)} merges "
        f"(+ individual and average) -> {args.out}"
    )

    results: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for t in study.tasks:
        results[("individual", (t,))] = study.cell("individual", (t,), None)
    for combo in todo:
        results[("average", combo)] = study.cell("average", combo, None)
    for m in merges:
        for combo in todo:
            results[(m["label"], combo)] = study.cell(m["label"], combo, m)

    missing = {k for k, v in results.items() if v is None}  # --cached_only: cells never computed
    if any(k[0] in BASELINES for k in missing):
        raise ValueError(f"--cached_only: baseline cells missing for {sorted({'+'.join(k[1]) for k in missing})}")
    labels = [
        *BASELINES,
        *(m["label"] for m in merges if any(k[0] == m["label"] and k not in missing for k in results)),
    ]
    by_label = {m["label"]: m for m in merges}
    cells = []
    for combo in todo:
        for label in labels:
            if (label, combo) in missing:
                continue
            r = results[(label, (combo[0],))] if label == "individual" else results[(label, combo)]
            for t in combo:
                s = results[("individual", (t,))]["scores"][t] if label == "individual" else r["scores"][t]
                avg = results[("average", combo)]["scores"][t]
                m = by_label.get(label)
                cells.append(
                    {
                        "label": label,
                        "method": m["method"] if m else label,
                        "options": m["resolved"] if m else None,
                        "artifact": m["artifact"] if m else None,
                        "combo": "+".join(combo),
                        "pair": len(combo) == 2,
                        "task": t,
                        "validation": s["validation"],
                        "holdout": s["holdout"],
                        "average_validation": avg["validation"],
                        "average_holdout": avg["holdout"],
                        "gain_validation": s["validation"] - avg["validation"],
                        "gain_holdout": s["holdout"] - avg["holdout"],
                        "merge_s": None if label == "individual" else r["merge_s"],
                        "notes": r["notes"] if m else None,
                    }
                )
    summary = {"pairs": summarize([c for c in cells if c["pair"]], labels)}
    if any(not c["pair"] for c in cells):
        summary["all"] = summarize([c for c in cells if not c["pair"]], labels)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "grid"},
        "grid": args.grid,
        "unit": "points (score x 100); gain = score - plain average on the same (combination, task); win = gain > 0",
        "tasks": study.tasks,
        "checkpoints": {t: str(c) for t, c in study.checkpoints.items()},
        "fingerprints": study.fingerprints,
        "data": {s: e.data.identity() for s, e in study.evaluators.items()},
        "summary": summary,
        "selection": select(summary["pairs"], merges, pooled_summary(cells, labels, args.pool)),
        "pooled_from": args.pool or [],
        "costs": {
            "artifacts": study.costs(merges),
            "merge_s": {
                lb: mean([c["merge_s"] for c in cells if c["label"] == lb and c["merge_s"] is not None])
                for lb in labels
                if lb != "individual"
            },
        },
        "computed": study.computed,
        "elapsed_s": round(time.perf_counter() - study.start, 1),
        "cells": cells,
    }
    out = Path(args.out)
    write_json(out / "study.json", report)
    atomic_write(out / "study.md", markdown(report, merges))
    plot(report, labels, out / "study.png")
    log(
        f"{study.elapsed()} wrote {out / 'study.json'}, study.md, study.png (computed {study.computed['cells']} cells, "
        f"{study.computed['artifacts']} artifacts)"
    )
    return report


# ---------------------------------------------------------------------------------------------- outputs


def _describe(m: dict[str, Any] | None) -> str:
    if m is None:
        return ""
    shown = ("normalize", "broadcast") if m["method"] == "fmn" else ()
    opts = ", ".join(f"{k}={v}" for k, v in m["resolved"].items() if k in m["options"] or k in shown)
    return f"{m['method']}({opts})" + (f" on {m['artifact']}" if m["artifact"] else "")


def markdown(report: dict[str, Any], merges: list[dict[str, Any]]) -> str:
    """The options x cells table (validation and holdout), the per-cell gains, the selection, the costs."""
    by_label = {m["label"]: m for m in merges}
    grid = report["grid"]
    ev = report["data"]
    cap = lambda d: "all" if d["max_samples"] is None else f"at most {d['max_samples']}"  # noqa: E731
    lines = [
        "# FMN study",
        "",
        f"Tasks {', '.join(report['tasks'])}; scores x100 with each task's own head; gain = score - plain average "
        "on the same (combination, task) cell; wins = cells with gain > 0. Validation: the GLUE validation split "
        f"({cap(ev['validation'])} examples per task), the reported numbers. Holdout: the training rows each "
        f"checkpoint held out ({cap(ev['holdout'])} per task), the selection split.",
        "",
    ]
    for group, summ in report["summary"].items():
        n = next(iter(summ.values()))["validation"]["cells"]
        lines += [
            f"## {'Pairs' if group == 'pairs' else 'All tasks merged'} ({n} cells)",
            "",
            "| option | method | val score | val gain | val wins | holdout score | holdout gain | holdout wins "
            "| merge s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, s in summ.items():
            v, h = s["validation"], s["holdout"]
            ms = report["costs"]["merge_s"].get(label)
            lines.append(
                f"| {label} | {_describe(by_label.get(label))} | {v['mean_score']:.2f} | {v['mean_gain']:+.2f} | "
                f"{v['wins']}/{v['cells']} | {h['mean_score']:.2f} | {h['mean_gain']:+.2f} | "
                f"{h['wins']}/{h['cells']} | "
                f"{'' if ms is None else f'{ms:.1f}'} |"
            )
        lines.append("")
    sel = report["selection"]
    if sel:
        v, h = sel["validation"], sel["holdout"]
        where = (
            "the pair cells"
            if not report.get("pooled_from")
            else f"the pair cells of this study and of {', '.join(report['pooled_from'])}"
        )
        lines += [
            "## Selection",
            "",
            f"Chosen on holdout (best mean holdout gain among the FMN rows over {where}): **{sel['chosen']}** "
            f"({_describe(by_label[sel['chosen']])}): holdout gain {h['mean_gain']:+.2f}, "
            f"{h['wins']}/{h['cells']} wins; "
            f"validation score {v['mean_score']:.2f}, gain {v['mean_gain']:+.2f}, {v['wins']}/{v['cells']} wins. "
            f"Goal (gain >= {GOAL['mean_gain']:+.1f} and wins >= {GOAL['wins_fraction']:.0%} of cells on validation): "
            f"{'met' if sel['goal_met'] else 'not met'}. For reference only, the best FMN row on validation: "
            f"{sel['best_on_validation_for_reference']}."
            + (
                ""
                if "pooled_validation" not in sel
                else f" Over the pooled cells, validation gain {sel['pooled_validation']['mean_gain']:+.2f}, "
                f"{sel['pooled_validation']['wins']}/{sel['pooled_validation']['cells']} wins."
            ),
            "",
        ]
    pair_cells = [c for c in report["cells"] if c["pair"]]
    keys = list(dict.fromkeys((c["combo"], c["task"]) for c in pair_cells))
    if keys:
        lines += [
            "## Validation gain per pair cell",
            "",
            "| option | " + " | ".join(f"{combo}: {task}" for combo, task in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        gains = {(c["label"], c["combo"], c["task"]): c["gain_validation"] for c in pair_cells}
        score = {(c["combo"], c["task"]): c["average_validation"] for c in pair_cells}
        lines.append("| average (score) | " + " | ".join(f"{score[k]:.2f}" for k in keys) + " |")
        for label in report["summary"]["pairs"]:
            if label != "average":
                lines.append(
                    f"| {label} | "
                    + " | ".join(f"{gains[(label, *k)]:+.2f}" if (label, *k) in gains else "" for k in keys)
                    + " |"
                )
        lines.append("")
    costs = report["costs"]["artifacts"]
    if costs:
        lines += [
            "## Artifact cost (per task)",
            "",
            "| variant | kind | options | " + " | ".join(report["tasks"]) + " | mean s | bytes |",
            "|---|---|---|" + "---:|" * (len(report["tasks"]) + 2),
        ]
        for name, per_task in costs.items():
            kind = next(iter(per_task.values()))["kind"]
            secs = [per_task[t]["seconds"] for t in report["tasks"] if t in per_task]
            cells = " | ".join("" if t not in per_task else f"{per_task[t]['seconds']:.1f} s" for t in report["tasks"])
            size = max(c["bytes"] for c in per_task.values())
            lines.append(
                f"| {name} | {kind} | {json.dumps(grid[kind][name], sort_keys=True)} | {cells} | "
                f"{sum(secs) / len(secs):.1f} | {size:,} |"
            )
        lines.append("")
    lines.append(
        f"Study time {report['elapsed_s']} s (this run computed {report['computed']['cells']} cells and "
        f"{report['computed']['artifacts']} artifacts; the rest came from cells/ and views/)."
    )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], labels: list[str], path: Path) -> Path:
    """Left: mean gain over the average per option (validation and holdout, pair cells). Right: validation gain of
    every (option, pair cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = report["summary"]["pairs"]
    rows = [lb for lb in labels if lb != "average"]
    cells = [c for c in report["cells"] if c["pair"]]
    keys = list(dict.fromkeys((c["combo"], c["task"]) for c in cells))
    gain = {(c["label"], c["combo"], c["task"]): c["gain_validation"] for c in cells}
    matrix = [[gain.get((lb, *k), float("nan")) for k in keys] for lb in rows]  # nan: a cell not computed
    fig, (ax1, ax2) = plt.subplots(
        1,
        2,
        figsize=(6 + 0.45 * len(keys), 1.2 + 0.32 * len(rows)),
        gridspec_kw={"width_ratios": [1, max(1.0, len(keys) / 8)]},
    )
    ys = range(len(rows))
    for k, split in enumerate(("validation", "holdout")):
        ax1.barh([y + (k - 0.5) * 0.4 for y in ys], [summ[lb][split]["mean_gain"] for lb in rows], 0.4, label=split)
    ax1.set_yticks(list(ys), rows, fontsize="small")
    ax1.invert_yaxis()
    ax1.axvline(0, color="black", linewidth=0.5)
    ax1.axvline(GOAL["mean_gain"], color="grey", linewidth=0.5, linestyle="--")
    ax1.set_xlabel("mean gain over average (points)")
    ax1.legend(fontsize="small", loc="best")
    lim = max((abs(x) for row in matrix for x in row), default=1.0) or 1.0
    im = ax2.imshow(matrix, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax2.set_yticks(list(ys), rows, fontsize="small")
    ax2.set_xticks(range(len(keys)), [f"{c}: {t}" for c, t in keys], rotation=90, fontsize="x-small")
    ax2.set_title("validation gain per pair cell (points)", fontsize="small")
    fig.colorbar(im, ax=ax2, fraction=0.03)
    return save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoints_dir", default="runs/checkpoints", help="task checkpoints <dir>/<task>/")
    p.add_argument("--tasks", nargs="+", default=["cola", "sst2", "mrpc", "stsb", "rte"])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--data_dir", default="../shared/data/glue", help="GLUE data (parquet/TSV folder or hub name)")
    p.add_argument(
        "--base", default=None, help="pretrained model for task-vector methods (default: the checkpoints' record)"
    )
    p.add_argument("--max_eval_samples", type=int, default=None, help="cap on validation examples per task (None: all)")
    p.add_argument("--selection_samples", type=int, default=None, help="cap on holdout examples per task (None: all)")
    p.add_argument("--batch_size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator for Fisher passes and evaluation")
    p.add_argument(
        "--combos",
        choices=("pairs", "all"),
        default="pairs",
        help="pairs: every pair of tasks; all: the pairs and the merge of all tasks",
    )
    p.add_argument(
        "--grid",
        dest="grid_file",
        default=None,
        help="YAML/JSON file replacing keys of the default grid (mask_fisher, full_fisher, grams, merges)",
    )
    p.add_argument(
        "--merges",
        nargs="+",
        default=None,
        help="only the merges whose label equals or matches (fnmatch glob) one of these",
    )
    p.add_argument(
        "--full_fisher_examples", type=int, default=None, help="examples of the full Fisher (default grid: 256)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--pool",
        nargs="+",
        default=None,
        metavar="STUDY_JSON",
        help="other studies' study.json whose pair cells join the holdout selection (e.g. other checkpoints)",
    )
    p.add_argument("--print_grid", action="store_true", help="print the grid as YAML and exit")
    p.add_argument(
        "--cached_only",
        action="store_true",
        help="compute nothing: report the cells already in <out>/cells (a row over the cells it has)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.print_grid:
        import yaml

        print(yaml.safe_dump(load_grid(args.grid_file, args.full_fisher_examples), sort_keys=False), end="")
        return None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # stage messages to stderr: stdout carries the JSON only
        report = run(args)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(
            f"fmn_study: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
