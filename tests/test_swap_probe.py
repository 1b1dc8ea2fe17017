"""research/swap_probe.py on two tiny checkpoints: `none` scores the merge itself, `all` the task's own model,
and a layer swap changes exactly that layer's tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from fmn_pl.evaluate import EvalData, Evaluator
from fmn_pl.merge import merge_body
from fmn_pl.merging.average import Average
from tests.conftest import load_benchmark


def test_swap_probe(make_checkpoint: Callable, tiny_glue: Path, capsys: pytest.CaptureFixture) -> None:
    sp = load_benchmark("swap_probe", "research")
    cks = [str(make_checkpoint(t, seed=s, noise=0.3)) for s, t in enumerate(["rte", "mrpc"])]
    result = sp.main(
        ["--checkpoints", *cks, "--data_dir", str(tiny_glue), "--split", "validation", "--max_samples", "16"]
    )
    assert json.loads(capsys.readouterr().out) == result
    assert list(result["rte"]) == ["none", "embeddings", "layer0", "layer1", "pooler", "norms", "all"]
    ev = Evaluator(cks, EvalData(str(tiny_glue), "validation", 16), accelerator="cpu", progress=False)
    body = merge_body(cks, Average(), evaluator=ev)
    for i, task in enumerate(["rte", "mrpc"]):
        assert result[task]["all"] == pytest.approx(100 * ev.evaluate(i)["score"])
        assert result[task]["none"] == pytest.approx(100 * ev.evaluate(i, body=body)["score"])


def test_groups_split_the_layers(tiny_base: Callable[[str], Path]) -> None:
    from transformers import AutoConfig

    sp = load_benchmark("swap_probe", "research")
    named = sp.groups(AutoConfig.from_pretrained(tiny_base("bert")))
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert [n for n, picks in named.items() if picks(key)] == ["layer1", "all"]
    assert [n for n, picks in named.items() if picks("bert.embeddings.LayerNorm.weight")] == [
        "embeddings",
        "norms",
        "all",
    ]


def test_collapse_probe(make_checkpoint: Callable, tiny_glue: Path, capsys: pytest.CaptureFixture) -> None:
    cp = load_benchmark("collapse_probe", "research")
    cks = [str(make_checkpoint(t, seed=s, noise=0.3)) for s, t in enumerate(["sst2", "stsb"])]
    argv = ["--checkpoints", *cks, "--data_dir", str(tiny_glue), "--max_samples", "16", "--fit_split", "train"]
    result = cp.main([*argv, "--method", "average", "--options", "{}"])
    assert json.loads(capsys.readouterr().out) == result
    ev = Evaluator(cks, EvalData(str(tiny_glue), "validation", 16), accelerator="cpu", progress=False)
    body = merge_body(cks, Average(), evaluator=ev)
    fixes = result["sst2"]["fixes"]
    assert fixes["own"]["accuracy"] == pytest.approx(100 * ev.evaluate(0)["accuracy"])
    assert fixes["merged"]["accuracy"] == pytest.approx(100 * ev.evaluate(0, body=body)["accuracy"])
    assert result["stsb"]["fixes"]["merged"]["score"] == pytest.approx(100 * ev.evaluate(1, body=body)["score"])
    assert set(result["sst2"]["break_holdout"]) == {"embeddings", "layer0", "layer1", "pooler", "norms"}
