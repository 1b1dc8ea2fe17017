"""The candidate search every method that chooses an option on selection data shares (task arithmetic's and TIES'
lambda, FMN's p and s, Consensus): candidates scored on the held-out rows, screened by successive halving, the
best by a declared objective, and every score recorded for the report."""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, cast

import torch
from tqdm.auto import tqdm

from fmn_pl.merging.base import MergeContext, Option

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
Objective = Literal["mean", "worst_gain"]
# options every searching method declares alike
SCALINGS = Option("scalings", "list[float]", GRID, "the grid lambda is chosen from when `scaling` is null.")
OBJECTIVE = Option("objective", "Objective", "mean", "what a chosen lambda maximises: mean or worst_gain.")
OBJECTIVES = ("mean", "worst_gain")


def check_objective(objective: str, name: str) -> Objective:
    """`objective` if it is one of OBJECTIVES, else a one-line error naming the method."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{name}: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return cast(Objective, objective)


def rank(scores: dict[str, float], reference: dict[str, float] | None) -> tuple[float, float]:
    """What `choose_body` maximises for one candidate's selection scores {task: score}: (its smallest gain over
    `reference`, the plain average's scores, or 0 without one; its mean score)."""
    worst = min(scores[t] - reference[t] for t in reference) if reference else 0.0
    return worst, sum(scores.values()) / len(scores)


def choose_body(
    ctx: MergeContext,
    candidates: dict[Any, Callable[..., dict[str, torch.Tensor]]],
    name: str,
    objective: Objective = "mean",
    describe: Callable[[Any], str] = str,
    average: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """The key of `candidates` ({key: builder of a candidate body}) whose body scores best on the selection data
    (first in order on ties), and what was measured: {"objective", "scores", "mean_scores"[, "average_scores"]}.

    objective: mean = the mean selection score over the tasks; worst_gain = the smallest gain over the plain
    average among the tasks (one more evaluation, of the average, unless `average` names the candidate that is
    the plain average), then the mean: the candidate that leaves no task further behind plain averaging.
    Candidates are built one at a time.
    """
    check_objective(objective, name)
    if ctx.evaluate is None:
        raise ValueError(
            f"{name}: an option set to null is chosen on selection data, which needs evaluation; give a fixed value"
        )
    if average is not None and average not in candidates:
        raise ValueError(f"{name}: average={average!r} is not one of the candidates {list(candidates)}")
    scores: dict[Any, dict[str, float]] = {}
    reference = average_scores(ctx, candidates, scores, average) if objective == "worst_gain" else None
    finalists, screened = screen_candidates(
        ctx, candidates, name, describe, keep=[average] if reference is not None and average is not None else []
    )
    bar = tqdm(finalists, desc=f"{name}: candidates", unit="candidate", leave=False, disable=not ctx.progress)
    for i, key in enumerate(bar, start=1):
        if key not in scores:
            scores[key] = ctx.evaluate(candidates[key]())
        worst, mean = rank(scores[key], reference)
        ctx.log(
            f"{name}: candidate {i}/{len(finalists)} {describe(key)}: mean selection score={mean:.4f}"
            + (f", worst gain over the average={worst:+.4f}" if reference else "")
        )
    scores = {key: scores[key] for key in finalists}  # in the candidates' order
    means = {key: rank(s, None)[1] for key, s in scores.items()}
    best = max(finalists, key=lambda key: rank(scores[key], reference))
    tied = [key for key in finalists if key != best and rank(scores[key], reference) == rank(scores[best], reference)]
    if tied:
        ctx.remark(
            f"{name}: the chosen {describe(best)} ties on the selection data with "
            f"{', '.join(describe(k) for k in tied)}: the first in order was taken"
        )
    measured = {
        "objective": objective,
        "scores": scores,
        "mean_scores": means,
        "tied": tied,
        **({"screened": screened} if screened else {}),
    }
    return best, {**measured, "average_scores": reference} if reference else measured


def average_scores(
    ctx: MergeContext,
    candidates: dict[Any, Callable[..., dict[str, torch.Tensor]]],
    scores: dict[Any, dict[str, float]],
    average: Any,
) -> dict[str, float]:
    """The plain average's selection scores (the worst_gain reference): the candidate `average` when one is (its
    scores go into `scores`, not measured twice), else the average merged here."""
    from fmn_pl.merging.average import Average

    if average is None:
        return ctx.evaluate(dict(Average().merge(ctx)))  # type: ignore[misc]
    scores[average] = ctx.evaluate(candidates[average]())  # type: ignore[misc]
    return scores[average]


def screen_candidates(
    ctx: MergeContext,
    candidates: dict[Any, Callable[..., dict[str, torch.Tensor]]],
    name: str,
    describe: Callable[[Any], str],
    keep: list[Any],
) -> tuple[list[Any], dict[str, Any]]:
    """Successive halving: with `ctx.screen` rows per task, score every candidate on that spread subset of the
    selection data and keep the `ctx.finalists` best by mean score (plus `keep`) for the full scoring. Cuts a
    20-candidate search to about a quarter of its scoring while the final choice is still made on every row.
    Off (every candidate a finalist) when `ctx.screen` is None or there are few candidates."""
    keys = list(candidates)
    if ctx.screen is None or len(keys) <= ctx.finalists:
        return keys, {}
    means = {}
    evaluate = ctx.evaluate
    assert evaluate is not None, "choose_body checks it"
    bar = tqdm(keys, desc=f"{name}: screening", unit="candidate", leave=False, disable=not ctx.progress)
    for i, key in enumerate(bar, start=1):
        means[key] = rank(evaluate(candidates[key](), limit=ctx.screen), None)[1]
        ctx.log(f"{name}: screening {i}/{len(keys)} {describe(key)}: mean score on {ctx.screen} rows={means[key]:.4f}")
    top = sorted(keys, key=lambda k: -means[k])[: ctx.finalists]
    finalists = [k for k in keys if k in top or k in keep]
    return finalists, {"rows": ctx.screen, "mean_scores": means, "finalists": finalists}


def select_scaling(
    ctx: MergeContext,
    vector: dict[str, torch.Tensor],
    grid: list[float],
    name: str,
    symbol: str = "lambda",
    objective: Objective = "mean",
    average: float | None = None,
) -> float:
    """The lambda of `grid` whose body theta0 + lambda * vector scores best by `objective` (`choose_body`).
    `symbol` names it in the log (FMN's is s); `average`, the lambda (if any) whose body is the plain average.
    Records the chosen value, the grid and every candidate's scores (`ctx.choose(name, "scaling", ...)`)."""
    candidates = {lam: lambda lam=lam: {k: ctx.base(k, keep=True) + lam * v for k, v in vector.items()} for lam in grid}
    average = next((lam for lam in grid if average is not None and math.isclose(lam, average)), None)
    best, measured = choose_body(
        ctx, candidates, name, objective, average=average, describe=lambda lam: f"{symbol}={lam}"
    )
    ctx.choose(name, "scaling", best, grid, **measured)
    return best
