"""Gram matrices of the inputs of every linear layer in the body, for RegMean (`fmn-pl fisher --kind grams`).

Artifact `grams.safetensors` beside a task checkpoint, float32, one tensor per Gram:

    key   the module name of the nn.Linear in the task model, e.g. `bert.encoder.layer.0.intermediate.dense`
          (its weight is `<key>.weight`). Query, key and value read the same input, so their one Gram is
          stored under the query's name only (`...attention.self.query`); `gram_keys` maps all three to it.
    value G = X^T X / n over the n input rows the layer saw: token positions (padding excluded unless
          `include_padding`), or one row per example for layers fed a single vector (the pooler).
    meta  kind "grams", task, fingerprint, num_examples, include_padding, and `rows` {key: n}.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from fmn_pl.nodes import adapter_for
from fmn_pl.passes import ArtifactPass


def gram_keys(model: nn.Module) -> dict[str, str]:
    """{name of every nn.Linear in the body: name of the Gram it uses}; key/value map to their query."""
    base = model.base_model
    prefix = model.base_model_prefix
    names = [f"{prefix}.{n}" for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    out = {n: n for n in names}
    try:
        adapter = adapter_for(model.config)
    except ValueError:  # unknown family: one Gram per linear layer, no sharing
        return out
    for layer in range(model.config.num_hidden_layers):
        lp = adapter.layer_prefix(prefix, layer)
        query = lp + adapter.query
        if query in out:
            for role in (adapter.key, adapter.value):
                if lp + role in out:
                    out[lp + role] = query
    return out


def body_gram_keys(config: Any) -> dict[str, str]:
    """`gram_keys` of the sequence-classification model of `config`, built on the meta device (no memory)."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return gram_keys(model)


class GramAccumulator:
    """Forward pre-hooks on the body's linear layers that sum X^T X (float64) and count the input rows.

    Set `attention_mask` before each forward: with `include_padding=False` only the rows of real tokens
    enter the sums. Query/key/value share one hook (on the query). Use `with acc.hooks(): ...`.
    """

    def __init__(self, model: nn.Module, include_padding: bool = False) -> None:
        self.include_padding = include_padding
        self.attention_mask: torch.Tensor | None = None
        self.examples = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        modules = dict(model.named_modules())
        self.modules = {g: modules[g] for g in dict.fromkeys(gram_keys(model).values())}
        # Allocated up front on each layer's device, so every rank holds the same tensors to all-reduce.
        self.sums = {
            n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
            for n, m in self.modules.items()
        }
        self.rows = {n: torch.zeros((), dtype=torch.float64, device=m.weight.device) for n, m in self.modules.items()}

    def _hook(self, name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = self.attention_mask
            if not self.include_padding and mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.to(x.device).bool()]
            x = x.reshape(-1, x.shape[-1]).float()
            self.sums[name] += (x.T @ x).double()
            self.rows[name] += x.shape[0]

        return pre

    @contextlib.contextmanager
    def hooks(self) -> Iterator["GramAccumulator"]:
        """Install the hooks for the duration of the block; always removed, even on error."""
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def active(self) -> contextlib.AbstractContextManager:
        return self.hooks()

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """Before the module's forward of `batch`: remember its attention mask and count its examples."""
        self.attention_mask = batch.get("attention_mask")
        self.examples += len(batch["input_ids"])

    def tensors(self) -> list[torch.Tensor]:
        return [*self.sums.values(), *self.rows.values(), self.examples]

    def meta(self) -> dict[str, Any]:
        return {"include_padding": self.include_padding, "rows": {n: int(r.item()) for n, r in self.rows.items()}}

    def result(self) -> dict[str, torch.Tensor]:
        return self.grams()

    def grams(self) -> dict[str, torch.Tensor]:
        """G = sum X^T X / rows per layer, float32 on CPU (call after any all-reduce of sums and rows)."""
        missing = [n for n in self.modules if not self.rows[n]]
        if missing:
            raise ValueError(f"no input reached linear layer(s) {missing[:3]}: was the pass empty?")
        return {n: (self.sums[n] / self.rows[n]).float().cpu() for n in self.modules}


class GramCallback(ArtifactPass):
    """Collects the Grams during a validation-style pass and writes `grams.safetensors` beside the checkpoint.

    The Grams are read by hooks during the module's own forward (the pass needs no gradients). Each rank
    sums its own shard; sums and row counts are all-reduced once at the end (shard without padding:
    `GLUEDataModule(unpadded_shards=True)`), and rank zero writes the artifact atomically.
    """

    kind = "grams"

    def __init__(
        self, checkpoint_dir: str | Path, include_padding: bool = False, metadata: dict[str, Any] | None = None
    ) -> None:
        """
        Args:
            checkpoint_dir: the task checkpoint the pass runs on; the artifact is written there.
            include_padding: also count padding positions (the reference RegMean code does).
            metadata: extra header entries (task, data settings, ...).
        """
        super().__init__(checkpoint_dir, metadata)
        self.include_padding = include_padding

    def make(self, model: nn.Module) -> GramAccumulator:
        return GramAccumulator(model, self.include_padding)
