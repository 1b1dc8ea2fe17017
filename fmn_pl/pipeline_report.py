"""The pipeline's combined report: every merge's per-task scores beside the constant baselines and the
individual models, means per combination, stage costs; as JSON, Markdown and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fmn_pl.files import atomic_write, save_figure, write_json
from fmn_pl.pipeline_config import PipelineConfig, artifact_kinds
from fmn_pl.report import mean
from fmn_pl.stages import Stage, plan, read_stamp, report_options, stamp_path

# ---------------------------------------------------------------------------------------------- report


def gather(cfg: PipelineConfig, partial: bool = False) -> dict[str, Any]:
    """The combined report as data: per-task scores of every merge, means per combination, stage costs.
    `partial`: leave out merges not run yet (a look at a run in progress) instead of failing on them."""
    stages = plan(cfg)
    opts = report_options(cfg)
    labels = list(dict.fromkeys(["average", *(c["label"] for c in opts["columns"])]))
    table, flags = _merge_results(stages, partial)
    summary, overall = _summaries(table, opts["combinations"], ["constant", "individual", *labels])
    costs = _stage_costs(cfg, stages)
    return {
        **opts,
        "labels": labels,
        "checkpoints": _checkpoints(cfg),
        "results": table,
        "summary": summary,
        "flags": list(dict.fromkeys(flags)),
        "overall": overall,
        "stages": costs,
        "cost_s": {
            k: round(sum(c["wall_s"] or 0 for c in costs if c["kind"] == k), 1) for k in ("fit", "fisher", "merge")
        },
        "cpu_s": {
            k: round(sum(c["cpu_s"] or 0 for c in costs if c["kind"] == k), 1) for k in ("fit", "fisher", "merge")
        },
    }


def _merge_results(stages: list[Stage], partial: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (combination, task, column) from the merges' reports, and their flags and remarks (repeats
    kept): constant, individual and average are in every report of a combination, so they are kept once."""
    from fmn_pl.merge_report import MergeReport

    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    flags: list[str] = []
    for s in (s for s in stages if s.kind == "merge"):
        if partial and not s.output.is_file():
            continue
        rep = MergeReport.read(s.output)
        combo, label = "+".join(s.options["tasks"]), s.options["label"]
        for task, r in rep.results.items():  # constant, individual, average: in every report of a combination
            base = {"combination": combo, "task": task, "metrics": r.metric_names()}
            for column, which, norm in (
                ("constant", "baseline", None),
                ("individual", "individual", 1.0),
                ("average", "average", r.normalized_average),
                (label, "merged", r.normalized),
            ):
                results.setdefault(
                    (combo, task, column),
                    {**base, "column": column, "score": r.score(which), "normalized": norm, "mse": r.mse(which)},
                )
            own = [f for f in r.flags if f.startswith(("individual", "average"))]
            flags += [f"{combo} {label}: {task}: {f}" for f in r.flags if f not in own]
            flags += [f"{combo}: {task}: {f}" for f in own]
        flags += [f"{combo} {label}: {remark}" for remark in rep.remarks]
    return list(results.values()), flags


