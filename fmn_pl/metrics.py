"""GLUE metrics as torchmetrics collections, shared by fine-tuning and merge evaluation, and the
constant-prediction baseline every score is reported beside."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
)
from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

from fmn_pl.tasks import SCALE_METRICS, GlueTask

# Scale figures of a regression task: reported beside the correlations, never part of `score` (Pearson and
# Spearman ignore scale, so an off-scale regressor shows only here).


class Moment(Metric):
    """Mean or (population) standard deviation of the predictions or of the targets, over all updates."""

    full_state_update = False

    def __init__(self, of: str, stat: str) -> None:
        super().__init__()
        self.of, self.stat = of, stat
        for name in ("total", "total_sq", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        x = (preds if self.of == "preds" else target).detach().double().flatten()
        self.total += x.sum()
        self.total_sq += (x * x).sum()
        self.count += x.numel()

    def compute(self) -> torch.Tensor:
        mean = self.total / self.count.clamp(min=1)
        if self.stat == "mean":
            return mean.float()
        return (self.total_sq / self.count.clamp(min=1) - mean * mean).clamp(min=0).sqrt().float()


class Matthews(BinaryMatthewsCorrCoef):
    """Matthews correlation that is 0 when the predictions (or labels) are all one class, as GLUE's (sklearn's)
    is: torchmetrics 1.9 returns an epsilon-based value there (0.026 for a constant CoLA validation answer,
    0.41 on 8 examples), which would credit a constant predictor."""

    def compute(self) -> torch.Tensor:
        confmat = self.confmat.reshape(2, 2)
        if (confmat.sum(0) == 0).any() or (confmat.sum(1) == 0).any():
            return torch.tensor(0.0, device=confmat.device)
        return super().compute()


def glue_metrics(task: GlueTask) -> MetricCollection:
    """The task's own GLUE metrics (plus, for regression, SCALE_METRICS); `update(preds, target)` takes class
    ids or regression scores."""
    makers = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=max(task.num_labels, 2), average="micro"),
        "f1": BinaryF1Score,
        "matthews": Matthews,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    metrics = {name: makers[name]() for name in task.metrics}
    if task.is_regression:
        metrics |= {
            "mse": MeanSquaredError(),
            "pred_mean": Moment("preds", "mean"),
            "pred_std": Moment("preds", "std"),
            "label_mean": Moment("target", "mean"),
            "label_std": Moment("target", "std"),
        }
    return MetricCollection(metrics)


def predictions(task: GlueTask, logits: torch.Tensor) -> torch.Tensor:
    """Class ids for classification, the (squeezed) score for regression."""
    return logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)


def with_score(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Plain floats plus `score`, the mean of the task's GLUE metrics (GLUE's per-task number; the scale
    figures of a regression task are left out of it). A correlation of constant predictions is 0, not NaN."""
    out = {k: float(v) for k, v in values.items()}
    for k in ("pearson", "spearman"):
        if k in out and math.isnan(out[k]):
            out[k] = 0.0
    quality = [v for k, v in out.items() if k not in SCALE_METRICS]
    out["score"] = sum(quality) / len(quality)
    return out


def majority_baseline(task: GlueTask, labels: torch.Tensor) -> dict[str, float]:
    """The task's metrics for the best constant prediction on these labels: the most frequent class
    (classification; accuracy = its share, Matthews 0) or the label mean (regression: correlations 0,
    mse = the label variance). A model within noise of it has learned nothing the scores can show."""
    if task.is_regression:
        y = labels.double()
        mean, std = float(y.mean()), float(y.std(unbiased=False))
        return {
            "pearson": 0.0,
            "spearman": 0.0,
            "mse": std * std,
            "pred_mean": mean,
            "pred_std": 0.0,
            "label_mean": mean,
            "label_std": std,
            "score": 0.0,
        }
    majority = int(torch.bincount(labels.long(), minlength=task.num_labels).argmax())
    metrics = glue_metrics(task)
    metrics.update(torch.full_like(labels.long(), majority), labels.long())
    return {**with_score(metrics.compute()), "majority_class": majority}
