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

from typing import Any

import torch
from torch import nn

from fmn_pl.nodes import adapter_for


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
