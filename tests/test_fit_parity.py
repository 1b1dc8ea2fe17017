"""benchmarks/fit_parity.py end to end on a tiny model and a learnable synthetic task: the plain loop and
`fmn-pl fit` both learn it, and agree to tolerance at equal seeds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import WORDS, load_benchmark


def learnable_sst2(root: Path, n_train: int = 192, n_val: int = 96) -> Path:
    """SST-2 layout where the label is whether "good" is in the sentence: a tiny model learns it in a few epochs."""
    rng = random.Random(0)
    words = [w for w in WORDS if w not in ("good", "bad")]
    (root / "sst2").mkdir(parents=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        labels = [i % 2 for i in range(n)]
        sentences = [" ".join(rng.sample(words, 5) + (["good"] if y else ["bad"])) for y in labels]
        pq.write_table(
            pa.table(
                {"sentence": sentences, "label": pa.array(labels, pa.int64()), "idx": pa.array(range(n), pa.int32())}
            ),
            root / "sst2" / f"{split}.parquet",
        )
    return root


def test_plain_and_fmn_pl_agree(tmp_path: Path, tiny_base: Callable[[str], Path], one_thread: None) -> None:
    parity = load_benchmark("fit_parity")
    args = parity.parser().parse_args(
        [
            "--model",
            str(tiny_base("bert")),
            "--data_dir",
            str(learnable_sst2(tmp_path / "glue")),
            "--task",
            "sst2",
            "--train_samples",
            "192",
            "--holdout",
            "0",
            "--epochs",
            "4",
            "--lr",
            "3e-3",
            "--batch_size",
            "16",
            "--seeds",
            "0",
            "--grouped",
        ]
    )
    result = parity.compare(args)
    plain, fit = (result["scores"][side]["0"] for side in ("plain", "fmn_pl"))
    assert len(plain) == len(fit) == 4
    assert plain[-1]["score"] > 0.9 and fit[-1]["score"] > 0.9  # both learned the rule (chance: 0.5)
    assert abs(result["mean_gap_per_epoch"]["fmn_pl"][-1]) < 0.08
    assert set(result["scores"]) == {"plain", "fmn_pl", "fmn_pl_grouped"}


def test_reference_metrics_by_hand() -> None:
    import numpy as np

    from fmn_pl.tasks import get_task

    parity = load_benchmark("fit_parity")
    preds, labels = np.array([1, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])
    mrpc = parity.reference_metrics(get_task("mrpc"), preds, labels)
    assert mrpc["accuracy"] == pytest.approx(4 / 6) and mrpc["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    cola = parity.reference_metrics(get_task("cola"), np.ones(6), labels)
    assert cola["matthews"] == 0.0
