"""Plain averaging: theta* = sum_j c_j theta_j / sum_j c_j (c_j = 1 by default), the baseline every report holds.

`weighted_mean` is the accumulation every weighted method shares: one model's tensor at a time, so
memory is one accumulator plus one model's tensor whatever the number of models.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fmn_pl.merging.base import LazyTensors, MergeContext, MergeMethod, Option, check_coefficients


def weighted_mean(models: LazyTensors, weights: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """sum_j w_j theta_j / sum_j w_j, elementwise; each w_j a number or a tensor broadcastable to theta_j.

    Where the weights sum to zero the result is 0/0: callers apply their own fallback first.
    """
    total = sum(weights)
    acc: torch.Tensor | None = None
    for j in range(len(models)):
        theta = models[j]  # may be a view of a memory map: never modified in place
        share = weights[j] / total  # computed in the weights' precision (float64 for Fisher weights)
        if isinstance(share, torch.Tensor):
            share = share.to(theta.dtype)
            acc = theta * share if acc is None else acc.addcmul_(theta, share)
        else:
            acc = theta * share if acc is None else acc.add_(theta, alpha=share)
        del theta  # before the next model's tensor is read: one model's tensor at a time
    assert acc is not None
    return acc


class Average(MergeMethod):
    """The plain average of the checkpoints' bodies (optionally weighted by per-model coefficients)."""

    schema = (
        Option("coefficients", "list[float] | None", None, "one weight per checkpoint (None: the plain average)."),
    )

    def __init__(self, coefficients: list[float] | None = None) -> None:
        """
        Args:
            coefficients: one weight per checkpoint, in order (None: all 1, the plain average).
        """
        self.coefficients = coefficients
        self._c: list[float] = []

    def setup(self, ctx: MergeContext) -> None:
        self._c = check_coefficients(self.coefficients, ctx.num_models, "average")

    def merge_tensor(self, key: str, models: LazyTensors, ctx: MergeContext) -> torch.Tensor:
        return weighted_mean(models, self._c)
