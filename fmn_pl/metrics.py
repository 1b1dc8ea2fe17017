"""GLUE metrics as torchmetrics collections, shared by fine-tuning and merge evaluation."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryMatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from fmn_pl.tasks import GlueTask


def glue_metrics(task: GlueTask) -> MetricCollection:
    """The task's own GLUE metrics; `update(preds, target)` takes class ids or regression scores."""
    makers = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=max(task.num_labels, 2), average="micro"),
        "f1": BinaryF1Score,
        "matthews": BinaryMatthewsCorrCoef,
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return MetricCollection({name: makers[name]() for name in task.metrics})


def predictions(task: GlueTask, logits: torch.Tensor) -> torch.Tensor:
    """Class ids for classification, the (squeezed) score for regression."""
    return logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)


def with_score(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Plain floats plus `score`, the mean of the task's metrics (GLUE's per-task number)."""
    out = {k: float(v) for k, v in values.items()}
    out["score"] = sum(out.values()) / len(out)
    return out
