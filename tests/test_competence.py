"""Competence and scale: every score stands beside its constant-prediction baseline, a model within noise of it
is flagged, and an off-scale regressor shows its mean squared error (Pearson and Spearman ignore scale)."""

from __future__ import annotations

import random

import pytest
import torch

from fmn_pl.metrics import SCALE_METRICS, glue_metrics, majority_baseline, with_score
from fmn_pl.report import markdown, noise_margin, summary, task_result
from fmn_pl.tasks import get_task


def scored(task: str, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = glue_metrics(get_task(task))
    metrics.update(preds, labels)
    return with_score(metrics.compute())


def test_majority_baseline_by_hand():
    labels = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1])  # 6 of 8 positive
    mrpc = majority_baseline(get_task("mrpc"), labels)
    assert mrpc["majority_class"] == 1
    assert mrpc["accuracy"] == pytest.approx(0.75)
    assert mrpc["f1"] == pytest.approx(2 * 6 / (2 * 6 + 2))  # tp 6, fp 2, fn 0
    assert mrpc["score"] == pytest.approx((0.75 + 12 / 14) / 2)
    cola = majority_baseline(get_task("cola"), labels)
    assert cola["matthews"] == 0.0 and cola["score"] == 0.0
    y = torch.tensor([0.0, 1.0, 2.0, 5.0])
    stsb = majority_baseline(get_task("stsb"), y)
    assert stsb["score"] == 0.0 and stsb["pred_std"] == 0.0
    assert stsb["mse"] == pytest.approx(float(((y - y.mean()) ** 2).mean()))


def test_regression_scale_metrics_match_numpy():
    rng = random.Random(0)
    y = torch.tensor([rng.uniform(0, 5) for _ in range(300)])
    preds = 0.1 * y + 0.2  # perfectly correlated, far off scale
    out = scored("stsb", preds, y)
    assert set(SCALE_METRICS) <= set(out)
    assert out["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert out["score"] == pytest.approx((out["pearson"] + out["spearman"]) / 2)  # scale figures stay out of it
    assert out["mse"] == pytest.approx(float(((preds - y) ** 2).mean()), rel=1e-5)
    assert out["pred_mean"] == pytest.approx(float(preds.mean()), rel=1e-5)
    assert out["pred_std"] == pytest.approx(float(preds.std(unbiased=False)), rel=1e-4)
    assert out["label_std"] == pytest.approx(float(y.std(unbiased=False)), rel=1e-4)


def test_constant_predictor_is_flagged_and_a_learner_is_not():
    rng = random.Random(1)
    labels = torch.tensor([int(rng.random() < 0.68) for _ in range(400)])
    base = majority_baseline(get_task("mrpc"), labels)
    constant = scored("mrpc", torch.ones_like(labels), labels)  # "always equivalent": the demo's old MRPC model
    learner = scored("mrpc", torch.where(torch.rand(400) < 0.9, labels, 1 - labels), labels)
    r = task_result(merged=constant, individual=learner, average=constant, baseline=base, examples=400)
    flagged = " ".join(r["flags"])
    assert "merged scores" in flagged and "average scores" in flagged and "individual" not in flagged
    assert r["above_baseline"] == pytest.approx(0.0, abs=1e-9)  # kept none of what the model learned
    assert noise_margin(400) == 0.05


def test_off_scale_regressor_shows_its_mse():
    rng = random.Random(2)
    y = torch.tensor([rng.uniform(0, 5) for _ in range(500)])
    good = scored("stsb", y + torch.randn(500) * 0.5, y)
    off = scored("stsb", 0.1 * y + torch.randn(500) * 0.05, y)  # correlated, yet worse than the label mean
    base = majority_baseline(get_task("stsb"), y)
    assert off["score"] > 0.9  # correlation alone calls it a success
    r = task_result(merged=off, individual=good, average=None, baseline=base, examples=500)
    assert any(f.startswith("merged is off scale") for f in r["flags"])
    assert not any(f.startswith("individual") for f in r["flags"])
    report = {"method": "x", "tasks": ["stsb"], "results": {"stsb": r}, "summary": summary({"stsb": r})}
    text = markdown(report)
    assert f"mean squared error constant {base['mse']:.3f}" in text and "**stsb: merged is off scale" in text
