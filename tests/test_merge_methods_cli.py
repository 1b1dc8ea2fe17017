"""`fmn-pl merge` end to end for RegMean, AdaMerging, TALL, Consensus and DARE on tiny checkpoints: saved
models equal an independent computation, the report holds every row and says how options were chosen."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch

from fmn_pl.checkpoint import read_metadata
from fmn_pl.merge_cli import main
from fmn_pl.merge_report import MergeReport
from fmn_pl.tensorfile import CheckpointReader
from tests.test_merge_cli import common, run_main


def memory_merge(checkpoints: list[Path], method: object) -> dict[str, torch.Tensor]:
    """The method's merge in memory, with the checkpoints' recorded base model."""
    from fmn_pl.merging.base import MergeContext

    ctx = MergeContext.over(checkpoints, read_metadata(checkpoints[0])["base_model"])
    return dict(method.merge(ctx))  # type: ignore[attr-defined]


def add_grams(ckpt: Path, data: Path, samples: int = 24) -> Path:
    """A Gram artifact from a real pass over the task's training inputs (what `fmn-pl fisher --kind grams` runs)."""
    from fmn_pl.data import GLUEDataModule
    from fmn_pl.grams import GramCallback
    from fmn_pl.module import GLUETransformer

    task = read_metadata(ckpt)["task"]
    dm = GLUEDataModule(
        task=task,
        data_dir=str(data),
        tokenizer=str(ckpt),
        eval_splits=["train"],
        max_eval_samples=samples,
        eval_batch_size=8,
    )
    cb = GramCallback(ckpt, metadata={"task": task})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.validate(GLUETransformer(str(ckpt), task), datamodule=dm, verbose=False)
    assert cb.path is not None
    return cb.path


