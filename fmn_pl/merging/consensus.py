"""Consensus merging (Wang et al. 2024): keep the entries of the merged task vector that at least k tasks'
TALL masks keep, theta = theta0 + lambda * (m_cons * tau_MTL), over task arithmetic or TIES.

Masks and tau_MTL as in `fmn_pl.merging.tall` (lambda_t chosen per task on its selection data); k = 0 keeps
every entry and reduces to the underlying method; lambda fixed, or chosen on selection data as task
arithmetic's is. Memory: not streamed, as TALL (tau_MTL, one task vector, one candidate body, packed masks).
"""

from __future__ import annotations

from typing import Iterator, Literal, cast

import torch

from fmn_pl.merging.base import MergeContext, Option
from fmn_pl.merging.search import GRID, SCALINGS, select_scaling
from fmn_pl.merging.tall import LAMBDAS, TOP_K, TaskMasks, consensus_mask, unpack_mask


class Consensus(TaskMasks):
    """Consensus merging: theta0 + lambda * (m_cons * tau_MTL), m_cons = entries kept by >= k task masks."""

    name = "consensus"

    schema = (
        Option(
            "over",
            "Literal['task_arithmetic', 'ties']",
            "task_arithmetic",
            "the underlying merge whose task vector is masked.",
        ),
        Option("k", "int", 2, "keep an entry kept by >= k tasks' TALL masks (0: no mask)."),
        Option("scaling", "float | None", None, "lambda on the masked vector; null: chosen from `scalings`."),
        SCALINGS,
        Option("lambdas", "list[float]", LAMBDAS, "grid of each task's TALL mask threshold (chosen per task)."),
        TOP_K,
    )

    def __init__(
        self,
        over: Literal["task_arithmetic", "ties"] = "task_arithmetic",
        k: int = 2,
        scaling: float | None = None,
        scalings: list[float] = GRID,
        lambdas: list[float] = LAMBDAS,
        top_k: float = 20.0,
    ) -> None:
        """
        Args:
            over: the underlying merge whose task vector is masked: task arithmetic (sum of task vectors)
                or TIES (trimmed, sign-elected disjoint mean).
            k: keep an entry when at least k tasks' TALL masks keep it (k=0: the underlying method).
            scaling: lambda (the paper's alpha) applied to the masked vector; null chooses it from `scalings`
                by the mean selection score, as task arithmetic does.
            scalings: the grid lambda is chosen from when `scaling` is null.
            lambdas: grid for each task's TALL mask threshold lambda_t, chosen on that task's selection data.
            top_k: with `over: ties`, the percentage of each task vector's largest entries TIES keeps.
        """
        super().__init__(over, lambdas, top_k)
        if k < 0:
            raise ValueError(f"consensus k must be >= 0, got {k}")
        if not scalings:
            raise ValueError("consensus scalings must not be empty")
        self.k, self.scaling, self.scalings = k, scaling, list(scalings)

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        if self.k > ctx.num_models:
            raise ValueError(f"consensus k={self.k} exceeds the {ctx.num_models} tasks: no entry would be kept")
        kept = self.merged_task_vector(ctx)
        numel = sum(v.numel() for v in kept.values())
        n_kept = numel
        if self.k > 0:  # k = 0 keeps every entry: no masks needed
            masks = self.select_masks(ctx, kept)
            n_kept = 0
            for key, v in kept.items():
                count = cast(torch.Tensor, sum(unpack_mask(m[key], tuple(v.shape)).to(torch.uint8) for m in masks))
                keep = consensus_mask(count, self.k)
                n_kept += int(keep.sum())
                v.mul_(keep)
            del masks
        ctx.notes["consensus_kept_fraction"] = n_kept / numel
        lam = self.scaling if self.scaling is not None else select_scaling(ctx, kept, self.scalings, self.name)
        for key in ctx.keys:
            yield key, kept.pop(key).mul_(lam).add_(ctx.base(key))
