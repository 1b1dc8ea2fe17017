"""Mask nodes: where each model family keeps its attention heads and FFN neurons.

A family adapter names, relative to one encoder layer, the modules a mask node touches. Head
nodes scale the per-head context vectors entering `attn_out`; neuron nodes scale the
post-activation values entering `ffn_out`. Merging uses the same names to broadcast node
Fisher to parameters, so this table is the one place that knows each family's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths of one family; `layers` is relative to the base model, the rest to one layer."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    attn_norm: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    ffn_size_attr: str = "intermediate_size"

    def layer_prefix(self, base_prefix: str, layer: int) -> str:
        """Full parameter-name prefix of layer `layer`, e.g. `bert.encoder.layer.3.`."""
        return f"{base_prefix}.{self.layers}.{layer}."

    def roles(self) -> dict[str, str]:
        """role -> module path relative to a layer (query, key, value, attn_out, attn_norm, ffn_in, ffn_out,
        ffn_norm)."""
        names = ("query", "key", "value", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm")
        return {n: getattr(self, n) for n in names}


_BERT_LIKE = dict(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    ffn_norm="output.LayerNorm",
)

ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("bert", ("bert",), **_BERT_LIKE),
    FamilyAdapter("roberta", ("roberta", "xlm-roberta", "camembert"), **_BERT_LIKE),
    FamilyAdapter("electra", ("electra",), **_BERT_LIKE),
    FamilyAdapter(
        "deberta-v2",
        ("deberta-v2",),
        **{
            **_BERT_LIKE,
            "query": "attention.self.query_proj",
            "key": "attention.self.key_proj",
            "value": "attention.self.value_proj",
        },
    ),
    FamilyAdapter(
        "distilbert",
        ("distilbert",),
        layers="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        attn_norm="sa_layer_norm",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        ffn_norm="output_layer_norm",
        ffn_size_attr="hidden_dim",
    ),
)


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter for a model config (or a model), or an error naming the family and the supported ones."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"model family {model_type!r} has no mask-node adapter; supported: {supported}")


def node_shape(config: Any) -> tuple[int, int, int]:
    """(layers, heads per layer, FFN neurons per layer) of a model config (or a model)."""
    config = getattr(config, "config", config)
    adapter = adapter_for(config)
    return config.num_hidden_layers, config.num_attention_heads, getattr(config, adapter.ffn_size_attr)