def body_of(folder: Path) -> dict[str, torch.Tensor]:
    """The body tensors of a task folder (model-body.safetensors) or of a merged body file."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model-body.safetensors" if folder.is_dir() else folder))


def assert_rows(report: MergeReport | None, tasks: list[str], average: bool = True) -> None:
    """Every task has merged, individual (and average) scores and a normalized score."""
    assert report is not None and list(report.results) == tasks
    for r in report.results.values():
        assert r.merged is not None and r.individual is not None
        assert (r.average is not None) is average
        individual, merged = r.score("individual"), r.score("merged")
        assert individual is not None and merged is not None
        if individual > 0:
            assert r.normalized == pytest.approx(merged / individual)
    assert report.summary is not None and report.summary.merged_score is not None


# ---------------------------------------------------------------------------------------------- RegMean


def test_regmean_end_to_end(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    from fmn_pl.merging.regmean import RegMean

    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(["rte", "mrpc"])]
    for c in cks:
        add_grams(c, tiny_glue)
    out = tmp_path / "out"
    report = main(
        ["--method", "regmean", "--method.alpha", "0.9", "--checkpoints", *map(str, cks), *common(out, tiny_glue)]
    )
    expected = memory_merge(cks, RegMean(alpha=0.9))
    saved = body_of(out / "rte")
    for key in (
        "bert.encoder.layer.0.attention.self.key.weight",
        "bert.encoder.layer.1.output.dense.weight",
        "bert.embeddings.LayerNorm.weight",
    ):
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)
    assert os.stat(out / "mrpc" / "model-body.safetensors").st_ino == os.stat(out / "model.safetensors").st_ino
    assert_rows(report, ["rte", "mrpc"])
    assert report is not None
    assert report.options["alpha"] == 0.9 and report.notes["regmean_grams"]["include_padding"] is False
    assert report.checkpoints[0].artifacts["grams"]["kind"] == "grams"
    assert report.selection is None and report.chosen() == {}  # nothing chosen on data


def test_regmean_without_grams_names_the_command(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    code, err = run_main(
        ["--method", "regmean", "--checkpoints", *map(str, cks), *common(tmp_path / "o", tiny_glue)], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs a grams artifact" in err and "--kind grams" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- AdaMerging


def task_vector_body(
    cks: list[Path], coefficients: list[float | dict[str, float]], vectors: list[dict[str, torch.Tensor]] | None = None
) -> dict[str, torch.Tensor]:
    """theta0 + sum_t c_t tau_t (c_t a number or {key: number}), from the files, in float64."""
    base = CheckpointReader(read_metadata(cks[0])["base_model"], prefix="bert.")
    readers = [CheckpointReader(c) for c in cks]
    out = {}
    for key in [k for k in readers[0].keys() if k.startswith("bert.") and readers[0].get(k).is_floating_point()]:
        b = base.get(key).double()
        acc = b.clone()
        for t, (r, c) in enumerate(zip(readers, coefficients)):
            tau = vectors[t][key].double() if vectors is not None else r.get(key).double() - b
            acc += (c[key] if isinstance(c, dict) else c) * tau
        out[key] = acc.float()
    return out


def test_adamerging_excludes_regression_with_a_warning(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path
) -> None:
    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(["rte", "stsb", "mrpc"])]
    out = tmp_path / "out"
    report = main(
        [
            "--method",
            "adamerging",
            "--method.steps",
            "4",
            "--method.lr",
            "0.05",
            "--method.batch_size",
            "8",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "16",
            *common(out, tiny_glue),
        ]
    )
    assert report is not None and report.selection is not None
    notes = report.notes["adamerging"]
    assert notes["adapted"] == ["rte", "mrpc"] and notes["not_adapted"] == ["stsb"] and notes["steps"] == 4
    coef = notes["coefficients"]
    assert coef["stsb"] == pytest.approx(0.3) and all(0.0 <= c <= 1.0 for c in coef.values())
    assert coef["rte"] != pytest.approx(0.3) and set(notes["entropy_first_step"]) == {"rte", "mrpc"}
    # the saved body is theta0 + sum_t c_t tau_t with the reported coefficients
    expected = task_vector_body(cks, [coef[t] for t in ("rte", "stsb", "mrpc")])
    saved = body_of(out / "stsb")
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-6)
    # which split it adapted on, the warning repeated in the report, the Trainer's logs and checkpoint
    sel = report.selection
    assert sel.adapted and sel.split == "validation" and sel.transductive and sel.max_samples == 16
    md = (out / "report.md").read_text()
    assert "Coefficients adapted on the unlabeled inputs of the `validation` split (transductive" in md
    assert any("stsb is a regression task" in r for r in report.remarks) and "stsb is a regression task" in md
    assert list((out / "adamerging").rglob("metrics.csv")) and list((out / "adamerging" / "checkpoints").glob("*.ckpt"))
    assert_rows(report, ["rte", "stsb", "mrpc"])


def test_adamerging_refuses_regression_by_name(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "stsb"])]
    code, err = run_main(
        [
            "--method",
            "adamerging",
            "--method.regression",
            "refuse",
            "--checkpoints",
            *map(str, cks),
            *common(tmp_path / "o", tiny_glue),
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "stsb is a regression task" in err
    assert not (tmp_path / "o").exists()


def test_adamerging_plus_layer_wise(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    """Layer-wise: one coefficient per task per body tensor; ++: on the TIES-processed vectors."""
    from fmn_pl.merging.adamerging import ties_processed_vectors
    from fmn_pl.merging.base import CheckpointReader, MergeContext

    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(["rte", "mnli"])]
    out = tmp_path / "out"
    report = main(
        [
            "--method",
            "adamerging",
            "--method.granularity",
            "layer",
            "--method.plus",
            "true",
            "--method.top_k",
            "50",
            "--method.steps",
            "3",
            "--method.lr",
            "0.05",
            "--method.batch_size",
            "4",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "8",
            "--eval.compare_average",
            "false",
            *common(out, tiny_glue),
        ]
    )
    assert report is not None
    coef = report.notes["adamerging"]["coefficients"]
    readers = [CheckpointReader(c) for c in cks]
    keys = [k for k in readers[0].keys() if k.startswith("bert.") and readers[0].get(k).is_floating_point()]
    assert set(coef) == {"rte", "mnli"} and all(set(c) == set(keys) for c in coef.values())
    values = [v for c in coef.values() for v in c.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 2  # learned per tensor
    # the TIES-processed vectors, from an independent context, combined with the reported coefficients
    ctx = MergeContext.over(cks, read_metadata(cks[0])["base_model"])
    vectors = ties_processed_vectors(ctx, 50.0)
    expected = task_vector_body(cks, [coef["rte"], coef["mnli"]], vectors)
    saved = body_of(out / "rte")
    for key in keys:
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-6)
    assert_rows(report, ["rte", "mnli"], average=False)


# ---------------------------------------------------------------------------------------------- TALL, Consensus


def test_tall_end_to_end(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from fmn_pl.merging.tall import tall_mask, unpack_mask

    tasks = ["rte", "mrpc", "cola"]
    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(tasks)]
    out = tmp_path / "out"
    report = main(
        [
            "--method",
            "tall",
            "--method.lambdas",
            "[0.2, 0.6]",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "8",
            *common(out, tiny_glue),
        ]
    )
    assert report is not None and report.selection is not None and report.storage is not None
    lambdas = report.notes["tall_lambdas"]
    assert set(lambdas) == set(tasks) and all(v in (0.2, 0.6) for v in lambdas.values())
    assert report.selection.evaluations == 3 * 2  # each candidate scored on its own task only
    assert report.storage.task_body == ["own"]
    # every task folder holds theta0 + m_t * tau_MTL, m_t from its chosen lambda; the output body theta0 + tau_MTL
    base = CheckpointReader(read_metadata(cks[0])["base_model"], prefix="bert.")
    readers = [CheckpointReader(c) for c in cks]
    root = body_of(out / "model.safetensors")
    with safe_open(str(out / "tall" / "masks.safetensors"), "pt") as masks:
        for i, task in enumerate(tasks):
            saved = body_of(out / task)
            for key in ("bert.encoder.layer.0.attention.self.query.weight", "bert.pooler.dense.bias"):
                b = base.get(key)
                taus = [r.get(key) - b for r in readers]
                mtl = sum(taus)
                m = tall_mask(taus[i], mtl, lambdas[task])
                torch.testing.assert_close(saved[key], b + m * mtl)
                assert torch.equal(unpack_mask(masks.get_tensor(f"{task}/{key}"), tuple(b.shape)), m)
                torch.testing.assert_close(root[key], b + mtl)
    sizes = report.notes["tall_compression"]
    assert sizes["checkpoints_bytes"] == 3 * sizes["base_bytes"] and sizes["mask_bytes"] < sizes["base_bytes"]
    assert "TALL storage" in (out / "report.md").read_text()
    assert_rows(report, tasks)


def test_consensus_end_to_end(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    from fmn_pl.merging.consensus import Consensus

    tasks = ["rte", "mrpc", "cola"]
    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(tasks)]
    out = tmp_path / "out"
    report = main(
        [
            "--method",
            "consensus",
            "--method.over",
            "ties",
            "--method.k",
            "2",
            "--method.lambdas",
            "[0.4]",
            "--method.scalings",
            "[0.5, 1.0]",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "8",
            *common(out, tiny_glue),
        ]
    )
    assert report is not None and report.selection is not None
    chosen = report.chosen()["consensus_scaling"].chosen
    assert chosen in (0.5, 1.0) and report.selection.evaluations == 2
    expected = memory_merge(cks, Consensus(over="ties", k=2, scaling=chosen, lambdas=[0.4]))
    saved = body_of(out / "cola")
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)
    assert 0 < report.notes["consensus_kept_fraction"] < 1
    assert "chosen on the `validation` split (2 evaluations)" in (out / "report.md").read_text()
    assert_rows(report, tasks)


# ---------------------------------------------------------------------------------------------- DARE


def test_dare_through_the_cli(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    from fmn_pl.merging.task_arithmetic import TaskArithmetic

    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "sst2"])]
    report = main(
        [
            "--method",
            "task_arithmetic",
            "--method.scaling",
            "0.5",
            "--method.dare_p",
            "0.3",
            "--method.dare_seed",
            "4",
            "--checkpoints",
            *map(str, cks),
            "--no_eval",
            *common(tmp_path / "o", tiny_glue),
        ]
    )
    assert report is not None and report.options["dare_p"] == 0.3
    expected = memory_merge(cks, TaskArithmetic(scaling=0.5, dare_p=0.3, dare_seed=4))
    plain = memory_merge(cks, TaskArithmetic(scaling=0.5))
    saved = body_of(tmp_path / "o" / "rte")
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)
    assert not torch.equal(saved[key], plain[key])


def test_help_lists_the_new_methods(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    for name in ("regmean", "adamerging", "tall", "consensus"):
        assert f"  {name} " in text
    main(["--method", "adamerging", "--help"])
    text = capsys.readouterr().out
    for option in ("granularity", "plus", "regression", "steps"):
        assert option in text
