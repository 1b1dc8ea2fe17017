"""Merge reports: `report.json` (everything), `report.md` (a table) and `report.png` (bars per task).

A merge report's `results` maps each task to {"merged", "individual", "average": metrics with `score`,
"normalized": merged score / individual score, "normalized_average": average / individual}. `rows`
flattens one report into table rows, so a study's combined report can stack many of them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from fmn_pl.files import atomic_write, save_figure, write_json
from fmn_pl.tasks import SCALE_METRICS


def noise_margin(n: int) -> float:
    """How far above its baseline a score must be to count as learned on n examples: 1/sqrt(n), about two
    standard errors of an accuracy near 50% and one of a correlation near 0."""
    return 1.0 / math.sqrt(max(n, 1))


def normalized(score: float | None, reference: float | None) -> float | None:
    """score / reference, or None when the reference is not positive (e.g. a CoLA MCC of 0)."""
    if score is None or reference is None or reference <= 0:
        return None
    return score / reference


def task_result(
    merged: dict[str, float] | None,
    individual: dict[str, float] | None,
    average: dict[str, float] | None,
    baseline: dict[str, float] | None = None,
    examples: int | None = None,
) -> dict[str, Any]:
    """One task's entry of `results`, with the constant-prediction `baseline` on the same `examples` and the
    competence flags they raise (`flags`)."""

    def score(m: dict[str, float] | None) -> float | None:
        return None if m is None else m.get("score")

    entry: dict[str, Any] = {
        "merged": merged,
        "individual": individual,
        "average": average,
        "normalized": normalized(score(merged), score(individual)),
        "normalized_average": normalized(score(average), score(individual)),
    }
    if baseline is not None:
        b: float = baseline["score"]
        entry |= {
            "baseline": baseline,
            "examples": examples,
            "above_baseline": normalized(
                None if (m := score(merged)) is None else m - b,
                None if (i := score(individual)) is None else i - b,
            ),
            "flags": competence_flags(entry, baseline, examples),
        }
    return entry


def competence_flags(entry: dict[str, Any], baseline: dict[str, float], examples: int | None) -> list[str]:
    """Why a score in `entry` should not be read as learning: a model within noise of the constant-prediction
    baseline, or (regression) a model whose mean squared error is above the constant prediction's."""
    flags = []
    margin = noise_margin(examples or 1)
    for which in ("individual", "merged", "average"):
        m = entry.get(which)
        if not m or m.get("score") is None:
            continue
        if m["score"] - baseline["score"] < margin:
            flags.append(
                f"{which} scores {100 * m['score']:.1f}, not clearly above the constant prediction's "
                f"{100 * baseline['score']:.1f} (noise margin {100 * margin:.1f} on {examples} examples)"
            )
        if "mse" in m and "mse" in baseline and m["mse"] > baseline["mse"]:
            flags.append(
                f"{which} is off scale: mean squared error {m['mse']:.2f} above the constant prediction's "
                f"{baseline['mse']:.2f} (predictions {m['pred_mean']:.2f} +- {m['pred_std']:.2f}, labels "
                f"{m['label_mean']:.2f} +- {m['label_std']:.2f})"
            )
    return flags


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summary(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Means over tasks of the scores and normalized scores."""
    pick = lambda r, k: None if r.get(k) is None else r[k].get("score")  # noqa: E731
    return {
        "merged_score": mean([pick(r, "merged") for r in results.values()]),
        "individual_score": mean([pick(r, "individual") for r in results.values()]),
        "average_score": mean([pick(r, "average") for r in results.values()]),
        "normalized": mean([r.get("normalized") for r in results.values()]),
        "normalized_average": mean([r.get("normalized_average") for r in results.values()]),
        "baseline_score": mean([pick(r, "baseline") for r in results.values()]),
        "above_baseline": mean([r.get("above_baseline") for r in results.values()]),
    }


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: method, task, metric names, the three scores and both normalized scores."""
    out = []
    for task, r in report.get("results", {}).items():
        metrics = [
            k
            for k in (r.get("merged") or r.get("individual") or {})
            if not k.endswith("score") and k.rpartition("/")[2] not in SCALE_METRICS
        ]
        out.append(
            {
                "method": report.get("method"),
                "label": report.get("label") or report.get("method"),
                "task": task,
                "metrics": metrics,
                **{k: (r.get(k) or {}).get("score") for k in ("baseline", "individual", "average", "merged")},
                "mse": {k: (r.get(k) or {}).get("mse") for k in ("baseline", "individual", "average", "merged")},
                "normalized": r.get("normalized"),
                "normalized_average": r.get("normalized_average"),
                "above_baseline": r.get("above_baseline"),
                "flags": r.get("flags", []),
            }
        )
    return out


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "–" if x is None else f"{x * scale:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a table of scores (x100) per task plus a mean row, then method and timings."""
    label = report.get("label") or report.get("method")
    lines = [f"# Merge report: {label}", "", *_intro_lines(report)]
    lines += [f"- {r}" for r in report.get("remarks", [])]
    lines.append("")
    table = rows(report)
    if table:
        lines += _table_lines(report, table, label)
        lines += _note_lines(table, label)
    else:
        lines.append("Not evaluated.")
    lines += _timing_lines(report)
    lines += _diagnostic_lines(report)
    return "\n".join(lines) + "\n"


def _intro_lines(report: dict[str, Any]) -> list[str]:
    """The paragraphs above the table: tasks and method, how it was scored, what was left unmerged or chosen."""
    lines = [
        f"Tasks: {', '.join(report.get('tasks', []))}. Method `{report.get('method')}` with options "
        f"`{json.dumps(report.get('options', {}), sort_keys=True)}`."
    ]
    ev = report.get("evaluation")
    if ev:
        cap = ev.get("max_samples")
        lines.append(
            f"Scored on the `{ev.get('split')}` split ({'all examples' if cap is None else f'at most {cap} examples'}"
            f" per task); score = mean of the task's metrics, x100; normalized = merged / individual (%)."
        )
    own = report.get("own_tensors")
    if own:
        lines.append(
            f"Not merged: each task keeps its own {len(own['tensors'])} tensors ({own['parameters']:,} parameters) "
            f"matching {', '.join(f'`{p}`' for p in own['patterns'])}, and so does the plain average."
        )
    return lines + _selection_lines(report)


def _selection_lines(report: dict[str, Any]) -> list[str]:
    """What the selection split decided: the options chosen on it, or the coefficients adapted on its inputs."""
    lines = []
    sel = report.get("selection")
    if sel and sel.get("evaluations"):
        notes = report.get("notes") or {}
        keys = report.get("choices")  # the methods' `ctx.choose`; reports from before it: notes shaped as choices
        keys = keys if keys is not None else [k for k, v in notes.items() if isinstance(v, dict) and "grid" in v]
        chosen = [
            f"{k.rsplit('_', 1)[0]} {k.rsplit('_', 1)[1]} {notes[k]['chosen']} (of {notes[k]['grid']})"  # fmn_power
            + (f", by {notes[k]['objective']}" if notes[k].get("objective") else "")
            for k in keys
        ]
        lines.append(
            f"Options chosen on the `{sel.get('split')}` split ({sel.get('evaluations')} evaluations)"
            + (f": {', '.join(chosen)}." if chosen else ".")
        )
    if sel and sel.get("adapted"):
        lines.append(
            f"Coefficients adapted on the unlabeled inputs of the `{sel.get('split')}` split"
            + (" (transductive: the examples scored below)." if sel.get("transductive") else ".")
        )
    return lines


def _table_lines(report: dict[str, Any], table: list[dict[str, Any]], label: str | None) -> list[str]:
    """The score table (x100): one row per task and a mean row from the report's summary."""
    lines = [
        f"| task | metrics | constant | individual | average | {label} | {label} / individual | "
        "average / individual | above constant |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['task']} | {', '.join(r['metrics'])} | {_fmt(r['baseline'])} | {_fmt(r['individual'])} | "
            f"{_fmt(r['average'])} | {_fmt(r['merged'])} | {_fmt(r['normalized'])} | "
            f"{_fmt(r['normalized_average'])} | {_fmt(r['above_baseline'])} |"
        )
    s = report.get("summary", {})
    lines.append(
        f"| **mean** | | {_fmt(s.get('baseline_score'))} | {_fmt(s.get('individual_score'))} | "
        f"{_fmt(s.get('average_score'))} | {_fmt(s.get('merged_score'))} | {_fmt(s.get('normalized'))} | "
        f"{_fmt(s.get('normalized_average'))} | {_fmt(s.get('above_baseline'))} |"
    )
    return lines


def _note_lines(table: list[dict[str, Any]], label: str | None) -> list[str]:
    """Below the table: what the constant column means, then each task's mean squared errors and flags."""
    lines = [
        "",
        "Constant: the best constant prediction on the same examples (the majority class, or the "
        "label mean for regression), the score a model that learned nothing reaches. Above constant: "
        f"({label} - constant) / (individual - constant), the share of what the model learned that the "
        "merge keeps.",
    ]
    for r in table:
        mse = r["mse"]
        if mse.get("individual") is not None:
            lines.append(
                f"- {r['task']}: mean squared error "
                + ", ".join(
                    f"{k} {v:.3f}"
                    for k, v in (
                        ("constant", mse["baseline"]),
                        ("individual", mse["individual"]),
                        ("average", mse["average"]),
                        (label, mse["merged"]),
                    )
                    if v is not None
                )
            )
        lines += [f"- **{r['task']}: {flag}**" for flag in r["flags"]]
    return lines


def _diagnostic_lines(report: dict[str, Any]) -> list[str]:
    """The diagnostics section (task vectors, Fisher scale, prediction shares), when the report has one."""
    from fmn_pl.diagnostics import markdown_lines

    return markdown_lines(report["diagnostics"]) if report.get("diagnostics") else []


def _timing_lines(report: dict[str, Any]) -> list[str]:
    """The closing line of stage timings and peak memory, when the report has timings."""
    t = report.get("timings", {})
    if not t:
        return []
    return [
        "",
        "Timings: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if isinstance(v, (int, float)))
        + (f"; peak RSS {report['peak_rss_mb']:.0f} MB" if report.get("peak_rss_mb") else "")
        + ".",
    ]


def grouped_bars(
    ax: Any,
    groups: list[str],
    series: dict[str, list[float | None]],
    ylabel: str,
    ncols: int | None = None,
    legend_y: float = -0.12,
) -> None:
    """Grouped bars (values x100, None as 0), one colour per series, legend below in `ncols` columns (default:
    up to 4): the bar chart of a merge's report and of the pipeline's combined report."""
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [0 if v is None else 100 * v for v in values], width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(
        fontsize="small",
        ncols=min(4, len(series)) if ncols is None else ncols,
        loc="upper center",
        bbox_to_anchor=(0.5, legend_y),
        frameon=False,
    )


def plot(report: dict[str, Any], path: str | Path) -> Path | None:
    """Grouped bars per task (and the mean): individual, plain average, the method. None if not evaluated."""
    table = rows(report)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = str(report.get("label") or report.get("method"))
    s = report.get("summary", {})
    names = [r["task"] for r in table] + ["mean"]
    series: dict[str, list[float | None]] = {
        "individual": [r["individual"] for r in table] + [s.get("individual_score")],
        "average": [r["average"] for r in table] + [s.get("average_score")],
        label: [r["merged"] for r in table] + [s.get("merged_score")],
    }
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.6))
    grouped_bars(ax, names, series, "score (x100)", ncols=3, legend_y=-0.1)
    ax.set_title(f"{label}: {'+'.join(report.get('tasks', []))}")
    ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(folder: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and (when evaluated) report.png into `folder`."""
    folder = Path(folder)
    write_json(folder / "report.json", report)
    md = atomic_write(folder / "report.md", markdown(report))
    written = [folder / "report.json", md]
    png = plot(report, folder / "report.png")
    return written + ([png] if png else [])
