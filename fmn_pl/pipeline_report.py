"""The pipeline's combined report: every merge's per-task scores beside the constant baselines and the
individual models, means per combination, stage costs; as JSON, Markdown and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from fmn_pl.files import atomic_write, save_figure, write_json
from fmn_pl.pipeline_config import PipelineConfig, artifact_kinds
from fmn_pl.pipeline_results import (
    COST_KINDS,
    ArtifactFacts,
    CheckpointFacts,
    Means,
    PipelineReport,
    ReportOptions,
    ResultRow,
    StageCost,
    known_keys,
    score_columns,
)
from fmn_pl.stages import Stage, plan, read_stamp, report_options, stamp_path

# ---------------------------------------------------------------------------------------------- report


def gather(cfg: PipelineConfig, partial: bool = False) -> PipelineReport:
    """The combined report as data: per-task scores of every merge, means per combination, stage costs.
    `partial`: leave out merges not run yet (a look at a run in progress) instead of failing on them."""
    stages = plan(cfg)
    opts = ReportOptions.from_dict(report_options(cfg), "the report stage's options")
    labels = list(dict.fromkeys(["average", *(c.label for c in opts.columns)]))
    table, flags = _merge_results(stages, partial)
    columns = score_columns(labels)
    summary = {
        combo: {col: Means.over([r for r in table if (r.combination, r.column) == (combo, col)]) for col in columns}
        for combo in opts.combinations
    }
    costs = _stage_costs(cfg, stages)
    return PipelineReport(
        **{k: getattr(opts, k) for k in ReportOptions.hints()},
        extra=opts.extra,
        labels=labels,
        checkpoints=_checkpoints(cfg),
        results=table,
        summary=summary,
        flags=list(dict.fromkeys(flags)),
        overall={col: Means.over([s[col] for s in summary.values()]) for col in columns},
        stages=costs,
        cost_s=_per_kind(costs, lambda c: c.wall_s),
        cpu_s=_per_kind(costs, lambda c: c.cpu_s),
    )


def _merge_results(stages: list[Stage], partial: bool) -> tuple[list[ResultRow], list[str]]:
    """One row per (combination, task, column) from the merges' reports, and their flags and remarks (repeats
    kept): constant, individual and average are in every report of a combination, so they are kept once."""
    from fmn_pl.merge_report import MergeReport

    results: dict[tuple[str, str, str], ResultRow] = {}
    flags: list[str] = []
    for s in (s for s in stages if s.kind == "merge"):
        if partial and not s.output.is_file():
            continue
        rep = MergeReport.read(s.output)
        combo, label = "+".join(s.options["tasks"]), s.options["label"]
        for task, r in rep.results.items():  # constant, individual, average: in every report of a combination
            metrics = r.metric_names()
            for column, which, norm in (
                ("constant", "baseline", None),
                ("individual", "individual", 1.0),
                ("average", "average", r.normalized_average),
                (label, "merged", r.normalized),
            ):
                results.setdefault(
                    (combo, task, column),
                    ResultRow(
                        combination=combo,
                        task=task,
                        metrics=metrics,
                        column=column,
                        score=r.score(which),
                        normalized=norm,
                        mse=r.mse(which),
                    ),
                )
            own = [f for f in r.flags if f.startswith(("individual", "average"))]
            flags += [f"{combo} {label}: {task}: {f}" for f in r.flags if f not in own]
            flags += [f"{combo}: {task}: {f}" for f in own]
        flags += [f"{combo} {label}: {remark}" for remark in rep.remarks]
    return list(results.values()), flags


def _stage_costs(cfg: PipelineConfig, stages: list[Stage]) -> list[StageCost]:
    """What each stage but the report cost, as its stamp recorded it (None where it has no stamp yet)."""
    costs = []
    for s in stages:
        if s.kind != "report":
            path = stamp_path(cfg, s)
            costs.append(StageCost.of(read_stamp(path), path, stage=s.id, kind=s.kind))
    return costs


def _per_kind(costs: list[StageCost], seconds: Callable[[StageCost], float | None]) -> dict[str, float]:
    """The stages' `seconds` (wall or CPU) summed per kind of stage, to a tenth."""
    return {k: round(sum(seconds(c) or 0 for c in costs if c.kind == k), 1) for k in COST_KINDS}


def _checkpoints(cfg: PipelineConfig) -> dict[str, CheckpointFacts]:
    """Per task: its checkpoint's training record and what each artifact was computed from, as they record it."""
    from fmn_pl.artifacts import Artifact, artifact_path
    from fmn_pl.checkpoint import read_metadata

    checkpoints = {}
    for t in cfg.tasks:
        folder = Path(cfg.output) / "checkpoints" / t
        artifacts = {  # what each artifact was computed from, as it records it
            k: known_keys(ArtifactFacts, Artifact(artifact_path(folder, k), k).metadata) for k in artifact_kinds(cfg)
        }
        checkpoints[t] = CheckpointFacts.of(read_metadata(folder), folder, artifacts=artifacts)
    return checkpoints


