"""TALL masks and Consensus merging (Wang et al. 2024), over task arithmetic or TIES.

tau_MTL is the underlying method's merged task vector (task arithmetic: sum_t tau_t; TIES: the
trimmed, sign-elected disjoint mean). Task t's mask keeps the entries where task t's own vector
dominates what the others add:  m_t = 1{|tau_t| >= lambda_t |tau_MTL - tau_t|},  lambda_t chosen per
task on its selection data from `lambdas`.
- TALL (`Tall`, here): task t is served by theta0 + m_t * tau_MTL, its own body. Storage: theta0, tau_MTL
  and T bit-packed masks. The merge stage writes theta0 + tau_MTL as the output's body (the model every
  mask selects from, not one to use alone), each task folder's own body, and the packed masks in
  `tall/masks.safetensors`.
- Consensus (`fmn_pl.merging.consensus`): one body from the entries at least k masks keep.

Memory: not streamed. Holds tau_MTL (one body copy, float32), one task's tau_t, one candidate body,
and the masks bit-packed (T/32 of a body); the base is read lazily from its file.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from fmn_pl.merging.base import MergeContext, MergeMethod, Option


def tall_mask(tau: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m = |tau| >= lam |tau_MTL - tau|: entries where this task's vector dominates the others' sum."""
    return tau.abs() >= lam * (tau_mtl - tau).abs()


