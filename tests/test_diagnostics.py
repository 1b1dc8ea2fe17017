"""Merge diagnostics: per-layer task-vector norms and cosines against a plain loop over state dicts, the Fisher
scale against the artifact, prediction shares against the scored rows, and the section in every merge report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from fmn_pl.diagnostics import fisher_scale, prediction_shares, task_vectors
from fmn_pl.merge import run_merge
from fmn_pl.merge_config import MergeConfig
from fmn_pl.merge_inputs import check_inputs
from fmn_pl.merging.average import Average
from fmn_pl.options import EvalOptions
from tests.test_merge_cli import add_fisher


def slow_group(key: str) -> str:
    """The group of a `bert.` key, by its name parts (independent of `layer_group`'s regex)."""
    parts = key.split(".")
    if parts[1] == "encoder" and parts[2] == "layer":
        return f"layer{parts[3]}"
    return {"embeddings": "embeddings", "pooler": "pooler"}.get(parts[1], "other")


def slow_task_vectors(base: Path, checkpoints: list[Path]) -> tuple[list[dict], dict]:
    """Per task {group: norm} and per pair {group: cosine}, by a plain loop over whole state dicts."""
    theta0 = {f"bert.{k}": v.double() for k, v in load_file(base / "model.safetensors").items()}
    deltas = []
    for c in checkpoints:
        sd = load_file(c / "model.safetensors")
        deltas.append({k: sd[k].double() - theta0[k] for k in theta0 if k in sd and sd[k].is_floating_point()})
    groups = {slow_group(k) for k in deltas[0]} | {"all"}
    flat = lambda d, g: torch.cat([v.flatten() for k, v in d.items() if g in ("all", slow_group(k))])  # noqa: E731
    vec = [{g: flat(d, g) for g in groups} for d in deltas]
    norms = [{g: float(v[g].norm()) for g in groups} for v in vec]
    cos = {g: float(torch.nn.functional.cosine_similarity(vec[0][g], vec[1][g], dim=0)) for g in groups}
    return norms, cos


def test_task_vectors_match_a_plain_loop(make_checkpoint: Callable, tiny_base: Callable) -> None:
    cks = [make_checkpoint("sst2", seed=1, noise=0.03), make_checkpoint("stsb", seed=2, noise=0.05)]
    inputs = check_inputs(cks, Average(), None)
    tv = task_vectors(inputs, tiny_base("bert"))
    norms, cos = slow_task_vectors(tiny_base("bert"), cks)
    assert tv["groups"] == ["embeddings", "layer0", "layer1", "pooler", "all"]
    assert set(tv["groups"]) == set(cos)
    for i, task in enumerate(["sst2", "stsb"]):
        assert tv["norm"][task] == pytest.approx(norms[i], rel=1e-9)
    assert tv["cosine"]["sst2 vs stsb"] == pytest.approx(cos, rel=1e-6, abs=1e-9)
    total = math.sqrt(sum(tv["norm"]["stsb"][g] ** 2 for g in tv["groups"][:-1]))
    assert tv["norm"]["stsb"]["all"] == pytest.approx(total)  # the groups partition the body


def test_fisher_scale_is_the_mean_node_fisher_per_layer(make_checkpoint: Callable) -> None:
    cks = [make_checkpoint("sst2", seed=1), make_checkpoint("stsb", seed=2)]
    add_fisher(cks[1], seed=5)
    scale = fisher_scale(check_inputs(cks, Average(), None))
    assert set(scale) == {"stsb"}  # only the checkpoint with an artifact
    saved = load_file(cks[1] / "mask_fisher.safetensors")
    for kind in ("head", "neuron"):
        assert scale["stsb"][kind] == pytest.approx([float(row.mean()) for row in saved[kind]])


def test_prediction_shares() -> None:
    assert prediction_shares([1, 1, 0, 1], ["negative", "positive"]) == {"negative": 0.25, "positive": 0.75}
    assert prediction_shares([1.0, 3.0], []) == {"mean": 2.0, "std": 1.0}


def test_every_merge_report_has_diagnostics(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    cks = [make_checkpoint("sst2", seed=1), make_checkpoint("stsb", seed=2)]
    add_fisher(cks[0], seed=3)
    out = tmp_path / "out"
    typed = run_merge(
        MergeConfig(
            [str(c) for c in cks],
            Average(),
            str(out),
            data_dir=str(tiny_glue),
            eval=EvalOptions(max_samples=16),
            progress=False,
        )
    )
    report = json.loads((out / "report.json").read_text())
    assert typed.diagnostics is not None and typed.diagnostics.to_dict() == report["diagnostics"]
    diag = report["diagnostics"]
    assert diag["task_vectors"]["norm"]["sst2"]["layer1"] > 0 and set(diag["fisher"]) == {"sst2"}
    rows = report["results"]["sst2"]["rows"]["merged"]["prediction"]
    assert diag["predictions"]["sst2"]["merged"]["positive"] == pytest.approx(sum(rows) / len(rows))
    stsb = report["results"]["stsb"]["rows"]["individual"]["prediction"]
    assert diag["predictions"]["stsb"]["individual"]["mean"] == pytest.approx(sum(stsb) / len(stsb))
    md = (out / "report.md").read_text()
    assert "## Diagnostics" in md and "| layer1 |" in md and "- sst2 predictions: merged negative" in md
