"""GLUE scores from scored rows, vectorised over bootstrap resamples, and the marks a score can carry.

Every function takes labels and predictions as arrays whose last axis is the rows, so one call scores the
full sample (shape (n,)) or B resamples at once (shape (B, n)). Scores are x100, as the reports print them.
"""

from __future__ import annotations

import numpy as np

from fmn_pl.tasks import GlueTask

COLLAPSE_SHARE = 0.95  # a classifier answering one class on at least this share of the rows has collapsed
COLLAPSE_SPREAD = 0.10  # a regressor whose predictions keep less than this share of the labels' spread has


def score(task: GlueTask, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """The task's GLUE score (the mean of its metrics, as `fmn_pl.metrics.with_score`), x100, per leading index."""
    values = [METRICS[m](labels, predictions) for m in task.metrics]
    return 100 * np.mean(values, axis=0)


def _counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    y, p = y.astype(bool), p.astype(bool)
    return (y & p).sum(-1), (~y & ~p).sum(-1), (~y & p).sum(-1), (y & ~p).sum(-1)


def accuracy(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return (y == p).mean(-1)


def f1(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """F1 of class 1 (MRPC's "equivalent"); 0 when there is no positive label nor prediction."""
    tp, _, fp, fn = _counts(y, p)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def matthews(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Matthews correlation of a binary task; 0 when a margin is empty (a constant answer)."""
    tp, tn, fp, fn = (c.astype(float) for c in _counts(y, p))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(denominator > 0, (tp * tn - fp * fn) / np.where(denominator > 0, denominator, 1), 0.0)


def pearson(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pearson correlation; 0 for constant predictions (as `fmn_pl.metrics.with_score`)."""
    yc, pc = y - y.mean(-1, keepdims=True), p - p.mean(-1, keepdims=True)
    denominator = np.sqrt((yc * yc).sum(-1) * (pc * pc).sum(-1))
    return np.where(denominator > 0, (yc * pc).sum(-1) / np.where(denominator > 0, denominator, 1), 0.0)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (from 1) along the last axis, ties given their mean rank (as Spearman's correlation needs)."""
    order = np.argsort(x, axis=-1, kind="stable")
    ordered = np.take_along_axis(x, order, -1)
    n = x.shape[-1]
    position = np.broadcast_to(np.arange(n, dtype=float), x.shape)
    new = np.concatenate([np.ones(x.shape[:-1] + (1,), bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    first = np.maximum.accumulate(np.where(new, position, 0), axis=-1)
    ends = np.concatenate([new[..., 1:], np.ones(x.shape[:-1] + (1,), bool)], -1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, n), -1), axis=-1), -1)
    out = np.empty_like(position)
    np.put_along_axis(out, order, (first + last) / 2 + 1, -1)
    return out


def spearman(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return pearson(ranks(y), ranks(p))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def constant_predictions(task: GlueTask, labels: np.ndarray) -> np.ndarray:
    """The best constant answer on these rows: the majority class, or the label mean (regression)."""
    if task.is_regression:
        return np.full(labels.shape, float(labels.mean()))
    return np.full(labels.shape, np.bincount(labels.astype(int), minlength=task.num_labels).argmax())


def collapsed(task: GlueTask, labels: np.ndarray, predictions: np.ndarray) -> bool:
    """Whether a model answers (nearly) one thing: one class on >= 95% of the rows, or (regression) predictions
    whose spread is under 10% of the labels'."""
    if task.is_regression:
        return bool(predictions.std() < COLLAPSE_SPREAD * labels.std())
    shares = np.bincount(predictions.astype(int), minlength=task.num_labels) / len(predictions)
    return bool(shares.max() >= COLLAPSE_SHARE)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap samples."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)