def consensus_mask(count: torch.Tensor, k: int) -> torch.Tensor:
    """Entries kept by at least `k` task masks (`count` = number of masks that keep each entry)."""
    return count >= k


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as uint8 bits (8 entries a byte, row-major), the storage TALL reports."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask` for a tensor of `shape`."""
    n = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.cpu().numpy(), count=n)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def compression(numel: int, itemsize: int, num_tasks: int) -> dict[str, float]:
    """TALL's storage in bytes for a body of `numel` entries: base + merged vector + packed masks, against
    storing every task's fine-tuned body (heads are stored in both cases and left out of both)."""
    base = numel * itemsize
    merged = numel * itemsize
    masks = num_tasks * ((numel + 7) // 8)
    checkpoints = num_tasks * numel * itemsize
    total = base + merged + masks
    return {
        "base_bytes": base,
        "merged_vector_bytes": merged,
        "mask_bytes": masks,
        "total_bytes": total,
        "checkpoints_bytes": checkpoints,
        "ratio": checkpoints / total,
    }


LAMBDAS = [0.2, 0.3, 0.4, 0.5, 0.6]
TOP_K = Option("top_k", "float", 20.0, "with `over: ties`: % of each task vector's largest entries kept.")


class TaskMasks(MergeMethod):
    """Shared by TALL and Consensus: tau_MTL from the underlying method, and per-task masks with lambda_t
    chosen on each task's selection data."""

    needs = frozenset({"base"})
    name = "tall"  # prefix of this method's notes in the report

    def __init__(
        self,
        over: Literal["task_arithmetic", "ties"] = "task_arithmetic",
        lambdas: list[float] = LAMBDAS,
        top_k: float = 20.0,
    ) -> None:
        if over not in ("task_arithmetic", "ties"):
            raise ValueError(f"`over` must be 'task_arithmetic' or 'ties', got {over!r}")
        if not lambdas or any(lam < 0 for lam in lambdas):
            raise ValueError(f"lambdas must be a non-empty list of numbers >= 0, got {lambdas}")
        self.over, self.lambdas, self.top_k = over, list(lambdas), top_k

    # -- tau_MTL and per-task vectors --------------------------------------------------------------------
    def merged_task_vector(self, ctx: MergeContext) -> dict[str, torch.Tensor]:
        """tau_MTL for every body key: sum_t tau_t, or the TIES merged task vector (before its lambda)."""
        if self.over == "ties":
            from fmn_pl.merging.ties import ties_task_vector

            return ties_task_vector(ctx, self.top_k)
        from fmn_pl.merging.task_arithmetic import TaskArithmetic

        ta = TaskArithmetic(scaling=1.0)  # its sum holds one model's tensor at a time
        return {k: ta.merged_vector(k, ctx, ctx.base(k)) for k in tqdm(ctx.keys, desc="tau_MTL", leave=False)}

    @staticmethod
    def task_vector(ctx: MergeContext, i: int) -> dict[str, torch.Tensor]:
        return {k: ctx.models(k)[i] - ctx.base(k) for k in ctx.keys}

    # -- masks ---------------------------------------------------------------------------------------------
    def _score(self, ctx: MergeContext, body: dict[str, torch.Tensor], task: str) -> float:
        if ctx.evaluate is None:
            raise ValueError(
                "choosing lambda per task needs selection data (the merge stage's evaluator); "
                "or give a single value in `lambdas`"
            )
        return float(ctx.evaluate(body, [task])[task])

    def select_masks(self, ctx: MergeContext, tau_mtl: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per task: lambda_t maximising its own score with theta0 + m_t * tau_MTL; its mask, bit-packed."""
        chosen: dict[str, float] = {}
        scores: dict[str, Any] = {}
        density: dict[str, float] = {}
        masks: list[dict[str, torch.Tensor]] = []
        for i, task in enumerate(tqdm(ctx.tasks, desc=f"{self.name} masks", leave=False, disable=not ctx.progress)):
            tau = self.task_vector(ctx, i)
            if len(self.lambdas) == 1:
                lam = self.lambdas[0]
            else:
                scores[task] = {}
                for lam in self.lambdas:
                    body = {k: ctx.base(k) + tall_mask(tau[k], tau_mtl[k], lam) * tau_mtl[k] for k in ctx.keys}
                    scores[task][lam] = self._score(ctx, body, task)
                    ctx.log(f"{self.name}: {task} lambda={lam} score={scores[task][lam]:.4f}")
                lam = max(self.lambdas, key=lambda x: scores[task][x])  # first best on ties
            chosen[task] = lam
            packed, kept = {}, 0
            for k in ctx.keys:  # one tensor's boolean mask at a time
                m = tall_mask(tau.pop(k), tau_mtl[k], lam)
                kept += int(m.sum())
                packed[k] = pack_mask(m)
            density[task] = kept / sum(v.numel() for v in tau_mtl.values())
            masks.append(packed)
            del tau
        ctx.notes.update({f"{self.name}_lambdas": chosen, f"{self.name}_mask_density": density})
        if scores:
            ctx.notes[f"{self.name}_lambda_scores"] = scores
        return masks


class Tall(TaskMasks):
    """TALL masks: task t is served by theta0 + m_t * tau_MTL, its own body (one merged vector plus bit masks)."""

    name = "tall"

    schema = (
        Option(
            "over",
            "Literal['task_arithmetic', 'ties']",
            "task_arithmetic",
            "the underlying merge whose task vector tau_MTL is masked.",
        ),
        Option("lambdas", "list[float]", LAMBDAS, "grid of each task's mask threshold (one value: no selection)."),
        TOP_K,
    )

    def __init__(
        self,
        over: Literal["task_arithmetic", "ties"] = "task_arithmetic",
        lambdas: list[float] = LAMBDAS,
        top_k: float = 20.0,
    ) -> None:
        """
        Args:
            over: the underlying merge whose task vector tau_MTL is masked: task arithmetic (sum of task
                vectors) or TIES (trimmed, sign-elected disjoint mean).
            lambdas: grid for each task's mask threshold lambda_t, chosen on that task's selection data (one
                value: no selection).
            top_k: with `over: ties`, the percentage of each task vector's largest entries TIES keeps.
        """
        super().__init__(over, lambdas, top_k)
        self._tau: dict[str, torch.Tensor] | None = None
        self._masks: list[dict[str, torch.Tensor]] = []

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        """Choose the masks, save them packed, report the storage, and yield theta0 + tau_MTL."""
        self._tau = self.merged_task_vector(ctx)
        self._masks = self.select_masks(ctx, self._tau)
        numel = sum(v.numel() for v in self._tau.values())
        itemsize = ctx.readers[0].get(ctx.keys[0]).element_size()
        sizes = compression(numel, itemsize, ctx.num_models)
        if ctx.workdir is not None:
            from fmn_pl.tensorfile import save_tensors

            ctx.workdir.mkdir(parents=True, exist_ok=True)
            path = ctx.workdir / "masks.safetensors"
            meta = {
                "over": self.over,
                "lambdas": json.dumps(ctx.notes[f"{self.name}_lambdas"]),
                "shapes": json.dumps({k: list(v.shape) for k, v in self._tau.items()}),
            }
            save_tensors(
                path, {f"{t}/{k}": m for t, masks in zip(ctx.tasks, self._masks) for k, m in masks.items()}, meta
            )
            sizes["mask_file_bytes"] = path.stat().st_size
        ctx.notes["tall_compression"] = sizes
        mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
        ctx.remark(
            f"TALL storage: base {mb(sizes['base_bytes'])} + merged vector {mb(sizes['merged_vector_bytes'])} + "
            f"{ctx.num_models} packed masks {mb(sizes['mask_bytes'])} = {mb(sizes['total_bytes'])}, against "
            f"{mb(sizes['checkpoints_bytes'])} for the {ctx.num_models} fine-tuned bodies ({sizes['ratio']:.2f}x); "
            "each task is evaluated with its own body theta0 + m_t * tau_MTL."
        )
        for key in ctx.keys:
            yield key, self._tau[key] + ctx.base(key)

    def task_body(self, i: int, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        if self._tau is None:
            raise ValueError("tall: task_body is called after merge")
        return self._task_body(i, ctx)

    def _task_body(self, i: int, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        tau = self._tau
        assert tau is not None
        for key in ctx.keys:
            keep = unpack_mask(self._masks[i][key], tuple(tau[key].shape))
            yield key, (tau[key] * keep).add_(ctx.base(key))
        if i == ctx.num_models - 1:  # the last task's body is written: free tau_MTL before evaluation
            self._tau, self._masks = None, []
