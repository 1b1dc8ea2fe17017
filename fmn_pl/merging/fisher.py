"""Full diagonal Fisher merging (Matena & Raffel 2022), the baseline FMN is compared with.

    theta* = sum_j lambda_j F_j theta_j / sum_j lambda_j F_j   with F_j = max(F_j / n_j, epsilon)

F_j is model j's diagonal Fisher of every body parameter (`full_fisher.safetensors`, keys as in the
checkpoint, e.g. `bert.encoder.layer.0.attention.self.query.weight`, or without the body prefix), n_j its
global L2 norm when `normalize` (else 1). The reference floors the Fisher at 1e-6. Entries where every
weight is 0 (only possible with epsilon 0) fall back to the lambda-weighted plain average.
Memory: three accumulators, one model's tensor and its Fisher, whatever the number of models.
"""

from __future__ import annotations

import math

import torch

from fmn_pl.merging.base import LazyTensors, MergeContext, MergeMethod, Option, check_coefficients
from fmn_pl.tensorfile import SafetensorsFile


class Fisher(MergeMethod):
    """Diagonal Fisher merging over every body parameter (`full_fisher` artifacts)."""

    needs = frozenset({"full_fisher"})

    schema = (
        Option("normalize", "bool", False, "divide each model's Fisher by its global L2 norm over the body first."),
        Option("epsilon", "float", 1e-6, "floor on every (normalised) Fisher entry (0: none)."),
        Option("coefficients", "list[float] | None", None, "per-model multipliers, one per checkpoint (None: all 1)."),
    )

    def __init__(self, normalize: bool = False, epsilon: float = 1e-6, coefficients: list[float] | None = None) -> None:
        """
        Args:
            normalize: divide each model's Fisher by its global L2 norm over the body first.
            epsilon: floor on every (normalised) Fisher entry (the reference's 1e-6; 0 = none, then entries
                where all are 0 fall back to the plain average).
            coefficients: per-model multipliers lambda_j, one per checkpoint (None: all 1).
        """
        if epsilon < 0:
            raise ValueError(f"fisher epsilon must be >= 0, got {epsilon}")
        self.normalize, self.epsilon, self.coefficients = normalize, epsilon, coefficients
        self._c: list[float] = []
        self._norms: list[float] = []
        self._names: list[dict[str, str]] = []  # per model: body key -> key in its artifact
        self._files: list[SafetensorsFile] = []  # the artifacts read without memory maps (checked when opened)

    def setup(self, ctx: MergeContext) -> None:
        self._c = check_coefficients(self.coefficients, ctx.num_models, "fisher")
        self._names, self._files = [], []
        for i in range(ctx.num_models):
            art = ctx.artifact(i, "full_fisher")
            self._files.append(SafetensorsFile(art.path))
            have = set(art.keys())
            names = {}
            for key in ctx.keys:
                short = key[len(ctx.body_prefix) :] if key.startswith(ctx.body_prefix) else key
                name = key if key in have else short if short in have else None
                if name is None:
                    raise ValueError(f"{art.path} has no Fisher for {key!r}: recompute it for this checkpoint")
                names[key] = name
            self._names.append(names)
        self._norms = [1.0] * ctx.num_models
        if self.normalize:
            for i in range(ctx.num_models):
                art = ctx.artifact(i, "full_fisher")
                sq = sum(float(self._read(i, k).double().square().sum()) for k in ctx.keys)
                if sq == 0:
                    raise ValueError(f"{art.path}: the Fisher is zero on the whole body, cannot normalise it")
                self._norms[i] = math.sqrt(sq)
            ctx.notes["fisher_norms"] = self._norms

    def _read(self, i: int, key: str) -> torch.Tensor:
        f = self._files[i]
        t = f.get(self._names[i][key]).float()
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"{f.path}: Fisher of {key!r} has NaN, Inf or negative entries")
        return t

    def fisher(self, ctx: MergeContext, i: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        f = self._read(i, key)
        if tuple(f.shape) != shape:
            raise ValueError(f"{self._files[i].path}: Fisher of {key!r} has shape {tuple(f.shape)}, expected {shape}")
        return (f / self._norms[i]).clamp_min(self.epsilon)

    def merge_tensor(self, key: str, models: LazyTensors, ctx: MergeContext) -> torch.Tensor:
        num = den = plain = torch.empty(0)
        for j in range(len(models)):
            theta = models[j]
            w = self.fisher(ctx, j, key, tuple(theta.shape)) * self._c[j]
            if j == 0:
                num, den, plain = w * theta, w, theta * self._c[j]
            else:
                num.addcmul_(w, theta)
                den.add_(w)
                plain.add_(theta, alpha=self._c[j])
            del theta, w  # before the next model's tensors are read
        zero = den == 0
        plain.div_(sum(self._c))
        return torch.where(zero, plain, num / torch.where(zero, torch.ones_like(den), den))
