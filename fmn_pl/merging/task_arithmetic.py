"""Task arithmetic (Ilharco et al. 2023): theta = theta0 + lambda * sum_t tau_t, tau_t = theta_t - theta0.

`TaskVectorMethod` is the part every task-vector method shares (TIES uses it too): the base model, each
model's task vector of one tensor at a time (optionally DARE-processed), and the scaling lambda, fixed or
chosen on selection data from a grid. Memory with a fixed lambda: the base tensor, one accumulator and
one model's tensor. Choosing lambda holds the merged task vector of the whole body (one body copy) and
one candidate body while it is scored.
"""

from __future__ import annotations

import abc
from typing import Iterator

import torch
from tqdm.auto import tqdm

from fmn_pl.merging.base import LazyTensors, MergeContext, MergeMethod, Option
from fmn_pl.merging.dare import dare, dare_generator
from fmn_pl.merging.search import GRID, OBJECTIVE, SCALINGS, Objective, check_objective, select_scaling

# an option the task-vector methods share
DARE_SEED = Option("dare_seed", "int", 0, "seed of DARE's drop pattern (one generator per seed, model and tensor).")


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