def _summaries(
    table: list[dict[str, Any]], combinations: list[str], columns: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean score and normalized score per combination and column, and the means of those over combinations."""
    summary = {
        combo: {
            col: {
                k: mean([r[k] for r in table if r["combination"] == combo and r["column"] == col])
                for k in ("score", "normalized")
            }
            for col in columns
        }
        for combo in combinations
    }
    overall = {
        col: {k: mean([summary[c][col][k] for c in summary]) for k in ("score", "normalized")} for col in columns
    }
    return summary, overall


def _stage_costs(cfg: PipelineConfig, stages: list[Stage]) -> list[dict[str, Any]]:
    """What each stage but the report cost, as its stamp recorded it (None where it has no stamp yet)."""
    costs = []
    for s in stages:
        if s.kind != "report":
            stamp = read_stamp(stamp_path(cfg, s)) or {}
            costs.append(
                {
                    "stage": s.id,
                    "kind": s.kind,
                    "wall_s": stamp.get("wall_s"),
                    "cpu_s": stamp.get("cpu_s"),
                    "peak_rss_mb": stamp.get("peak_rss_mb"),
                    "load": stamp.get("load"),
                    "cpus": stamp.get("cpus"),
                    "finished": stamp.get("finished"),
                    "launch": stamp.get("launch"),
                }
            )
    return costs


def _checkpoints(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per task: its checkpoint's training record and what each artifact was computed from, as they record it."""
    from fmn_pl.artifacts import Artifact, artifact_path
    from fmn_pl.checkpoint import read_metadata

    checkpoints = {}
    for t in cfg.tasks:
        folder = Path(cfg.output) / "checkpoints" / t
        meta = read_metadata(folder)
        checkpoints[t] = {
            k: meta.get(k) for k in ("num_train_examples", "epoch", "epochs_trained", "metrics", "fingerprint")
        }
        checkpoints[t]["artifacts"] = {  # what each artifact was computed from, as it records it
            k: {
                m: Artifact(artifact_path(folder, k), k).metadata.get(m)
                for m in ("num_examples", "aggregation", "labels", "batch_size", "seconds")
            }
            for k in artifact_kinds(cfg)
        }
    return checkpoints


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def caps_text(data: dict[str, Any]) -> str:
    """One paragraph saying how much data each stage read (the caps of a quick run)."""
    caps = data["caps"]
    fit = "; ".join(
        f"{t} {c.get('num_train_examples') or '?'} training examples"
        + (f" (capped at {caps['fit'][t]['max_train_samples']})" if caps["fit"][t]["max_train_samples"] else " (all)")
        + f", {caps['fit'][t]['max_epochs']} epoch(s)"
        for t, c in data["checkpoints"].items()
    )

    def examples(kind: str) -> str:
        counts = sorted({str(c["artifacts"][kind]["num_examples"]) for c in data["checkpoints"].values()})
        return "/".join(counts)

    fisher = ", ".join(f"{k} on {examples(k)} training examples per task" for k in caps["fisher"])
    cap = caps["eval"]["max_eval_samples"]
    scored = (
        "all validation examples" if cap is None else f"at most {cap} validation examples per task (a seeded sample)"
    )
    return f"Fine-tuning: {fit}. Artifacts: {fisher or 'none'}. Scored on {scored}."


def report_markdown(data: dict[str, Any]) -> str:
    """The combined report as Markdown: normalized means per combination, per-task scores, stage costs."""
    lines = [
        "# fmn-pl pipeline report",
        "",
        f"Model `{data['model']}`, data `{data['data_dir']}`, tasks {', '.join(data['tasks'])}; "
        f"{len(data['combinations'])} task combination(s) merged with each method.",
        "",
        caps_text(data),
        "",
        *_normalized_lines(data),
        *_score_lines(data),
        *_mse_lines(data),
    ]
    if data.get("flags"):
        lines += ["", "## Flags", "", *[f"- {f}" for f in data["flags"]]]
    lines += _cost_lines(data)
    lines += [
        "",
        "Plots: `plots/normalized.png`, `plots/scores-<tasks>.png`, `plots/cost.png`. Each merge's own "
        "report: `merges/<tasks>/<label>/report.md`.",
    ]
    return "\n".join(lines) + "\n"


def _normalized_lines(data: dict[str, Any]) -> list[str]:
    """The table of normalized scores per combination and method, with a mean row when there are several."""
    labels = data["labels"]
    lines = [
        "## Normalized score (merged / individual, %, mean over the merged tasks)",
        "",
        *_head(["tasks"], labels),
    ]
    for combo, cols in data["summary"].items():
        lines.append(f"| {combo} | " + " | ".join(_pct(cols[c]["normalized"]) for c in labels) + " |")
    if len(data["summary"]) > 1:
        lines.append(
            "| **mean** | " + " | ".join(f"**{_pct(data['overall'][c]['normalized'])}**" for c in labels) + " |"
        )
    return lines


def _head(keys: list[str], cols: list[str]) -> list[str]:
    """A Markdown table's two header rows: the `keys` columns, then the numeric `cols` (right-aligned)."""
    return ["| " + " | ".join([*keys, *cols]) + " |", "|" + "---|" * len(keys) + "---:|" * len(cols)]


def _index(data: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The result rows by (combination, task, column)."""
    return {(r["combination"], r["task"], r["column"]): r for r in data["results"]}


def _score_lines(data: dict[str, Any]) -> list[str]:
    """The table of scores (x100) per combination and task: constant, individual and each method."""
    cols = ["constant", "individual", *data["labels"]]
    index = _index(data)
    lines = [
        "",
        "## Scores per task (x100)",
        "",
        "Constant: the best constant prediction on the same examples (majority class, or the label mean), "
        "what a model that learned nothing scores.",
        "",
        *_head(["tasks", "task", "metrics"], cols),
    ]
    for combo in data["summary"]:
        for t in dict.fromkeys(r["task"] for r in data["results"] if r["combination"] == combo):
            metrics = ", ".join(index[(combo, t, "individual")]["metrics"])
            lines.append(
                f"| {combo} | {t} | {metrics} | "
                + " | ".join(_pct((index.get((combo, t, c)) or {}).get("score")) for c in cols)
                + " |"
            )
    return lines


def _mse_lines(data: dict[str, Any]) -> list[str]:
    """The table of mean squared errors of the regression tasks (nothing when no task is one)."""
    mse = [r for r in data["results"] if r.get("mse") is not None]
    if not mse:
        return []
    cols = ["constant", "individual", *data["labels"]]
    index = _index(data)
    lines = [
        "",
        "## Mean squared error of the regression tasks (correlations ignore scale)",
        "",
        *_head(["tasks", "task"], cols),
    ]
    for combo, t in dict.fromkeys((r["combination"], r["task"]) for r in mse):
        lines.append(
            f"| {combo} | {t} | "
            + " | ".join(
                "–" if (index.get((combo, t, c)) or {}).get("mse") is None else f"{index[(combo, t, c)]['mse']:.3f}"
                for c in cols
            )
            + " |"
        )
    return lines


def _cost_lines(data: dict[str, Any]) -> list[str]:
    """The stage costs: wall and CPU time per kind, then each stage's time, memory, load and launch."""
    loads = any(c.get("load") is not None for c in data["stages"])
    lines = [
        "",
        "## Cost per stage",
        "",
        "Wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in data["cost_s"].items())
        + "; CPU time (all threads): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in data["cpu_s"].items())
        + ". On shared cores wall time grows, and CPU time too (threads waiting for a core spin)"
        + ("; load: the 1-minute load average when the stage ended / the machine's cores." if loads else "."),
        "",
        "| stage | wall s | CPU s | peak memory MB |" + (" load |" if loads else "") + " where |",
        "|---|---:|---:|---:|" + ("---:|" if loads else "") + "---|",
    ]
    for c in data["stages"]:
        launch = c.get("launch")
        where = (
            (
                f"{launch['devices']} device(s) x {launch['num_nodes']} node(s), {launch['accelerator']}, "
                f"{launch['strategy']}"
            )
            if launch
            else "one process"
        )
        wall, cpu, load, peak = (
            "–" if c.get(k) is None else f"{c[k]:.1f}" for k in ("wall_s", "cpu_s", "load", "peak_rss_mb")
        )
        load = f" {load} / {c.get('cpus') or '?'} |" if loads else ""
        lines.append(f"| {c['stage']} | {wall} | {cpu} | {peak} |{load} {where} |")
    return lines


def report_plots(data: dict[str, Any], folder: Path) -> list[Path]:
    """plots/normalized.png (methods per combination), plots/scores-<tasks>.png, plots/cost.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmn_pl.report import grouped_bars

    labels, paths = data["labels"], []
    combos = list(data["summary"])
    many = len(combos) > 1
    groups = combos + (["mean"] if many else [])
    series = {
        c: [data["summary"][g][c]["normalized"] for g in combos] + ([data["overall"][c]["normalized"]] if many else [])
        for c in labels
    }
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * len(groups) * len(labels), 3.8))
    grouped_bars(ax, groups, series, "merged / individual (%)")
    ax.axhline(100, color="black", linewidth=0.6, linestyle="--")
    low = min([100 * v for vals in series.values() for v in vals if v is not None] or [0.0])
    ax.set_ylim(max(0.0, low - 10), None)
    ax.set_title("Normalized score per merge (mean over its tasks)")
    paths.append(save_figure(fig, folder / "normalized.png"))
    index = {(r["combination"], r["task"], r["column"]): r["score"] for r in data["results"]}
    cols = ["constant", "individual", *labels]
    for combo in combos:
        tasks = list(dict.fromkeys(r["task"] for r in data["results"] if r["combination"] == combo))
        fig, ax = plt.subplots(figsize=(2.5 + 0.3 * len(tasks) * len(cols), 3.6))
        grouped_bars(ax, tasks, {c: [index.get((combo, t, c)) for t in tasks] for c in cols}, "score (x100)")
        ax.set_title(f"Scores per task: {combo}")
        paths.append(save_figure(fig, folder / f"scores-{combo}.png"))
    cost = _cost_plot(data, folder / "cost.png")
    return paths + ([cost] if cost else [])


def _cost_plot(data: dict[str, Any], path: Path) -> Path | None:
    """plots/cost.png: wall and CPU seconds of each stage that has a stamp, coloured by kind. None if none has."""
    import matplotlib.pyplot as plt

    costs = [c for c in data["stages"] if c["wall_s"] is not None][::-1]
    if not costs:
        return None
    colors = {"fit": "tab:blue", "fisher": "tab:orange", "merge": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.26 * len(costs)))
    ys = range(len(costs))
    ax.barh(
        [y + 0.2 for y in ys],
        [c["wall_s"] for c in costs],
        0.4,
        label="wall",
        color=[colors.get(c["kind"], "tab:gray") for c in costs],
    )
    ax.barh(
        [y - 0.2 for y in ys],
        [c["cpu_s"] or 0 for c in costs],
        0.4,
        label="CPU (hatched)",
        hatch="///",
        color="white",
        edgecolor=[colors.get(c["kind"], "tab:gray") for c in costs],
    )
    ax.set_yticks(list(ys), [c["stage"] for c in costs], fontsize=7)
    ax.set_xlabel("seconds")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(
        "Cost per stage, wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in data["cost_s"].items()), fontsize="medium"
    )
    return save_figure(fig, path)


def write_pipeline_report(cfg: PipelineConfig) -> Path:
    """Combine the merges' reports into <output>/report.{json,md} and <output>/plots/*.png."""
    out = Path(cfg.output)
    data = gather(cfg)
    report_plots(data, out / "plots")
    text = report_markdown(data)
    atomic_write(out / "report.md", text)
    write_json(out / "report.json", data)  # last: the stage's output, so its presence means the report is whole
    print(text)
    return out / "report.json"
