"""The Evaluator swaps bodies into one loaded model per task: its scores must equal Lightning's validation of
the fine-tuning module with that body loaded from scratch, and the checkpoint's own tensors must come back."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from fmn_pl.evaluate import EvalData, Evaluator


def lightning_scores(checkpoint: Path, task: str, dm, body: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """The reference: a fresh GLUETransformer, the body loaded into it, scored by trainer.validate."""
    import lightning as L

    from fmn_pl.module import GLUETransformer

    module = GLUETransformer(str(checkpoint), task)
    if body is not None:
        module.model.load_state_dict(body, strict=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    return {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_swapped_body_scores_as_a_fresh_load(make_checkpoint: Callable, tiny_glue: Path, task: str) -> None:
    ck, other = make_checkpoint(task, seed=0, noise=0.05), make_checkpoint(task, seed=1, noise=0.3, name="other")
    from fmn_pl.module import load_model
    from fmn_pl.tasks import get_task

    body = {k: v for k, v in load_model(str(other), get_task(task)).state_dict().items() if "classifier" not in k}
    ev = Evaluator([ck], EvalData(str(tiny_glue), max_samples=24, batch_size=8), accelerator="cpu", progress=False)
    own = ev.evaluate(0)
    swapped = ev.evaluate(0, body=body)
    assert swapped == pytest.approx(lightning_scores(ck, task, ev.datamodule(0), body), abs=1e-6)
    assert own == pytest.approx(lightning_scores(ck, task, ev.datamodule(0), None), abs=1e-6)
    if task == "stsb":  # a correlation moves with any body (an accuracy on random labels may tie)
        assert swapped["score"] != pytest.approx(own["score"], abs=1e-6)
    assert ev.evaluate(0) == own  # and the checkpoint's own tensors came back
    with pytest.raises(ValueError, match="lacks"):
        ev.evaluate(0, body={"no.such.tensor": torch.zeros(1)})
    assert ev.evaluate(0) == own


def test_bf16_selection_scores_close_to_float32(make_checkpoint: Callable, tiny_glue: Path) -> None:
    ck = make_checkpoint("stsb", seed=0, noise=0.05)
    exact = Evaluator([ck], EvalData(str(tiny_glue), max_samples=24), accelerator="cpu", progress=False)
    fast = Evaluator(
        [ck], EvalData(str(tiny_glue), max_samples=24), accelerator="cpu", progress=False, precision="bf16"
    )
    assert fast.bf16() and not exact.bf16()
    a, b = exact.evaluate(0), fast.evaluate(0)
    # autocast ran, and rounding is all (a tiny random model's near-constant predictions: compare the error)
    assert a != b and b["mse"] == pytest.approx(a["mse"], rel=1e-3)
