"""Fisher artifacts beside a task checkpoint: mask-node Fisher (FMN), full diagonal Fisher, and Grams.

`fmn-pl fisher --checkpoint DIR --kind mask|full|grams` runs one validation-style pass over N training
examples of the checkpoint's task and writes, atomically, into DIR:

    mask_fisher.safetensors   head [layers, heads], neuron [layers, ffn]: mean_i (dL_i/dm)^2 at m = 1
                              (per_batch: sum over batches of (d mean_batch L / dm)^2, the reference rule)
    full_fisher.safetensors   one tensor per body parameter (`bert.encoder...weight`): mean_i (dL_i/dtheta)^2
    grams.safetensors         X^T X / n of every body linear layer's inputs (RegMean; see fmn_pl.grams)

Each is a Lightning callback (`MaskFisherCallback`, `FullFisherCallback`, `GramCallback`; life cycle in
fmn_pl.passes) that a user can add to their own `trainer.validate(...)`, whatever its `inference_mode`.
Under DDP each rank sums its own shard (use `GLUEDataModule(unpadded_shards=True)` and
`Trainer(use_distributed_sampler=False)`, so no example is counted twice); sums and counts are all-reduced
once at the end and rank zero writes the file.

Losses: classification uses -log p(y|x); regression (STS-B) the MSE loss (f - y)^2. Labels: `empirical` (the
dataset's), `sampled` (drawn from the model's predictive distribution, or y ~ N(f, 1) for regression, seeded
per example so that sharding does not change them), `expected` (sum_y p(y|x) g_y^2, exact with C backward
passes; for regression E_y[(2 (f - y))^2] (df)^2 = 4 (df)^2).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from fmn_pl.module import model_inputs
from fmn_pl.nodes import adapter_for, node_shape
from fmn_pl.passes import ArtifactPass

Aggregation = Literal["per_example", "per_batch"]
LabelMode = Literal["empirical", "sampled", "expected"]


# ---------------------------------------------------------------------------------------------- mask nodes


class MaskNodes:
    """Forward pre-hooks that scale each head's context vector and each FFN neuron's activation by a mask.

    Set `head` ([L, H], or [B, L, H] for one mask per example) and `neuron` ([L, F] or [B, L, F]) before a
    forward; None leaves that node type unmasked. Head masks act on the input of the attention output
    projection reshaped to (..., H, d_head), so every attention implementation (eager, sdpa, flash) is covered.
    """

    def __init__(self, model: nn.Module) -> None:
        adapter = adapter_for(model.config)
        self.layers, self.heads, self.ffn = node_shape(model.config)
        layers = model.base_model.get_submodule(adapter.layers)
        self.attn_out = [layer.get_submodule(adapter.attn_out) for layer in layers]
        self.ffn_out = [layer.get_submodule(adapter.ffn_out) for layer in layers]
        self.head: torch.Tensor | None = None
        self.neuron: torch.Tensor | None = None

    @staticmethod
    def _scale(x: torch.Tensor, mask: torch.Tensor, groups: int) -> torch.Tensor:
        """x [..., groups * d] times mask [groups] or [B, groups] (one row per example), per group."""
        xg = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        m = mask.to(x.dtype)
        m = (
            m.reshape(*([1] * (x.dim() - 1)), groups, 1)
            if m.dim() == 1
            else m.reshape(m.shape[0], *([1] * (x.dim() - 2)), groups, 1)
        )
        return (xg * m).reshape(x.shape)

    def _hook(self, layer: int, kind: str):
        def pre(module: nn.Module, args: tuple) -> tuple | None:
            mask = self.head if kind == "head" else self.neuron
            if mask is None:
                return None
            groups = self.heads if kind == "head" else self.ffn
            return (self._scale(args[0], mask[..., layer, :], groups), *args[1:])

        return pre

    @contextlib.contextmanager
    def hooks(self) -> Iterator["MaskNodes"]:
        """Install the hooks for the duration of the block; always removed, even on error."""
        handles = [m.register_forward_pre_hook(self._hook(i, "head")) for i, m in enumerate(self.attn_out)]
        handles += [m.register_forward_pre_hook(self._hook(i, "neuron")) for i, m in enumerate(self.ffn_out)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.head = self.neuron = None


# ---------------------------------------------------------------------------------------------- losses


def _example_generator(seed: int, idx: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(idx))


def label_losses(
    logits: torch.Tensor, labels: torch.Tensor, mode: str, seed: int = 0, idx: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-example losses [B] whose squared gradients, summed over the returned list, give the Fisher.

    One entry for empirical and sampled labels; C entries for expected (class c weighted by sqrt p_c, detached).
    """
    idx = idx if idx is not None else torch.arange(len(logits))
    if logits.shape[-1] == 1:  # regression, MSE
        f = logits[:, 0]
        if mode == "empirical":
            return [(f - labels.to(f.dtype)) ** 2]
        if mode == "sampled":
            noise = torch.stack(
                [torch.randn((), generator=_example_generator(seed, i, torch.device("cpu"))) for i in idx.tolist()]
            ).to(f)
            return [(f - (f.detach() + noise)) ** 2]
        if mode == "expected":
            return [2 * f]
    else:
        logp = torch.log_softmax(logits.float(), dim=-1)
        if mode == "empirical":
            return [-logp.gather(1, labels.long()[:, None])[:, 0]]
        if mode == "sampled":
            p = logp.detach().exp().cpu()
            y = torch.stack(
                [
                    torch.multinomial(p[j], 1, generator=_example_generator(seed, i, torch.device("cpu")))[0]
                    for j, i in enumerate(idx.tolist())
                ]
            ).to(logits.device)
            return [-logp.gather(1, y[:, None])[:, 0]]
        if mode == "expected":
            w = logp.detach().exp().sqrt()
            return [-(w[:, c] * logp[:, c]) for c in range(logits.shape[-1])]
    raise ValueError(f"unknown labels mode {mode!r}; expected empirical, sampled or expected")


