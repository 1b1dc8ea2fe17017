"""RegMean (Jin et al. 2023): each linear layer's merged weight solves the least-squares problem that
makes it reproduce every model's outputs on that model's own inputs.

    W* = (sum_i G~_i)^-1 sum_i G~_i W_i^T   (transposed back), G~ = alpha G + (1 - alpha) diag(G)

G_i is model i's Gram of the layer inputs (`grams.safetensors`, see `fmn_pl.grams`). Biases, embeddings
and LayerNorms are plain averages. Streams one layer at a time: it holds the M Grams of one layer
(M d_in^2 floats, in float64) and the M weights of one tensor; query, key and value reuse one Gram group.
"""

from __future__ import annotations

from typing import cast

import torch

from fmn_pl.grams import body_gram_keys
from fmn_pl.merging.base import LazyTensors, MergeContext, MergeMethod, Option


def regmean_solve(
    grams: list[torch.Tensor],
    weights: list[torch.Tensor],
    alpha: float = 1.0,
    ridge: float = 1e-5,
    rcond: float = 1e-10,
) -> tuple[torch.Tensor, bool]:
    """The RegMean weight (d_out, d_in) from M Grams (d_in, d_in) and M weights; and whether a ridge was added.

    When the summed Gram is singular (smallest eigenvalue <= rcond x largest), `ridge` x its mean diagonal
    is added to every model's Gram: directions no model's inputs span fall back to the plain average.
    """
    gs = [scale_off_diagonal(g.double(), alpha) for g in grams]
    total = cast(torch.Tensor, sum(gs))
    rhs = sum(g @ w.double().T for g, w in zip(gs, weights))
    eig = eigvalsh_one_thread(total)
    singular = bool(eig[0] <= rcond * eig[-1].clamp_min(torch.finfo(torch.float64).tiny))
    if singular:
        delta = ridge * total.diagonal().mean().clamp_min(1e-12) / len(gs)
        eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
        total = total + len(gs) * delta * eye
        rhs = rhs + delta * sum(w.double().T for w in weights)
    return torch.linalg.solve(total, rhs).T.float(), singular


def eigvalsh_one_thread(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric CPU matrix on one thread: LAPACK's multi-threaded solver took seconds per
    384 x 384 Gram on a busy 2-core machine where one thread takes milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(matrix)
    finally:
        torch.set_num_threads(threads)


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): alpha=1 exact least squares, alpha=0 a diagonal (per-input) weighting."""
    if alpha == 1.0:
        return gram
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(gram.diagonal())


class RegMean(MergeMethod):
    """RegMean over the Gram artifacts of every checkpoint (`fmn-pl fisher --kind grams`)."""

    needs = frozenset({"grams"})

    schema = (
        Option("alpha", "float", 1.0, "scale of the Grams' off-diagonal entries (1: exact least squares)."),
        Option("ridge", "float", 1e-5, "ridge added (times the mean diagonal) where a summed Gram is singular."),
    )

    def __init__(self, alpha: float = 1.0, ridge: float = 1e-5) -> None:
        """
        Args:
            alpha: scale of the Grams' off-diagonal entries (1.0 = exact least squares, the reference's GLUE
                setting for RoBERTa/DistilBERT; smaller values such as 0.9 or 0.1 regularise towards a
                per-input weighted average and help some models).
            ridge: when a layer's summed Gram is singular, this fraction of its mean diagonal is added to
                every model's Gram (logged, and listed in the report's notes).
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"regmean alpha must be in [0, 1], got {alpha}")
        if ridge <= 0:
            raise ValueError(f"regmean ridge must be > 0, got {ridge}")
        self.alpha, self.ridge = alpha, ridge
        self._weight_gram: dict[str, str] = {}
        self._cache: tuple[str, list[torch.Tensor]] | None = None

    def setup(self, ctx: MergeContext) -> None:
        """Map every linear weight of the body to its Gram and check each model's artifact holds them."""
        linear = body_gram_keys(ctx.config)
        self._weight_gram = {f"{m}.weight": g for m, g in linear.items() if f"{m}.weight" in ctx.keys}
        self._cache = None
        needed = sorted(set(self._weight_gram.values()))
        for i in range(ctx.num_models):
            art = ctx.artifact(i, "grams")
            missing = [k for k in needed if k not in art.keys()]
            if missing:
                raise ValueError(f"{art.path} lacks the Gram(s) of {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        ctx.notes.setdefault("regmean_ridge", [])
        meta = ctx.artifact(0, "grams").metadata
        ctx.notes["regmean_grams"] = {
            "include_padding": meta.get("include_padding"),
            "num_examples": [ctx.artifact(i, "grams").metadata.get("num_examples") for i in range(ctx.num_models)],
        }

    def _grams(self, gram_key: str, ctx: MergeContext, d_in: int) -> list[torch.Tensor]:
        if self._cache is None or self._cache[0] != gram_key:
            grams = [ctx.artifact(i, "grams").get(gram_key) for i in range(ctx.num_models)]
            for i, g in enumerate(grams):
                if tuple(g.shape) != (d_in, d_in):
                    raise ValueError(
                        f"{ctx.artifact(i, 'grams').path}: Gram {gram_key!r} has shape "
                        f"{tuple(g.shape)}, expected ({d_in}, {d_in})"
                    )
            self._cache = (gram_key, grams)
        return self._cache[1]

    def merge_tensor(self, key: str, models: LazyTensors, ctx: MergeContext) -> torch.Tensor:
        if key not in self._weight_gram:
            return cast(torch.Tensor, sum(models[i] for i in range(len(models)))) / len(models)
        weights = [models[i] for i in range(len(models))]
        gram_key = self._weight_gram[key]
        merged, singular = regmean_solve(
            self._grams(gram_key, ctx, weights[0].shape[1]), weights, self.alpha, self.ridge
        )
        if singular:
            ctx.log(
                f"regmean: the summed Gram of {gram_key} is singular; added a ridge of {self.ridge} x its mean "
                f"diagonal for {key} (directions no input spans fall back to the plain average)"
            )
            ctx.notes["regmean_ridge"].append(key)
        return merged
