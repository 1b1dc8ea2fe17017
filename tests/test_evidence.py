"""The evidence path: a pipeline with `seeds` writes one bundle per seed whose rows rescore to exactly what each
merge reported; the numpy metrics against torchmetrics and scipy; the paired bootstrap against a slow loop;
collapse marks; no validation row reaches any choice (epoch, option); committed documents regenerate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from fmn_pl import bundle, pipeline, stats
from fmn_pl.evidence import CONSTANT, Evidence
from fmn_pl.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pipeline" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:.*Checkpoint directory.*")


def seeded_config(tmp_path: Path, seeds: list[int]) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["seeds"] = seeds
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_seeds_write_bundles_that_rescore_to_the_reports(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path
) -> None:
    out = tmp_path / "run"
    argv = ["--config", str(seeded_config(tmp_path, [3, 4])), f"--model={tiny_base('bert')}"]
    status = pipeline.main([*argv, f"--data_dir={tiny_glue}", f"--output={out}"])
    assert {k.split("/")[0] for k in status} == {"seed-3", "seed-4"}
    assert all(v == "ran" for v in status.values())
    bundles = bundle.read_all(out)
    assert [b.seed for b in bundles] == [3, 4]
    for b in bundles:  # each seed fine-tuned with its own seed
        assert yaml.safe_load((out / f"seed-{b.seed}" / "pipeline.yaml").read_text())["fit"]["seed"] == b.seed
    ev = Evidence(bundles, resamples=50)
    for b in bundles:
        for report_file in (out / f"seed-{b.seed}" / "merges").glob("*/*/report.json"):
            report = json.loads(report_file.read_text())
            combo, label = report_file.parent.parent.name, report_file.parent.name
            for task, r in report["results"].items():
                for model, name in (("merged", label), ("individual", "individual"), ("average", "average")):
                    assert ev.score(b.seed, combo, name, task) == pytest.approx(100 * r[model]["score"], abs=1e-4)
                assert ev.score(b.seed, combo, CONSTANT, task) == pytest.approx(100 * r["baseline"]["score"], abs=1e-4)
    text = (out / "results.md").read_text()
    assert "seeds 3, 4" in text and "## Published claims" in text and "2 seeds" in text
    # the document is a function of the bundles alone: a copy elsewhere renders the same bytes
    for b in bundles:
        bundle.write(b, tmp_path / "copy" / f"seed-{b.seed}")
    from fmn_pl.evidence_report import results_page

    again = results_page(Evidence(bundle.read_all(tmp_path / "copy")))
    assert again == text


def test_no_validation_row_reaches_a_choice(
    tmp_path: Path, tiny_base: Callable[[str], Path], tiny_glue: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every split any data module reads is recorded with the stage that read it: the fine-tuning (which picks
    the epoch) and the merges' option search read train and holdout only; validation is read only by the final
    scoring of a merge."""
    from fmn_pl import data, merge_eval

    reads: list[tuple[str, bool]] = []
    scoring = [False]
    load, evaluate_merge = data.GLUEDataModule.load, merge_eval.evaluate_merge

    def recording_load(self, split, cap):
        reads.append((split, scoring[0]))
        return load(self, split, cap)

    def recording_evaluate(*args, **kwargs):
        scoring[0] = True
        try:
            return evaluate_merge(*args, **kwargs)
        finally:
            scoring[0] = False

    monkeypatch.setattr(data.GLUEDataModule, "load", recording_load)
    monkeypatch.setattr(merge_eval, "evaluate_merge", recording_evaluate)
    import fmn_pl.merge as merge_module

    monkeypatch.setattr(merge_module, "evaluate_merge", recording_evaluate, raising=False)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["methods"] = [{"name": "task_arithmetic", "options": {"scaling": None}}]  # a search on data
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    pipeline.main(["--config", str(path), f"--model={tiny_base('bert')}", f"--data_dir={tiny_glue}", f"--output={out}"])
    report = json.loads((out / "merges" / "rte+mrpc" / "task_arithmetic" / "report.json").read_text())
    assert report["selection"]["split"] == "holdout" and report["selection"]["evaluations"] >= 10
    assert ("holdout", False) in reads and ("train", False) in reads
    assert all(scored for split, scored in reads if split.startswith("validation")), reads
    assert any(split == "validation" for split, _ in reads)  # and the final scores did read it


