"""The Markdown of a study's evidence (`fmn_pl.evidence`), from its bundles alone: the individual models against
their constants, every method by search budget with intervals and collapse counts, every cell, what the searches
chose, and the published claims judged like for like. The same bundles always give the same bytes.

    python -m fmn_pl.evidence_report BUNDLE_FOLDER [--output FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from fmn_pl.bundle import AVERAGE, INDIVIDUAL, read_all
from fmn_pl.evidence import CONSTANT, Estimate, Evidence
from fmn_pl.tasks import get_task

SEARCHED_TA = "task_arithmetic"
# (claim, its source, model a, model b, what "holds" means): a - b with its interval over the pairs
CLAIMS = [
    ("FMN's rule beats the plain average", "FMN paper", "fmn_reference", AVERAGE),
    ("FMN's rule is at least as good as full Fisher merging, neither searched", "FMN paper", "fmn_reference", "fisher"),
    ("RegMean beats Fisher merging", "RegMean paper", "regmean", "fisher"),
    ("Task arithmetic (lambda searched) beats the plain average", "task arithmetic paper", SEARCHED_TA, AVERAGE),
    ("TIES beats task arithmetic, both at their papers' settings", "TIES paper", "ties_fixed", "ta_fixed"),
    ("TIES beats task arithmetic, both searched over the same 10 lambdas", "TIES paper", "ties", SEARCHED_TA),
    ("FMN with its options searched beats task arithmetic searched", "fmn-pl", "fmn_k10", SEARCHED_TA),
    ("FMN with its options searched beats task arithmetic searched", "fmn-pl", "fmn", SEARCHED_TA),
]
NOT_RUN = [
    ("TALL masks keep every task (one body per task: no storage saving on pairs)", "TALL paper", "tall"),
    ("AdaMerging beats task arithmetic (500 steps of 16 rows)", "AdaMerging paper", "adamerging"),
    ("Consensus merging beats TALL and task arithmetic (3 tasks or more)", "TALL/Consensus paper", "consensus"),
]


def _est(e: Estimate | None, sign: bool = True) -> str:
    return "–" if e is None else e.text(sign)


def _marked(e: Estimate | None) -> str:
    """An estimate with its verdict in bold when the interval excludes 0."""
    if e is None:
        return "–"
    return f"**{e.text()}**" if e.verdict != "tie" else e.text()


def results_page(ev: Evidence) -> str:
    """The whole document: the same bundles give the same bytes wherever they lie (a run's results.md is its
    committed page)."""
    cfg = ev.bundles[0].meta["config"]
    n = len(ev.seeds)
    title = f"Results: {', '.join(ev.tasks)} on {Path(cfg['model']).name}, {n} seed{'s' if n > 1 else ''}"
    lines = [f"# {title}", "", *_intro(ev), *_individual(ev), *_methods(ev), *_cells(ev), *_choices(ev)]
    lines += _costs(ev) + _claims(ev)
    return "\n".join(lines).rstrip() + "\n"


def selection_samples(merge: dict[str, Any]) -> Any:
    """The selection rows per task a bundle's pipeline config set (`merge.selection.samples`; bundles written
    before the typed options hold it as `merge.args.selection_samples`)."""
    if "selection" in merge:
        return merge["selection"]["samples"]
    return (merge.get("args") or {}).get("selection_samples", 300)


def _intro(ev: Evidence) -> list[str]:
    cfg = ev.bundles[0].meta["config"]
    fit, merge = cfg["fit"], cfg["merge"]
    n = {t: len(ev.labels[ev.seeds[0]][t]) for t in ev.tasks}
    return [
        "Regenerated from the results bundles alone (`python -m fmn_pl.evidence_report <bundle folder>`; the "
        "committed pages: `python research/results.py`); the bundles were produced by `fmn-pl pipeline` "
        f"with the config each records. Model `{Path(cfg['model']).name}`; tasks {', '.join(ev.tasks)}; "
        f"fine-tuning seed{'s' if len(ev.seeds) > 1 else ''} {', '.join(map(str, ev.seeds))}.",
        "",
        f"- Scored rows: a seeded sample of each validation split ({', '.join(f'{t} {n[t]}' for t in ev.tasks)}), "
        "read for these scores only. The exported epoch and every searched option were chosen on "
        f"{fit['holdout_samples']} training rows held out from fine-tuning (options on "
        f"{selection_samples(merge)} of them).",
        "- Scores x100 (GLUE's metric; the mean of two for MRPC and STS-B), mean over seeds. [a, b]: 95% interval "
        f"of a paired bootstrap over the scored rows ({ev.draws[next(iter(ev.draws))].shape[0]} resamples, the "
        "same rows for every model of a seed and task; the mean over seeds). **Bold**: the interval excludes 0.",
        "- Share above constant = (merged - constant) / (individual - constant), x100: what a merge keeps of "
        "what the model learned; a majority-class answer scores 0 on it, and a cell counts at least -100 (a "
        "merge worse than the constant by more than the model's own margin). Normalized = merged / individual, "
        "the FMN paper's figure, beside it.",
        "- Collapsed (†): a merged model that answers one class on at least 95% of the rows, or (STS-B) whose "
        "predictions keep under 10% of the labels' spread. ≈c: within noise of the constant (the interval of "
        "merged - constant includes 0). Counted per method, never hidden in a mean.",
        "",
    ]


def _individual(ev: Evidence) -> list[str]:
    lines = [
        "## The individual models",
        "",
        "| task | metric | constant | individual | individual - constant | counts in claims | epoch per seed "
        "(chosen on held-out rows) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for t in ev.tasks:
        gain = ev.competent(t)
        epochs = ", ".join(str((b.meta["checkpoints"].get(t) or {}).get("epoch")) for b in ev.bundles)
        lines.append(
            f"| {t} | {', '.join(get_task(t).metrics)} | {ev.mean_score(CONSTANT, '', t).mean:.1f} | "
            f"{_est(ev.mean_score(INDIVIDUAL, '', t), False)} | {_marked(gain)} | "
            f"{'yes' if gain.low > 0 else 'no: within noise of its constant'} | {epochs} |"
        )
    out = [t for t in ev.tasks if t not in ev.competent_tasks()]
    note = f"Left out of every method claim: {', '.join(out)}." if out else "Every task counts in the claims."
    return [*lines, "", note, ""]


def _method_order(ev: Evidence) -> list[tuple[int, str]]:
    """(budget, method), the unsearched first, in config order within a budget."""
    return sorted(((ev.budget(m), m) for m in ev.methods), key=lambda bm: (bm[0], ev.methods.index(bm[1])))


def _methods(ev: Evidence) -> list[str]:
    tasks = ev.competent_tasks()
    pairs, larger = ev.cells(ev.pairs(), tasks), ev.cells(ev.larger(), tasks)
    every_pair, every_larger = ev.cells(ev.pairs(), ev.tasks), ev.cells(ev.larger(), ev.tasks)
    ta = SEARCHED_TA if SEARCHED_TA in ev.methods else None
    head = ["method", "budget", "share above constant, pairs", "normalized, pairs", "- average, pairs"]
    head += [f"- {ta or 'task arithmetic'}, pairs", "collapsed, pairs"]
    rows = [["constant", "–", "0", f"{ev.ratio(CONSTANT, pairs) or 0:.1f}"]]
    rows[0] += [_marked(ev.difference(CONSTANT, AVERAGE, pairs)), "–", "–", "0", "–", "–"]
    for budget, m in [(0, AVERAGE), *_method_order(ev)]:
        rows.append(
            [_named(ev, m, every_pair + every_larger), str(budget), _est(ev.share(m, pairs))]
            + [f"{ev.ratio(m, pairs) or 0:.1f}"]
            + [_marked(ev.difference(m, AVERAGE, pairs)) if m != AVERAGE else "0"]
            + [_marked(ev.difference(m, ta, pairs)) if ta and m != ta else "–", str(ev.collapses(m, every_pair))]
            + [_est(ev.share(m, larger)), _marked(ev.difference(m, AVERAGE, larger)) if m != AVERAGE else "0"]
            + [str(ev.collapses(m, every_larger))]
        )
    if larger:
        head += ["share above constant, larger", "- average, larger", "collapsed, larger"]
    width = len(head)
    lines = [
        "## Every method",
        "",
        f"Over the pairs' cells of the tasks that count ({len(pairs)} cells x {len(ev.seeds)} "
        f"seed{'s' if len(ev.seeds) > 1 else ''})"
        + (f" and the larger merge {', '.join(ev.larger())} ({len(larger)} cells)" if larger else "")
        + ". Budget: distinct candidates scored on the held-out rows per merge (0: nothing chosen on data). "
        f"Collapsed: merged results that answer one thing, of {len(every_pair) * len(ev.seeds)} on the pairs "
        "(every task).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (width - 1),
        *("| " + " | ".join(r[:width]) + " |" for r in rows),
        "",
        _keepers(ev),
    ]
    unequal = sorted({b for b, _ in _method_order(ev) if b}, reverse=True)
    if len(unequal) > 1:
        lines += [
            "",
            f"Budgets differ ({', '.join(map(str, unequal))} candidates): compare searched methods only at "
            "equal budget.",
        ]
    return [*lines, ""]


def _named(ev: Evidence, model: str, cells: list[tuple[str, str]]) -> str:
    """A model's name, with the seeds it ran on when that is fewer than the study's."""
    seeds = [s for s in ev.seeds if any(ev.has(s, c, model, t) for c, t in cells)]
    return model if len(seeds) == len(ev.seeds) else f"{model} (seed {', '.join(map(str, seeds))} only)"


def _keepers(ev: Evidence) -> str:
    """The one line a reader wants first: which methods keep every task of every merge above its constant."""
    cells = ev.cells(ev.combinations, ev.tasks)
    keep = [
        m
        for m in [AVERAGE, *ev.methods]
        if not ev.collapses(m, cells) and not any(ev.near_constant(m, c, t) for c, t in cells)
    ]
    lost = [
        f"{c}: {t}"
        for c, t in cells
        if all(ev.collapses(m, [(c, t)]) or ev.near_constant(m, c, t) for m in [AVERAGE, *ev.methods])
    ]
    margins = {t: ev.competent(t).text() for t in dict.fromkeys(cell.split(": ")[1] for cell in lost)}
    where = (
        f" No method keeps {', '.join(lost)} (the individual model's margin over its constant: "
        + ", ".join(f"{t} {m}" for t, m in margins.items())
        + ")."
        if lost
        else ""
    )
    if keep:
        return (
            f"Every task of every merge clearly above its constant, never collapsed: {', '.join(keep)} "
            f"(of {len(ev.methods) + 1} methods).{where}"
        )
    return (
        "No method keeps every task of every merge clearly above its constant: each one collapses or sits within "
        f"noise of the constant on at least one cell (marked in the table below).{where}"
    )


def _cells(ev: Evidence) -> list[str]:
    models = [AVERAGE, *(m for _, m in _method_order(ev))]
    lines = [
        "## Every cell",
        "",
        "Mean over seeds; † k/n: collapsed in k of n seeds; ≈c: within noise of the constant.",
        "",
        "| cell | constant | individual | " + " | ".join(models) + " |",
        "|---|---:|---:|" + "---:|" * len(models),
    ]
    for combo in ev.combinations:
        for task in combo.split("+"):
            row = [f"{combo}: {task}", f"{ev.mean_score(CONSTANT, combo, task).mean:.1f}"]
            row.append(f"{ev.mean_score(INDIVIDUAL, combo, task).mean:.1f}")
            for m in models:
                row.append(_cell(ev, m, combo, task) if ev.seeds_with([m], [(combo, task)]) else "–")
            lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _cell(ev: Evidence, model: str, combo: str, task: str) -> str:
    text = f"{ev.mean_score(model, combo, task).mean:.1f}"
    seeds = ev.seeds_with([model], [(combo, task)])
    k = sum(ev.collapsed(s, combo, model, task) for s in seeds)
    if k:
        text += f" †{k}/{len(seeds)}"
    elif ev.near_constant(model, combo, task):
        text += " ≈c"
    return text


def _choices(ev: Evidence) -> list[str]:
    lines = ["## What the searches chose", "", "Over every merge and seed: value (times chosen).", ""]
    for _, m in _method_order(ev):
        for option, counts in ev.chosen(m).items():
            shown = ", ".join(f"{v} ({n})" for v, n in sorted(counts.items(), key=lambda vn: -vn[1]))
            lines.append(f"- {m}, {option}: {shown}")
    return [*lines, ""] if len(lines) > 4 else []


def _costs(ev: Evidence) -> list[str]:
    """What each artifact and each merge cost, as the bundles recorded it (wall seconds on the machine that ran
    them; median over tasks, or over merges, and seeds)."""
    import statistics

    kinds: dict[str, list[tuple[int, float]]] = {}
    for b in ev.bundles:
        for c in b.meta["checkpoints"].values():
            for kind, a in (c.get("artifacts") or {}).items():
                kinds.setdefault(kind, []).append((int(a.get("num_examples", 0)), float(a.get("seconds", 0))))
    merges: dict[str, list[float]] = {}
    for b in ev.bundles:
        for key, m in b.meta["merges"].items():
            merges.setdefault(key.split("/")[1], []).append(float((m.get("timings") or {}).get("merge_s", 0)))
    if not kinds and not merges:
        return []
    lines = ["## Costs", "", "Wall seconds on the machine that ran them (2 CPU cores), medians.", ""]
    lines += [
        f"- {kind}: {statistics.median(n for n, _ in v):.0f} training rows per task, "
        f"{statistics.median(t for _, t in v):.1f} s"
        for kind, v in kinds.items()
    ]
    lines += [f"- merge with {m} (its search included): {statistics.median(v):.1f} s" for m, v in merges.items()]
    return [*lines, ""]


def _claims(ev: Evidence) -> list[str]:
    tasks = ev.competent_tasks()
    pairs, larger = ev.cells(ev.pairs(), tasks), ev.cells(ev.larger(), tasks)
    lines = [
        "## Published claims, judged like for like",
        "",
        "a - b in points over the pairs' cells of the tasks that count (and the larger merge): holds where the "
        "interval is above 0, does not hold where it is below, not established where it includes 0.",
        "",
        "| claim | source | a, b (budgets) | a - b, pairs | verdict | a - b, larger | verdict |",
        "|---|---|---|---:|---|---:|---|",
    ]
    verdicts = {"win": "holds", "loss": "does not hold", "tie": "not established"}
    for claim, source, a, b in CLAIMS:
        if a not in ev.methods + [AVERAGE] or b not in ev.methods + [AVERAGE]:
            continue
        p, q = ev.difference(a, b, pairs), ev.difference(a, b, larger)
        ka, kb = (0 if m == AVERAGE else ev.budget(m) for m in (a, b))
        unequal = " **unequal budgets**" if ka and kb and ka != kb else ""
        fewer = f", {p.seeds} of {len(ev.seeds)} seeds" if p and p.seeds < len(ev.seeds) else ""
        lines.append(
            f"| {claim} | {source} | {a}, {b} ({ka}, {kb}{fewer}){unequal} | {_est(p)} | "
            f"{verdicts[p.verdict] if p else '–'} | {_est(q)} | {verdicts[q.verdict] if q else '–'} |"
        )
    for claim, source, m in NOT_RUN:
        if m not in ev.methods:
            lines.append(f"| {claim} | {source} | – | – | not tested in this study | – | – |")
    return [*lines, ""]


def write_results(out: Path, seed: int | None = None) -> None:
    """A pipeline run's results bundle (`<out>/bundle/`, when `seed` is given: one run) and `<out>/results.md`,
    regenerated from the bundles alone (every seed's under `out` when `seed` is None)."""
    from fmn_pl import bundle
    from fmn_pl.files import atomic_write

    if seed is not None:
        bundle.write(bundle.collect(out, seed), out / bundle.BUNDLE)
    text = results_page(Evidence(bundle.read_all(out)))
    atomic_write(out / "results.md", text)
    print(f"evidence: {out / 'results.md'}")


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="The evidence Markdown of a results bundle (one run or seed-*/).")
    parser.add_argument("bundle", type=Path, help="a bundle folder, or a folder of seed-*/ bundles")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    text = results_page(Evidence(read_all(args.bundle)))
    if args.output is None:
        print(text, end="")
    else:
        from fmn_pl.files import atomic_write

        atomic_write(args.output, text)
    return text


if __name__ == "__main__":
    main()