def _num(x: Optional[float], spec: str) -> str:
    """`x` formatted by `spec` (a dash for None)."""
    return "–" if x is None else format(x, spec)


def _pct(x: Optional[float]) -> str:
    """A share as a percentage to a tenth (a dash for None)."""
    return _num(None if x is None else 100 * x, ".1f")


def caps_text(report: PipelineReport) -> str:
    """One paragraph saying how much data each stage read (the caps of a quick run)."""
    caps = report.caps
    fit = "; ".join(
        f"{t} {c.num_train_examples or '?'} training examples"
        + (f" (capped at {caps.fit[t].max_train_samples})" if caps.fit[t].max_train_samples else " (all)")
        + f", {caps.fit[t].max_epochs} epoch(s)"
        for t, c in report.checkpoints.items()
    )

    def examples(kind: str) -> str:
        """The examples an artifact kind was computed on, as `32` or `32/64` where the tasks differ."""
        counts = sorted({str(c.artifacts[kind].num_examples) for c in report.checkpoints.values()})
        return "/".join(counts)

    fisher = ", ".join(f"{k} on {examples(k)} training examples per task" for k in caps.fisher)
    cap = caps.eval.max_eval_samples
    scored = (
        "all validation examples" if cap is None else f"at most {cap} validation examples per task (a seeded sample)"
    )
    return f"Fine-tuning: {fit}. Artifacts: {fisher or 'none'}. Scored on {scored}."


def report_markdown(report: PipelineReport) -> str:
    """The combined report as Markdown: normalized means per combination, per-task scores, stage costs."""
    lines = [
        "# fmn-pl pipeline report",
        "",
        f"Model `{report.model}`, data `{report.data_dir}`, tasks {', '.join(report.tasks)}; "
        f"{len(report.combinations)} task combination(s) merged with each method.",
        "",
        caps_text(report),
        "",
        *_normalized_lines(report),
        *_score_lines(report),
        *_mse_lines(report),
    ]
    if report.flags:
        lines += ["", "## Flags", "", *[f"- {f}" for f in report.flags]]
    lines += _cost_lines(report)
    lines += [
        "",
        "Plots: `plots/normalized.png`, `plots/scores-<tasks>.png`, `plots/cost.png`. Each merge's own "
        "report: `merges/<tasks>/<label>/report.md`.",
    ]
    return "\n".join(lines) + "\n"


def _normalized_lines(report: PipelineReport) -> list[str]:
    """The table of normalized scores per combination and method, with a mean row when there are several."""
    labels = report.labels
    lines = [
        "## Normalized score (merged / individual, %, mean over the merged tasks)",
        "",
        *_head(["tasks"], labels),
    ]
    for combo, cols in report.summary.items():
        lines.append(f"| {combo} | " + " | ".join(_pct(cols[c].normalized) for c in labels) + " |")
    if len(report.summary) > 1:
        lines.append("| **mean** | " + " | ".join(f"**{_pct(report.overall[c].normalized)}**" for c in labels) + " |")
    return lines


def _head(keys: list[str], cols: list[str]) -> list[str]:
    """A Markdown table's two header rows: the `keys` columns, then the numeric `cols` (right-aligned)."""
    return ["| " + " | ".join([*keys, *cols]) + " |", "|" + "---|" * len(keys) + "---:|" * len(cols)]


def _score_lines(report: PipelineReport) -> list[str]:
    """The table of scores (x100) per combination and task: constant, individual and each method."""
    lines = [
        "",
        "## Scores per task (x100)",
        "",
        "Constant: the best constant prediction on the same examples (majority class, or the label mean), "
        "what a model that learned nothing scores.",
        "",
        *_head(["tasks", "task", "metrics"], score_columns(report.labels)),
    ]
    index = report.index()
    for combo in report.summary:
        for t in report.tasks_of(combo):
            metrics = ", ".join(index[(combo, t, "individual")].metrics)
            scores = report.per_column(combo, t, lambda r: r.score)
            lines.append(f"| {combo} | {t} | {metrics} | " + " | ".join(map(_pct, scores)) + " |")
    return lines


def _mse_lines(report: PipelineReport) -> list[str]:
    """The table of mean squared errors of the regression tasks (nothing when no task is one)."""
    mse = [r for r in report.results if r.mse is not None]
    if not mse:
        return []
    lines = [
        "",
        "## Mean squared error of the regression tasks (correlations ignore scale)",
        "",
        *_head(["tasks", "task"], score_columns(report.labels)),
    ]
    for combo, t in dict.fromkeys((r.combination, r.task) for r in mse):
        values = report.per_column(combo, t, lambda r: r.mse)
        lines.append(f"| {combo} | {t} | " + " | ".join(_num(v, ".3f") for v in values) + " |")
    return lines


