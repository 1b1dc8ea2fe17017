"""Task arithmetic (Ilharco et al. 2023): theta = theta0 + lambda * sum_t tau_t, tau_t = theta_t - theta0.

`TaskVectorMethod` is the part every task-vector method shares (TIES uses it too): the base model, each
model's task vector of one tensor at a time (optionally DARE-processed), and the scaling lambda, fixed or
chosen on selection data from a grid. Memory with a fixed lambda: the base tensor, one accumulator and
one model's tensor. Choosing lambda holds the merged task vector of the whole body (one body copy) and
one candidate body while it is scored.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Iterator, Literal, cast

import torch
from tqdm.auto import tqdm

from fmn_pl.merging.base import LazyTensors, MergeContext, MergeMethod, Option
from fmn_pl.merging.dare import dare, dare_generator

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
Objective = Literal["mean", "worst_gain"]
# options several methods share
SCALINGS = Option("scalings", "list[float]", GRID, "the grid lambda is chosen from when `scaling` is null.")
DARE_SEED = Option("dare_seed", "int", 0, "seed of DARE's drop pattern (one generator per seed, model and tensor).")
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


class TaskVectorMethod(MergeMethod, abc.ABC):
    """Base of methods on task vectors: base model, per-model task vectors (with DARE), and lambda."""

    needs = frozenset({"base"})
    name = "task_vectors"

    def __init__(
        self,
        scaling: float | None,
        scalings: list[float] | None = None,
        dare_p: float = 0.0,
        dare_seed: int = 0,
        objective: Objective = "mean",
    ) -> None:
        self.objective = check_objective(objective, self.name)
        if not 0.0 <= dare_p < 1.0:
            raise ValueError(f"{self.name}: dare_p must be in [0, 1), got {dare_p}")
        self.scaling, self.scalings = scaling, list(scalings) if scalings is not None else list(GRID)
        if not self.scalings:
            raise ValueError(f"{self.name}: scalings must not be empty")
        self.dare_p, self.dare_seed = dare_p, dare_seed

    def task_vector(self, ctx: MergeContext, i: int, key: str, base: torch.Tensor) -> torch.Tensor:
        """tau_i of one tensor, a tensor the caller owns (DARE drop-and-rescale applied when dare_p > 0; same
        pattern on every call). Computed in place: the reader hands out tensors the caller owns (saves one copy)."""
        tau = ctx.models(key)[i].sub_(base)
        if self.dare_p > 0:
            tau = dare(tau, self.dare_p, dare_generator(self.dare_seed, i, key))
        return tau

    def task_vectors(self, ctx: MergeContext, key: str, base: torch.Tensor) -> Iterator[torch.Tensor]:
        """The models' task vectors of one tensor, one at a time (memory does not grow with the count)."""
        for i in range(ctx.num_models):
            yield self.task_vector(ctx, i, key, base)

    @abc.abstractmethod
    def merged_vector(self, key: str, ctx: MergeContext, base: torch.Tensor) -> torch.Tensor:
        """The method's merged task vector of one tensor (before lambda): a new tensor the caller may modify."""

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        self.setup(ctx)
        if self.scaling is not None:
            for key in ctx.keys:
                base = ctx.base(key)
                merged = self.merged_vector(key, ctx, base).mul_(self.scaling).add_(base)  # a new tensor: in place
                del base  # not held while the consumer asks for the next tensor
                yield key, merged
                del merged
            return
        vector = {
            k: self.merged_vector(k, ctx, ctx.base(k)) for k in tqdm(ctx.keys, desc=f"{self.name} vector", leave=False)
        }
        lam = select_scaling(
            ctx, vector, self.scalings, self.name, objective=self.objective, average=self.average_scaling(ctx)
        )
        for key in ctx.keys:
            yield key, vector.pop(key).mul_(lam).add_(ctx.base(key))

    def average_scaling(self, ctx: MergeContext) -> float | None:
        """The lambda at which this method's body is the plain average (worst_gain's reference), if there is one."""
        return None

    def merge_tensor(self, key: str, models: LazyTensors, ctx: MergeContext) -> torch.Tensor:
        if self.scaling is None:
            raise ValueError(f"{self.name}: scaling=null needs the whole-body merge (`merge`), not one tensor")
        base = ctx.base(key)
        return self.merged_vector(key, ctx, base).mul_(self.scaling).add_(base)


class TaskArithmetic(TaskVectorMethod):
    """Task arithmetic: theta0 + lambda * sum_t tau_t."""

    name = "task_arithmetic"

    schema = (
        Option("scaling", "float | None", None, "lambda; null: chosen from `scalings` on the selection split."),
        SCALINGS,
        Option("dare_p", "float", 0.0, "DARE drop rate applied to every task vector first (0: off)."),
        DARE_SEED,
        OBJECTIVE,
    )

    def __init__(
        self,
        scaling: float | None = None,
        scalings: list[float] = GRID,
        dare_p: float = 0.0,
        dare_seed: int = 0,
        objective: Objective = "mean",
    ) -> None:
        """
        Args:
            scaling: lambda; null chooses it from `scalings` on the selection split (see `objective`).
            scalings: the grid lambda is chosen from when `scaling` is null.
            dare_p: DARE drop rate applied to every task vector first (0 = off): drop each entry with
                probability p and rescale the rest by 1/(1-p).
            dare_seed: seed of DARE's drop pattern (one generator per seed, model and tensor).
            objective: what a chosen lambda maximises: mean (the mean selection score over the tasks) or
                worst_gain (the smallest gain over the plain average among the tasks, then the mean).
        """
        super().__init__(scaling, scalings, dare_p, dare_seed, objective)

    def average_scaling(self, ctx: MergeContext) -> float | None:
        return 1.0 / ctx.num_models if self.dare_p == 0 else None  # theta0 + sum_t tau_t / M: the plain average

    def merged_vector(self, key: str, ctx: MergeContext, base: torch.Tensor) -> torch.Tensor:
        acc: torch.Tensor | None = None
        for tau in self.task_vectors(ctx, key, base):
            acc = tau if acc is None else acc.add_(tau)
            del tau  # before the next task vector is computed
        assert acc is not None
        return acc