@contextlib.contextmanager
def frozen(model: nn.Module, trainable: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """Only `trainable` parameters require grad inside the block; the previous flags come back afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in trainable}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------- accumulators


def check_modes(aggregation: str, labels: str) -> tuple[str, str]:
    """The two Fisher options, checked before any pass starts."""
    if aggregation not in ("per_example", "per_batch"):
        raise ValueError(f"unknown aggregation {aggregation!r}; expected per_example or per_batch")
    if labels not in ("empirical", "sampled", "expected"):
        raise ValueError(f"unknown labels mode {labels!r}; expected empirical, sampled or expected")
    return aggregation, labels


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class MaskFisher:
    """Sums of squared mask-node gradients over batches: `step(model, batch)`, then `result()`."""

    kind = "mask_fisher"

    def __init__(self, model: nn.Module, aggregation: str = "per_example", labels: str = "empirical", seed: int = 0):
        self.model, self.aggregation, self.labels, self.seed = model, *check_modes(aggregation, labels), seed
        self.nodes = MaskNodes(model)
        device = next(model.parameters()).device
        dt = _sum_dtype(device)
        L_, H, F = self.nodes.layers, self.nodes.heads, self.nodes.ffn
        self.sums = {
            "head": torch.zeros(L_, H, dtype=dt, device=device),
            "neuron": torch.zeros(L_, F, dtype=dt, device=device),
        }
        self.count = torch.zeros((), dtype=dt, device=device)  # examples (per_example) or batches (per_batch)
        self.examples = torch.zeros((), dtype=dt, device=device)

    @contextlib.contextmanager
    def active(self) -> Iterator["MaskFisher"]:
        """Hooks installed and every weight frozen for the block."""
        with self.nodes.hooks(), frozen(self.model):
            yield self

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        inputs = model_inputs(batch)
        n = len(inputs["input_ids"])
        device = inputs["input_ids"].device
        lead = (n,) if self.aggregation == "per_example" else ()
        head = torch.ones(*lead, self.nodes.layers, self.nodes.heads, device=device, requires_grad=True)
        neuron = torch.ones(*lead, self.nodes.layers, self.nodes.ffn, device=device, requires_grad=True)
        self.nodes.head, self.nodes.neuron = head, neuron
        logits = self.model(**inputs).logits
        losses = label_losses(logits, batch["labels"], self.labels, self.seed, batch.get("idx"))
        reduce = torch.sum if self.aggregation == "per_example" else torch.mean
        for i, loss in enumerate(losses):
            gh, gn = torch.autograd.grad(reduce(loss), (head, neuron), retain_graph=i < len(losses) - 1)
            for key, g in (("head", gh), ("neuron", gn)):
                sq = g.to(self.sums[key].dtype) ** 2
                self.sums[key] += sq.sum(0) if self.aggregation == "per_example" else sq
        self.nodes.head = self.nodes.neuron = None
        self.count += n if self.aggregation == "per_example" else 1
        self.examples += n

    def tensors(self) -> list[torch.Tensor]:
        """Everything to all-reduce (in place) across ranks."""
        return [*self.sums.values(), self.count, self.examples]

    def meta(self) -> dict[str, Any]:
        """Header entries of the artifact."""
        return {
            "aggregation": self.aggregation,
            "labels": self.labels,
            "seed": self.seed,
            "family": adapter_for(self.model.config).family,
            "nodes": list(node_shape(self.model.config)),
        }

    def result(self) -> dict[str, torch.Tensor]:
        """float32 on CPU: means over examples (per_example) or sums over batches (per_batch, the reference)."""
        div = self.count if self.aggregation == "per_example" else torch.ones_like(self.count)
        return {k: (v / div).float().cpu() for k, v in self.sums.items()}


class FullFisher(MaskFisher):
    """Diagonal Fisher of every body parameter from per-example gradients (each example unpadded, alone)."""

    kind = "full_fisher"

    def __init__(self, model: nn.Module, aggregation: str = "per_example", labels: str = "expected", seed: int = 0):
        self.model, self.aggregation, self.labels, self.seed = model, *check_modes(aggregation, labels), seed
        prefix = model.base_model_prefix
        self.params = {f"{prefix}.{n}": p for n, p in model.base_model.named_parameters()}
        dt = _sum_dtype(next(model.parameters()).device)
        # float32 sums: one per parameter, updated N x C times, where float64 would double the time and memory.
        self.sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.count = torch.zeros((), dtype=dt, device=next(model.parameters()).device)
        self.examples = torch.zeros_like(self.count)

    def meta(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation, "labels": self.labels, "seed": self.seed}

    @contextlib.contextmanager
    def active(self) -> Iterator["FullFisher"]:
        with frozen(self.model, list(self.params.values())):
            yield self

    def _accumulate(self, logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor | None, mean: bool) -> None:
        losses = label_losses(logits, labels, self.labels, self.seed, idx)
        params = list(self.params.values())
        for i, loss in enumerate(losses):
            loss = loss.mean() if mean else loss.sum()
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            for (name, _), g in zip(self.params.items(), grads):
                if g is not None:
                    g = g.float()
                    self.sums[name].addcmul_(g, g)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        inputs = model_inputs(batch)
        n = len(inputs["input_ids"])
        idx = batch.get("idx")
        if self.aggregation == "per_batch":
            self._accumulate(self.model(**inputs).logits, batch["labels"], idx, mean=True)
            self.count += 1
        else:
            mask = inputs.get("attention_mask")
            for j in range(n):
                keep = mask[j].bool() if mask is not None else slice(None)
                one = {k: v[j][keep][None] for k, v in inputs.items()}
                self._accumulate(
                    self.model(**one).logits,
                    batch["labels"][j : j + 1],
                    None if idx is None else idx[j : j + 1],
                    mean=False,
                )
            self.count += n
        self.examples += n


# ---------------------------------------------------------------------------------------------- callbacks


class MaskFisherCallback(ArtifactPass):
    """Mask-node Fisher of the validation pass's examples, written to `mask_fisher.safetensors`."""

    kind = "mask_fisher"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        aggregation: Aggregation = "per_example",
        labels: LabelMode = "empirical",
        seed: int = 0,
        metadata: Optional[dict[str, Any]] = None,
    ) -> None:
        """
        Args:
            checkpoint_dir: the task checkpoint the pass runs on; the artifact is written there.
            aggregation: per_example (exact per-example gradients, one backward per batch) or per_batch (reference).
            labels: empirical, sampled (from the model) or expected (sum over classes weighted by p).
            seed: seed of sampled labels (per example).
            metadata: extra header entries (task, split, data settings, ...).
        """
        super().__init__(checkpoint_dir, metadata)
        self.aggregation, self.labels = check_modes(aggregation, labels)
        self.seed = seed

    def make(self, model: nn.Module) -> MaskFisher:
        return MaskFisher(model, self.aggregation, self.labels, self.seed)


class FullFisherCallback(MaskFisherCallback):
    """Diagonal Fisher of every body parameter (Fisher merging's input), written to `full_fisher.safetensors`."""

    kind = "full_fisher"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        aggregation: Aggregation = "per_example",
        labels: LabelMode = "expected",
        seed: int = 0,
        metadata: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__(checkpoint_dir, aggregation, labels, seed, metadata)

    def make(self, model: nn.Module) -> FullFisher:
        return FullFisher(model, self.aggregation, self.labels, self.seed)


# ---------------------------------------------------------------------------------------------- stage
