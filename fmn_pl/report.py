"""Merge reports: `report.json` (everything), `report.md` (a table) and `report.png` (bars per task).

A merge report's `results` maps each task to {"merged", "individual", "average": metrics with `score`,
"normalized": merged score / individual score, "normalized_average": average / individual}. The merge builds
the report as a dict (`task_result`, `summary`); the pages are drawn from it read as a typed `MergeReport`
(`fmn_pl.merge_report`), as every later reader reads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from fmn_pl.files import atomic_write, save_figure, write_json
from fmn_pl.merge_report import MODELS, MergeReport, Summary, as_report


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


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "–" if x is None else f"{x * scale:.2f}"


def markdown(report: MergeReport | dict[str, Any]) -> str:
    """The report as Markdown: a table of scores (x100) per task plus a mean row, then method and timings."""
    report = as_report(report)
    lines = [f"# Merge report: {report.name}", "", *_intro_lines(report)]
    lines += [f"- {r}" for r in report.remarks]
    lines.append("")
    if report.results:
        lines += _table_lines(report)
        lines += _note_lines(report)
    else:
        lines.append("Not evaluated.")
    lines += _timing_lines(report)
    lines += _diagnostic_lines(report)
    return "\n".join(lines) + "\n"


def _intro_lines(report: MergeReport) -> list[str]:
    """The paragraphs above the table: tasks and method, how it was scored, what was left unmerged or chosen."""
    lines = [
        f"Tasks: {', '.join(report.tasks)}. Method `{report.method}` with options "
        f"`{json.dumps(report.options, sort_keys=True)}`."
    ]
    ev = report.evaluation
    if ev:
        cap = ev.max_samples
        lines.append(
            f"Scored on the `{ev.split}` split ({'all examples' if cap is None else f'at most {cap} examples'}"
            f" per task); score = mean of the task's metrics, x100; normalized = merged / individual (%)."
        )
    own = report.own_tensors
    if own:
        lines.append(
            f"Not merged: each task keeps its own {len(own.tensors)} tensors ({own.parameters:,} parameters) "
            f"matching {', '.join(f'`{p}`' for p in own.patterns)}, and so does the plain average."
        )
    return lines + _selection_lines(report)


def _selection_lines(report: MergeReport) -> list[str]:
    """What the selection split decided: the options chosen on it, or the coefficients adapted on its inputs."""
    lines = []
    sel = report.selection
    if sel and sel.evaluations:
        chosen = [
            f"{k.rsplit('_', 1)[0]} {k.rsplit('_', 1)[1]} {c.chosen} (of {c.grid})"  # fmn_power
            + (f", by {c.objective}" if c.objective else "")
            for k, c in report.chosen().items()
        ]
        lines.append(
            f"Options chosen on the `{sel.split}` split ({sel.evaluations} evaluations)"
            + (f": {', '.join(chosen)}." if chosen else ".")
        )
    if sel and sel.adapted:
        lines.append(
            f"Coefficients adapted on the unlabeled inputs of the `{sel.split}` split"
            + (" (transductive: the examples scored below)." if sel.transductive else ".")
        )
    return lines


def _table_lines(report: MergeReport) -> list[str]:
    """The score table (x100): one row per task and a mean row from the report's summary."""
    label = report.name
    lines = [
        f"| task | metrics | constant | individual | average | {label} | {label} / individual | "
        "average / individual | above constant |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in report.results.items():
        lines.append(
            f"| {task} | {', '.join(r.metric_names())} | "
            + " | ".join(_fmt(r.score(m)) for m in MODELS)
            + f" | {_fmt(r.normalized)} | {_fmt(r.normalized_average)} | {_fmt(r.above_baseline)} |"
        )
    s = report.summary or Summary()
    means = (s.baseline_score, s.individual_score, s.average_score, s.merged_score)
    lines.append(
        "| **mean** | | "
        + " | ".join(_fmt(x) for x in (*means, s.normalized, s.normalized_average, s.above_baseline))
        + " |"
    )
    return lines


def _note_lines(report: MergeReport) -> list[str]:
    """Below the table: what the constant column means, then each task's mean squared errors and flags."""
    label = report.name
    lines = [
        "",
        "Constant: the best constant prediction on the same examples (the majority class, or the "
        "label mean for regression), the score a model that learned nothing reaches. Above constant: "
        f"({label} - constant) / (individual - constant), the share of what the model learned that the "
        "merge keeps.",
    ]
    names = dict(zip(MODELS, ("constant", "individual", "average", label)))
    for task, r in report.results.items():
        if r.mse("individual") is not None:
            lines.append(
                f"- {task}: mean squared error "
                + ", ".join(f"{names[m]} {v:.3f}" for m in MODELS if (v := r.mse(m)) is not None)
            )
        lines += [f"- **{task}: {flag}**" for flag in r.flags]
    return lines


def _diagnostic_lines(report: MergeReport) -> list[str]:
    """The diagnostics section (task vectors, Fisher scale, prediction shares), when the report has one."""
    from fmn_pl.diagnostics import markdown_lines

    diag = report.diagnostics.to_dict() if report.diagnostics else {}
    return markdown_lines(diag) if diag else []


def _timing_lines(report: MergeReport) -> list[str]:
    """The closing line of stage timings and peak memory, when the report has timings."""
    if not report.timings:
        return []
    return [
        "",
        "Timings: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items() if isinstance(v, (int, float)))
        + (f"; peak RSS {report.peak_rss_mb:.0f} MB" if report.peak_rss_mb else "")
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


def plot(report: MergeReport | dict[str, Any], path: str | Path) -> Path | None:
    """Grouped bars per task (and the mean): individual, plain average, the method. None if not evaluated."""
    report = as_report(report)
    if not report.results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, s = list(report.results.values()), report.summary or Summary()
    series: dict[str, list[float | None]] = {
        "individual": [r.score("individual") for r in results] + [s.individual_score],
        "average": [r.score("average") for r in results] + [s.average_score],
        report.name: [r.score("merged") for r in results] + [s.merged_score],
    }
    names = [*report.results, "mean"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.6))
    grouped_bars(ax, names, series, "score (x100)", ncols=3, legend_y=-0.1)
    ax.set_title(f"{report.name}: {'+'.join(report.tasks)}")
    ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(folder: str | Path, report: MergeReport | dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and (when evaluated) report.png into `folder`; a dict (as the merge builds
    it) is read into a `MergeReport` once, so that what is written is what `MergeReport.read` reads."""
    folder, report = Path(folder), as_report(report)
    write_json(folder / "report.json", report.to_dict())
    md = atomic_write(folder / "report.md", markdown(report))
    written = [folder / "report.json", md]
    png = plot(report, folder / "report.png")
    return written + ([png] if png else [])