def _cost_lines(report: PipelineReport) -> list[str]:
    """The stage costs: wall and CPU time per kind, then each stage's time, memory, load and launch."""
    loads = any(c.load is not None for c in report.stages)
    lines = [
        "",
        "## Cost per stage",
        "",
        "Wall time: "
        + _seconds(report.cost_s)
        + "; CPU time (all threads): "
        + _seconds(report.cpu_s)
        + ". On shared cores wall time grows, and CPU time too (threads waiting for a core spin)"
        + ("; load: the 1-minute load average when the stage ended / the machine's cores." if loads else "."),
        "",
        "| stage | wall s | CPU s | peak memory MB |" + (" load |" if loads else "") + " where |",
        "|---|---:|---:|---:|" + ("---:|" if loads else "") + "---|",
    ]
    for c in report.stages:
        at = c.launch
        where = (
            f"{at.devices} device(s) x {at.num_nodes} node(s), {at.accelerator}, {at.strategy}" if at else "one process"
        )
        wall, cpu, load, peak = (_num(x, ".1f") for x in (c.wall_s, c.cpu_s, c.load, c.peak_rss_mb))
        load = f" {load} / {c.cpus or '?'} |" if loads else ""
        lines.append(f"| {c.stage} | {wall} | {cpu} | {peak} |{load} {where} |")
    return lines


def _seconds(per_kind: dict[str, float]) -> str:
    """Seconds per kind of stage, as `fit 120 s, fisher 30 s, merge 60 s`."""
    return ", ".join(f"{k} {v:.0f} s" for k, v in per_kind.items())


def report_plots(report: PipelineReport, folder: Path) -> list[Path]:
    """plots/normalized.png (methods per combination), plots/scores-<tasks>.png, plots/cost.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmn_pl.report import grouped_bars

    labels, paths = report.labels, []
    combos = list(report.summary)
    many = len(combos) > 1
    groups = combos + (["mean"] if many else [])
    series = {
        c: [report.summary[g][c].normalized for g in combos] + ([report.overall[c].normalized] if many else [])
        for c in labels
    }
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * len(groups) * len(labels), 3.8))
    grouped_bars(ax, groups, series, "merged / individual (%)")
    ax.axhline(100, color="black", linewidth=0.6, linestyle="--")
    low = min([100 * v for vals in series.values() for v in vals if v is not None] or [0.0])
    ax.set_ylim(max(0.0, low - 10), None)
    ax.set_title("Normalized score per merge (mean over its tasks)")
    paths.append(save_figure(fig, folder / "normalized.png"))
    cols = score_columns(report.labels)
    for combo in combos:
        tasks = report.tasks_of(combo)
        scores = [report.per_column(combo, t, lambda r: r.score) for t in tasks]  # per task, per column
        fig, ax = plt.subplots(figsize=(2.5 + 0.3 * len(tasks) * len(cols), 3.6))
        grouped_bars(ax, tasks, {c: [s[i] for s in scores] for i, c in enumerate(cols)}, "score (x100)")
        ax.set_title(f"Scores per task: {combo}")
        paths.append(save_figure(fig, folder / f"scores-{combo}.png"))
    cost = _cost_plot(report, folder / "cost.png")
    return paths + ([cost] if cost else [])


def _cost_plot(report: PipelineReport, path: Path) -> Path | None:
    """plots/cost.png: wall and CPU seconds of each stage that has a stamp, coloured by kind. None if none has."""
    import matplotlib.pyplot as plt

    costs = [c for c in report.stages if c.wall_s is not None][::-1]
    if not costs:
        return None
    colors = [{"fit": "tab:blue", "fisher": "tab:orange", "merge": "tab:green"}.get(c.kind, "tab:gray") for c in costs]
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.26 * len(costs)))
    ys = range(len(costs))
    ax.barh([y + 0.2 for y in ys], [c.wall_s or 0.0 for c in costs], 0.4, label="wall", color=colors)
    ax.barh(
        [y - 0.2 for y in ys],
        [c.cpu_s or 0 for c in costs],
        0.4,
        label="CPU (hatched)",
        hatch="///",
        color="white",
        edgecolor=colors,
    )
    ax.set_yticks(list(ys), [c.stage for c in costs], fontsize=7)
    ax.set_xlabel("seconds")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title("Cost per stage, wall: " + _seconds(report.cost_s), fontsize="medium")
    return save_figure(fig, path)


def write_pipeline_report(cfg: PipelineConfig) -> Path:
    """Combine the merges' reports into <output>/report.{json,md} and <output>/plots/*.png."""
    out = Path(cfg.output)
    report = gather(cfg)
    report_plots(report, out / "plots")
    text = report_markdown(report)
    atomic_write(out / "report.md", text)
    write_json(out / "report.json", report.to_dict())  # last: the stage's output, its presence: the report is whole
    print(text)
    return out / "report.json"
