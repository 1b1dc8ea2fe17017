"""Gram pass: under DDP with 2 CPU processes (gloo) the artifact equals the single-process one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch

from fmn_pl.artifacts import load_artifact
from fmn_pl.data import GLUEDataModule
from fmn_pl.grams import GramCallback, gram_keys
from fmn_pl.module import GLUETransformer


def _pass(ckpt: Path, data: Path, devices: int, include_padding: bool = False) -> dict[str, torch.Tensor]:
    dm = GLUEDataModule(
        task="rte",
        data_dir=str(data),
        tokenizer=str(ckpt),
        eval_splits=["train"],
        max_eval_samples=37,
        eval_batch_size=8,
        unpadded_shards=True,
    )
    cb = GramCallback(ckpt, include_padding=include_padding, metadata={"task": "rte"})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.validate(GLUETransformer(str(ckpt), "rte"), datamodule=dm, verbose=False)
    art = load_artifact(ckpt, "grams")
    assert art.metadata["num_examples"] == 37 and art.metadata["include_padding"] is include_padding
    return {**art.load_all(), "_rows": torch.tensor(list(art.metadata["rows"].values()), dtype=torch.float64)}


def test_ddp_two_processes_equal_one(make_checkpoint: Callable[..., Path], tiny_glue: Path) -> None:
    ckpt = make_checkpoint("rte")
    one = _pass(ckpt, tiny_glue, devices=1)
    two = _pass(ckpt, tiny_glue, devices=2)
    assert set(one) == set(two)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    padded = _pass(ckpt, tiny_glue, devices=1, include_padding=True)
    assert (padded["_rows"] >= one["_rows"]).all() and (padded["_rows"] > one["_rows"]).any()


def test_artifact_keys_follow_the_gram_naming(make_checkpoint: Callable[..., Path], tiny_glue: Path) -> None:
    from fmn_pl.module import load_model
    from fmn_pl.tasks import get_task

    ckpt = make_checkpoint("rte", family="distilbert")
    grams = _pass(ckpt, tiny_glue, devices=1)
    expected = set(gram_keys(load_model(str(ckpt), get_task("rte"))).values())
    assert set(grams) - {"_rows"} == expected
    g = grams["distilbert.transformer.layer.0.attention.q_lin"]
    assert g.dtype == torch.float32 and torch.allclose(g, g.T) and torch.linalg.eigvalsh(g.double()).min() > -1e-5


def test_fingerprint_ties_the_artifact_to_its_checkpoint(make_checkpoint: Callable[..., Path], tiny_glue: Path) -> None:
    ckpt = make_checkpoint("rte")
    _pass(ckpt, tiny_glue, devices=1)
    other = make_checkpoint("rte", seed=1)
    (other / "grams.safetensors").write_bytes((ckpt / "grams.safetensors").read_bytes())
    with pytest.raises(ValueError, match="recompute"):
        load_artifact(other, "grams")
