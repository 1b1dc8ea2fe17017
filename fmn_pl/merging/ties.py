"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, as the reference code does it.

1. Trim: keep each task vector's entries with |tau| >= its k-th largest magnitude over the whole body
   (top `top_k` percent; the reference's `kthvalue` at position d - int(d k/100)).
2. Elect: the sign of the sum of the trimmed vectors; where that sum is exactly 0, the majority sign
   (the sign of the sum of all elected signs), as the reference's `resolve_zero_signs("majority")`.
3. Disjoint mean: the mean of the trimmed entries whose sign agrees with the elected one.
theta = theta0 + lambda * tau_merged.

Memory: the thresholds need one model's |tau| over the whole body at a time (one flat float32 body copy,
partitioned in place); then, per tensor, the base, two accumulators and one model's task vector.
Passes: one per model for the thresholds, one over all models for the majority sign, then two per tensor.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from fmn_pl.merging.base import MergeContext
from fmn_pl.merging.task_arithmetic import GRID, Objective, TaskVectorMethod


def topk_threshold(magnitudes: np.ndarray, top_k: float) -> float:
    """The magnitude at or above which the top `top_k` percent are kept; partitions `magnitudes` in place."""
    d = magnitudes.size
    k = d - int(d * top_k / 100.0)
    if k <= 0:
        return 0.0
    magnitudes.partition(k - 1)
    return float(magnitudes[k - 1])


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries of `tau` below `threshold` in magnitude (in place; boolean temporaries only)."""
    return tau.masked_fill_((tau < threshold) & (tau > -threshold), 0.0)


def disjoint_mean(trimmed: Iterable[torch.Tensor], positive: torch.Tensor) -> torch.Tensor:
    """Mean of the entries that agree with the elected sign: the positive ones where `positive`, else the negative
    ones (modifies the trimmed vectors in place; counts in int16)."""
    num = count = None
    for t in trimmed:
        keep = torch.where(positive, t > 0, t < 0)
        t = t.mul_(keep)
        num = t if num is None else num.add_(t)
        count = keep.to(torch.int16) if count is None else count.add_(keep)
        del t, keep  # before the next task vector is computed
    assert num is not None and count is not None
    return num.div_(count.clamp_min(1))


class Ties(TaskVectorMethod):
    """TIES-merging of task vectors: trim to the top k%, elect signs, disjoint mean, scale by lambda."""

    name = "ties"

    def __init__(
        self,
        top_k: float = 20.0,
        scaling: float | None = 1.0,
        scalings: list[float] = GRID,  # noqa: B006 - read-only default, shown by --help
        dare_p: float = 0.0,
        dare_seed: int = 0,
        objective: Objective = "mean",
    ) -> None:
        """
        Args:
            top_k: percentage of each task vector's largest-magnitude entries kept (over the whole body).
            scaling: lambda applied to the merged task vector; null chooses it from `scalings` on selection data.
            scalings: the grid lambda is chosen from when `scaling` is null.
            dare_p: DARE drop rate applied to every task vector before trimming (0 = off).
            dare_seed: seed of DARE's drop pattern (one generator per seed, model and tensor).
            objective: what a chosen lambda maximises: mean (the mean selection score over the tasks) or
                worst_gain (the smallest gain over the plain average among the tasks, then the mean).
        """
        if not 0.0 < top_k <= 100.0:
            raise ValueError(f"ties top_k is a percentage in (0, 100], got {top_k}")
        super().__init__(scaling, scalings, dare_p, dare_seed, objective)
        self.top_k = top_k
        self._thresholds: list[float] = []
        self._majority = 1.0

    def setup(self, ctx: MergeContext) -> None:
        """Each model's global magnitude threshold (one model at a time), then the majority sign."""
        numel = sum(math.prod(ctx.readers[0].shape(k)) for k in ctx.keys)
        buf = np.empty(numel, dtype=np.float32)
        self._thresholds = []
        for i in tqdm(range(ctx.num_models), desc="ties thresholds", leave=False):
            pos = 0
            for key in ctx.keys:
                tau = self.task_vector(ctx, i, key, ctx.base(key))
                torch.abs(tau.reshape(-1), out=torch.from_numpy(buf[pos : pos + tau.numel()]))
                pos += tau.numel()
                del tau
            self._thresholds.append(topk_threshold(buf, self.top_k))
        del buf
        total = 0
        for key in ctx.keys:
            s = self._trimmed_sum(key, ctx, ctx.base(key))
            total += int((s > 0).sum()) - int((s < 0).sum())
        self._majority = float(np.sign(total))
        ctx.notes["ties"] = {"thresholds": self._thresholds, "majority_sign": self._majority}

    def _trimmed(self, ctx: MergeContext, key: str, base: torch.Tensor) -> Iterator[torch.Tensor]:
        for i, tau in enumerate(self.task_vectors(ctx, key, base)):
            yield trim(tau, self._thresholds[i])
            del tau

    def _trimmed_sum(self, key: str, ctx: MergeContext, base: torch.Tensor) -> torch.Tensor:
        acc = None
        for t in self._trimmed(ctx, key, base):
            acc = t if acc is None else acc.add_(t)
            del t
        assert acc is not None
        return acc

    def elected_positive(self, key: str, ctx: MergeContext, base: torch.Tensor) -> torch.Tensor:
        """True where the elected sign is positive: the trimmed sum's sign, the majority sign where it is 0."""
        s = self._trimmed_sum(key, ctx, base)
        positive = s > 0
        if self._majority > 0:
            positive |= s == 0
        return positive

    def merged_vector(self, key: str, ctx: MergeContext, base: torch.Tensor) -> torch.Tensor:
        positive = self.elected_positive(key, ctx, base)
        return disjoint_mean(self._trimmed(ctx, key, base), positive)


def ties_task_vector(ctx: MergeContext, top_k: float = 20.0) -> dict[str, torch.Tensor]:
    """The TIES merged task vector (before lambda) of every body tensor, held in memory (TALL/Consensus use it)."""
    method = Ties(top_k=top_k, scaling=1.0)
    method.setup(ctx)
    return {k: method.merged_vector(k, ctx, ctx.base(k)) for k in tqdm(ctx.keys, desc="ties vector", leave=False)}