@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb", "sst2"])
def test_numpy_scores_match_torchmetrics(task: str) -> None:
    from fmn_pl.metrics import glue_metrics, with_score

    rng = np.random.default_rng(0)
    spec = get_task(task)
    if spec.is_regression:
        y = np.round(rng.uniform(0, 5, 300), 1)  # ties, as STS-B's labels have
        p = np.round(y + rng.normal(0, 1, 300), 1)
        tm_p, tm_y = torch.tensor(p, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    else:
        y = rng.integers(0, 2, 300)
        p = np.where(rng.random(300) < 0.7, y, 1 - y)
        tm_p, tm_y = torch.tensor(p), torch.tensor(y)
    metrics = glue_metrics(spec)
    metrics.update(tm_p, tm_y)
    assert stats.score(spec, y.astype(float), p.astype(float)) == pytest.approx(
        100 * with_score(metrics.compute())["score"], abs=1e-3
    )


def test_ranks_match_scipy() -> None:
    from scipy.stats import rankdata

    x = np.random.default_rng(1).integers(0, 6, (5, 40)).astype(float)
    assert np.allclose(stats.ranks(x), rankdata(x, axis=-1))


def synthetic(seeds: list[int], n: int = 80) -> list[bundle.Bundle]:
    """Bundles of one pair (sst2+cola) with two methods: `good` near the labels, `bad` answering class 1."""
    out = []
    for s in seeds:
        rng = np.random.default_rng(s)
        rows: dict[str, list] = {c: [] for c in bundle.COLUMNS}
        for task in ("sst2", "cola"):
            y = rng.integers(0, 2, n)
            models = {
                ("", "individual"): np.where(rng.random(n) < 0.9, y, 1 - y),
                ("sst2+cola", "average"): np.where(rng.random(n) < 0.7, y, 1 - y),
                ("sst2+cola", "good"): np.where(rng.random(n) < 0.85, y, 1 - y),
                ("sst2+cola", "bad"): np.ones(n, int),
            }
            for (combo, model), p in models.items():
                for i in rng.permutation(n):  # any row order: rows are matched by id
                    for c, v in zip(
                        bundle.COLUMNS, (s, combo, model, task, "validation", int(i), int(y[i]), int(p[i]))
                    ):
                        rows[c].append(v)
        merges = {"sst2+cola/good": {"candidates": 0}, "sst2+cola/bad": {"candidates": 0}}
        meta = {"seed": s, "config": {"tasks": ["sst2", "cola"], "fit": {"holdout_samples": 10}, "merge": {}}}
        out.append(bundle.Bundle(rows, {**meta, "model": "m", "merges": merges, "checkpoints": {}}))
    return out


def test_paired_bootstrap_against_a_slow_loop() -> None:
    bundles = synthetic([1, 2, 3])
    ev = Evidence(bundles, resamples=200, seed=5)
    cells = [("sst2+cola", "sst2"), ("sst2+cola", "cola")]
    d = ev.difference("good", "average", cells)
    assert d is not None
    # the slow loop: per seed and cell, rows sorted by id, the same resample for both models
    point, boot = [], np.zeros(200)
    for b in bundles:
        for _, task in cells:
            r = b.rows
            pick = {
                m: {
                    r["row"][i]: (r["label"][i], r["prediction"][i])
                    for i in range(len(r["row"]))
                    if r["task"][i] == task and r["model"][i] == m
                }
                for m in ("good", "average")
            }
            ids = sorted(pick["good"])
            y = np.array([pick["good"][i][0] for i in ids], float)
            pg, pa = (np.array([pick[m][i][1] for i in ids], float) for m in ("good", "average"))
            spec = get_task(task)
            point.append(stats.score(spec, y, pg) - stats.score(spec, y, pa))
            idx = ev.draws[(b.seed, task)]
            boot += (stats.score(spec, y[idx], pg[idx]) - stats.score(spec, y[idx], pa[idx])) / (2 * len(bundles))
    assert d.mean == pytest.approx(np.mean(point))
    assert (d.low, d.high) == pytest.approx(stats.interval(boot))
    assert ev.collapses("bad", cells) == 6 and ev.collapses("good", cells) == 0
    assert ev.difference("bad", CONSTANT, [("sst2+cola", "sst2")]).verdict == "tie"  # type: ignore[union-attr]
