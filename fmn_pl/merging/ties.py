"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, as the reference code does it.

1. Trim: keep each task vector's entries with |tau| >= its k-th largest magnitude over the whole body
   (top `top_k` percent; the reference's `kthvalue` at position d - int(d k/100)).
2. Elect: the sign of the sum of the trimmed vectors; where that sum is exactly 0, the majority sign
   (the sign of the sum of all elected signs), as the reference's `resolve_zero_signs("majority")`.
3. Disjoint mean: the mean of the trimmed entries whose sign agrees with the elected one.
theta = theta0 + lambda * tau_merged.

Reads: the thresholds need every model's whole body before any entry can be trimmed, so each model is read
once for them (one pass per model, each with the base); then each tensor is read once more from every model
and once from the base (`ElectedSums`: the trimmed sum, and the sums and counts of the positive and of the
negative trimmed entries, in one pass over the models), so a merge reads each checkpoint twice and the base
M + 1 times (it was 4 and M + 2). The elected sign picks the positive or the negative mean. The majority
sign is only known once every tensor's sums are: the merged body waits in the flat buffer the thresholds
used, and the few entries whose sum is exactly 0 while some trimmed entry is not (the only ones the majority
changes) keep both means until it is known.

Memory: one flat float32 body (the thresholds' |tau|, then the merged body), and per tensor the base, five
accumulators and one model's task vector; it does not grow with the number of models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from fmn_pl.merging.base import MergeContext, Option
from fmn_pl.merging.search import GRID, OBJECTIVE, SCALINGS, Objective, select_scaling
from fmn_pl.merging.task_arithmetic import DARE_SEED, TaskVectorMethod


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


@dataclass
class ElectedSums:
    """One tensor's trimmed vectors, summed in one pass over the models: everything the sign election and the
    disjoint mean need, whichever sign is elected (a handful of accumulators, not the M vectors)."""

    total: torch.Tensor  # the trimmed sum (its sign is the elected one; 0: the majority sign)
    pos_sum: torch.Tensor  # the sum of the positive trimmed entries
    pos_count: torch.Tensor  # how many (int16)
    neg_sum: torch.Tensor
    neg_count: torch.Tensor

    @classmethod
    def of(cls, trimmed: Iterable[torch.Tensor]) -> ElectedSums:
        """The sums of the trimmed vectors (modifies the first in place; the models in order, as the reference's
        sums). Each vector is dropped before the next is computed."""
        sums = None
        for t in trimmed:
            pos, neg = t > 0, t < 0
            if sums is None:
                sums = cls(t, t.clamp_min(0.0), pos.to(torch.int16), t.clamp_max(0.0), neg.to(torch.int16))
            else:
                sums.pos_sum.add_(t.clamp_min(0.0))
                sums.neg_sum.add_(t.clamp_max(0.0))
                sums.pos_count.add_(pos)
                sums.neg_count.add_(neg)
                sums.total.add_(t)
            del t, pos, neg
        assert sums is not None, "TIES needs at least one model"
        return sums

    def positive_mean(self) -> torch.Tensor:
        """The disjoint mean where the elected sign is positive (consumes pos_sum)."""
        return self.pos_sum.div_(self.pos_count.clamp_min(1))

    def negative_mean(self) -> torch.Tensor:
        """The disjoint mean where the elected sign is negative (consumes neg_sum)."""
        return self.neg_sum.div_(self.neg_count.clamp_min(1))

    def signs(self) -> int:
        """This tensor's share of the majority vote: #(sum > 0) - #(sum < 0)."""
        return int((self.total > 0).sum()) - int((self.total < 0).sum())


class Ties(TaskVectorMethod):
    """TIES-merging of task vectors: trim to the top k%, elect signs, disjoint mean, scale by lambda."""

    name = "ties"

    schema = (
        Option("top_k", "float", 20.0, "% of each task vector's largest-magnitude entries kept."),
        Option("scaling", "float | None", 1.0, "lambda on the merged task vector; null: chosen from `scalings`."),
        SCALINGS,
        Option("dare_p", "float", 0.0, "DARE drop rate applied to every task vector before trimming (0: off)."),
        DARE_SEED,
        OBJECTIVE,
    )

    def __init__(
        self,
        top_k: float = 20.0,
        scaling: float | None = 1.0,
        scalings: list[float] = GRID,
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
        self._vector: dict[str, torch.Tensor] = {}

    def setup(self, ctx: MergeContext) -> None:
        """The thresholds, the majority sign and the merged task vector of every tensor (before lambda), kept for
        `merged_vector`: each checkpoint is read twice, the base M + 1 times."""
        self._vector = self._merge_body(ctx, None)

    def _merge_body(self, ctx: MergeContext, scaling: float | None) -> dict[str, torch.Tensor]:
        """{key: theta0 + scaling * tau_merged} (or tau_merged when `scaling` is None), views of one flat buffer."""
        numel = sum(math.prod(ctx.readers[0].shape(k)) for k in ctx.keys)
        buf = np.empty(numel, dtype=np.float32)
        self._thresholds = []
        for i in tqdm(range(ctx.num_models), desc="ties thresholds", leave=False, disable=not ctx.progress):
            pos = 0
            for key in ctx.keys:
                tau = self.task_vector(ctx, i, key, ctx.base(key))
                torch.abs(tau.reshape(-1), out=torch.from_numpy(buf[pos : pos + tau.numel()]))
                pos += tau.numel()
                del tau
            self._thresholds.append(topk_threshold(buf, self.top_k))

        # The buffer's values are spent: it holds the merged body now. Where a tensor's trimmed sum is exactly 0
        # but some trimmed entry is not, the result waits for the majority sign: (key, flat indices, positive
        # mean, negative mean, base values).
        flat = torch.from_numpy(buf)
        out: dict[str, torch.Tensor] = {}
        pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        votes, pos = 0, 0
        for key in tqdm(ctx.keys, desc="ties merge", leave=False, disable=not ctx.progress):
            base = ctx.base(key)
            sums = ElectedSums.of(self.trimmed(ctx, key, base))
            votes += sums.signs()
            open_ = ((sums.total == 0) & ((sums.pos_count > 0) | (sums.neg_count > 0))).reshape(-1).nonzero()[:, 0]
            merged = flat[pos : pos + base.numel()].view(base.shape)
            pos += base.numel()
            pos_mean, neg_mean = sums.positive_mean(), sums.negative_mean()
            torch.where(sums.total > 0, pos_mean, neg_mean, out=merged)  # the zero sums: negative until known
            if len(open_):
                kept = base.reshape(-1)[open_] if scaling is not None else None
                pending.append((key, open_, pos_mean.reshape(-1)[open_], neg_mean.reshape(-1)[open_], kept))
            del sums, pos_mean, neg_mean
            if scaling is not None:
                merged.mul_(scaling).add_(base)
            out[key] = merged
            del base, merged
        self._majority = float(np.sign(votes))
        for key, idx, pos_mean, neg_mean, kept in pending:
            value = pos_mean if self._majority > 0 else neg_mean
            if kept is not None and scaling is not None:
                value = value.mul_(scaling).add_(kept)
            out[key].view(-1)[idx] = value
        ctx.notes["ties"] = {"thresholds": self._thresholds, "majority_sign": self._majority}
        return out

    def trimmed(self, ctx: MergeContext, key: str, base: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each model's trimmed task vector of one tensor, one at a time (needs `setup`'s thresholds)."""
        for i, tau in enumerate(self.task_vectors(ctx, key, base)):
            yield trim(tau, self._thresholds[i])
            del tau

    def elect(self, total: torch.Tensor) -> torch.Tensor:
        """True where the elected sign is positive, from a tensor's trimmed sum: its sign, the majority sign (known
        after `setup`) where it is 0."""
        positive = total > 0
        if self._majority > 0:
            positive |= total == 0
        return positive

    def merged_vector(self, key: str, ctx: MergeContext, base: torch.Tensor) -> torch.Tensor:
        """The merged task vector of one tensor (before lambda): the one `setup` kept (handed out once), else
        computed again from one more read of every model."""
        if key in self._vector:
            return self._vector.pop(key)
        sums = ElectedSums.of(self.trimmed(ctx, key, base))
        return torch.where(self.elect(sums.total), sums.positive_mean(), sums.negative_mean())

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        if self.scaling is not None:  # theta0 + lambda * tau_merged straight into the buffer: no third base read
            body = self._merge_body(ctx, self.scaling)
            for key in ctx.keys:
                yield key, body.pop(key)
            return
        self.setup(ctx)
        vector, self._vector = self._vector, {}
        lam = select_scaling(
            ctx, vector, self.scalings, self.name, objective=self.objective, average=self.average_scaling(ctx)
        )
        for key in ctx.keys:
            yield key, vector.pop(key).mul_(lam).add_(ctx.base(key))


def ties_task_vector(ctx: MergeContext, top_k: float = 20.0) -> dict[str, torch.Tensor]:
    """The TIES merged task vector (before lambda) of every body tensor, views of one flat buffer in memory
    (TALL/Consensus use it)."""
    method = Ties(top_k=top_k, scaling=1.0)
    method.setup(ctx)
    vector, method._vector = method._vector, {}
    return vector
