"""GLUE metrics against independent hand computations (plain Python / numpy), fed in several batches."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fmn_pl.metrics import glue_metrics, predictions, with_score
from fmn_pl.tasks import TASKS, get_task


# -- slow references -----------------------------------------------------------------------------------
def ref_accuracy(p: list[int], y: list[int]) -> float:
    return sum(a == b for a, b in zip(p, y)) / len(y)


def confusion(p: list[int], y: list[int]) -> tuple[int, int, int, int]:
    tp = sum(a == 1 and b == 1 for a, b in zip(p, y))
    tn = sum(a == 0 and b == 0 for a, b in zip(p, y))
    fp = sum(a == 1 and b == 0 for a, b in zip(p, y))
    fn = sum(a == 0 and b == 1 for a, b in zip(p, y))
    return tp, tn, fp, fn


def ref_f1(p: list[int], y: list[int]) -> float:
    tp, _, fp, fn = confusion(p, y)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def ref_mcc(p: list[int], y: list[int]) -> float:
    tp, tn, fp, fn = confusion(p, y)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def ref_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def average_ranks(v: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def ref_spearman(x: list[float], y: list[float]) -> float:
    return ref_pearson(average_ranks(x), average_ranks(y))


def run_metrics(task: str, preds: torch.Tensor, target: torch.Tensor, batches: int = 4) -> dict[str, float]:
    """Feed the metric collection in `batches` uneven chunks, as a validation loop does."""
    metrics = glue_metrics(get_task(task))
    cuts = sorted(random.Random(1).sample(range(1, len(target)), batches - 1))
    for a, b in zip([0, *cuts], [*cuts, len(target)]):
        metrics.update(preds[a:b], target[a:b])
    return with_score(metrics.compute())


def random_labels(n: int, k: int, seed: int, agree: float = 0.7) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    y = [rng.randrange(k) for _ in range(n)]
    p = [t if rng.random() < agree else rng.randrange(k) for t in y]
    return p, y


# -- tests ---------------------------------------------------------------------------------------------
def test_every_task_has_its_glue_metrics():
    expected = {
        "cola": {"matthews"},
        "sst2": {"accuracy"},
        "mrpc": {"f1", "accuracy"},
        "stsb": {"pearson", "spearman"},
        "qqp": {"f1", "accuracy"},
        "mnli": {"accuracy"},
        "qnli": {"accuracy"},
        "rte": {"accuracy"},
    }
    assert {name: set(t.metrics) for name, t in TASKS.items()} == expected
    assert set(glue_metrics(get_task("mrpc")).keys()) == {"f1", "accuracy"}
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cola_matthews(seed):
    p, y = random_labels(157, 2, seed)
    out = run_metrics("cola", torch.tensor(p), torch.tensor(y))
    assert out["matthews"] == pytest.approx(ref_mcc(p, y), abs=1e-6)
    assert out["score"] == pytest.approx(out["matthews"])


def test_matthews_degenerate_is_zero():
    """All predictions one class: the MCC denominator is zero and GLUE (sklearn) reports 0."""
    y = [0, 1, 1, 0, 1, 0, 0, 1]
    out = run_metrics("cola", torch.ones(8, dtype=torch.long), torch.tensor(y), batches=2)
    assert out["matthews"] == ref_mcc([1] * 8, y) == 0.0


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy(task):
    p, y = random_labels(203, 2, seed=len(task))
    out = run_metrics(task, torch.tensor(p), torch.tensor(y))
    assert out["f1"] == pytest.approx(ref_f1(p, y), abs=1e-6)
    assert out["accuracy"] == pytest.approx(ref_accuracy(p, y), abs=1e-6)
    assert out["score"] == pytest.approx((ref_f1(p, y) + ref_accuracy(p, y)) / 2, abs=1e-6)
    # F1 is of the positive class (1 = equivalent / duplicate): swapping classes changes it
    flipped = run_metrics(task, 1 - torch.tensor(p), 1 - torch.tensor(y))
    assert flipped["f1"] == pytest.approx(ref_f1([1 - a for a in p], [1 - b for b in y]), abs=1e-6)
    assert flipped["f1"] != pytest.approx(out["f1"], abs=1e-3)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "mnli"])
def test_accuracy(task):
    k = get_task(task).num_labels
    p, y = random_labels(181, k, seed=k + len(task))
    out = run_metrics(task, torch.tensor(p), torch.tensor(y))
    assert out == {"accuracy": pytest.approx(ref_accuracy(p, y), abs=1e-6), "score": pytest.approx(ref_accuracy(p, y))}


def test_stsb_pearson_spearman_with_ties():
    rng = random.Random(3)
    y = [round(rng.uniform(0, 5) * 5) / 5 for _ in range(240)]  # gold scores on a 0.2 grid: many ties
    p = [round(t + rng.gauss(0, 1.2), 1) for t in y]  # rounded predictions: ties too
    assert len(set(y)) < 40 and len(set(p)) < 120
    out = run_metrics("stsb", torch.tensor(p), torch.tensor(y).float(), batches=5)
    assert out["pearson"] == pytest.approx(ref_pearson(p, y), abs=1e-5)
    assert out["spearman"] == pytest.approx(ref_spearman(p, y), abs=1e-5)
    assert out["score"] == pytest.approx((ref_pearson(p, y) + ref_spearman(p, y)) / 2, abs=1e-5)
    scipy_stats = pytest.importorskip("scipy.stats")  # a second opinion on the tie handling of the reference
    assert ref_spearman(p, y) == pytest.approx(scipy_stats.spearmanr(p, y).statistic, abs=1e-12)


def test_average_ranks_reference():
    assert average_ranks([10, 20, 20, 5, 20]) == [2, 4, 4, 1, 4]


def test_predictions_and_score():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert predictions(get_task("mnli"), logits).tolist() == [1, 0]
    scores = predictions(get_task("stsb"), torch.tensor([[1.5], [4.0]], dtype=torch.float16))
    assert scores.dtype == torch.float32 and scores.tolist() == [1.5, 4.0]
    assert with_score({"f1": torch.tensor(0.5), "accuracy": 0.75}) == {"f1": 0.5, "accuracy": 0.75, "score": 0.625}


def test_metrics_reset_between_epochs():
    """A collection reused across evaluation epochs (as the module does) must not mix epochs."""
    metrics = glue_metrics(get_task("rte"))
    metrics.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 1, 1, 1]))
    metrics.compute()
    metrics.reset()
    metrics.update(torch.tensor([1, 0]), torch.tensor([1, 0]))
    assert float(metrics.compute()["accuracy"]) == 1.0
