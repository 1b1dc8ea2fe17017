"""Integration: the real all-MiniLM-L6-v2 fine-tuned on a few hundred real SST-2 examples through
`fmn-pl fit`, exported, reloaded with identical logits, and validated again from the export.
Skipped (with the reason) only when ../shared is absent."""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fmn_pl.checkpoint import read_metadata, weights_fingerprint
from fmn_pl.fit import lightning_cli
from fmn_pl.module import model_inputs
from tests.conftest import GLUE, MINILM, requires_shared

pytestmark = [
    pytest.mark.real,
    requires_shared,
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
]


def test_minilm_sst2_fit_export_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "export"
    cli = lightning_cli(
        [
            "fit",
            f"--model.model_name_or_path={MINILM}",
            "--model.learning_rate=5e-4",  # high for fine-tuning: the new head must learn in 10 steps
            "--data.task=sst2",
            f"--data.data_dir={GLUE}",
            "--data.max_train_samples=320",
            "--data.max_eval_samples=192",
            "--data.batch_size=32",
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--export.dirpath={export}",
            "--seed_everything=0",
        ]
    )
    (log,) = (tmp_path / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(open(log)))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 10
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # learning, even within one short epoch

    meta = read_metadata(export)
    assert meta["task"] == "sst2" and meta["num_train_examples"] == 320 and meta["base_model"] == str(MINILM)
    assert meta["label_names"] == ["negative", "positive"] and meta["fingerprint"] == weights_fingerprint(export)
    accuracy = meta["metrics"]["val/accuracy"]
    assert accuracy > 0.65, meta["metrics"]  # well above chance (0.5) after 10 steps on a sentence encoder

    # the export is a plain Hugging Face folder: same tokenizer, identical logits
    model = AutoModelForSequenceClassification.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    original = AutoTokenizer.from_pretrained(MINILM)
    text = "a gripping, quietly devastating film"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(batch)).logits, cli.model.model.eval()(**model_inputs(batch)).logits)

    # validating the export on the same sample reproduces the recorded accuracy
    val = lightning_cli(
        [
            "validate",
            f"--model.model_name_or_path={export}",
            "--data.task=sst2",
            f"--data.data_dir={GLUE}",
            "--data.max_eval_samples=192",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'val'}",
        ]
    )
    assert float(val.trainer.callback_metrics["val/accuracy"]) == pytest.approx(accuracy)

    # the Fisher stage on the real export: the artifact's shape and metadata, and the per-example mask Fisher
    # of a few real examples against the hook-free slow loop of tests/test_fisher.py
    from fmn_pl.artifacts import load_artifact
    from fmn_pl.fisher import MaskFisher
    from fmn_pl.fisher_cli import main as fisher
    from tests.test_fisher import _rel_close, _slow_mask_fisher

    fisher(
        [
            "--checkpoint",
            str(export),
            "--num_examples",
            "48",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    art = load_artifact(export, "mask_fisher", shapes={"head": (6, 12), "neuron": (6, 1536)})
    assert (art.metadata["task"], art.metadata["split"], art.metadata["num_examples"]) == ("sst2", "train", 48)
    assert (art.get("head") > 0).float().mean() > 0.9
    few = {k: v[:4] for k, v in batch.items()}
    acc = MaskFisher(model.eval())
    with acc.active():
        acc.step(few)
    fast, slow = acc.result(), _slow_mask_fisher(model, [few])
    for key in ("head", "neuron"):
        _rel_close(fast[key], slow[key], rtol=1e-4)
