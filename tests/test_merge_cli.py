"""`fmn-pl merge` end to end on tiny checkpoints: outputs load and match the in-memory merge, reports, caching,
configs, help, and every bad input refused with one line before anything is written."""

from __future__ import annotations

import json
import os
from argparse import ArgumentError
from pathlib import Path
from typing import Callable

import pytest
import torch

from fmn_pl.artifacts import artifact_path, save_artifact
from fmn_pl.checkpoint import read_metadata, weights_fingerprint
from fmn_pl.cli import shell
from fmn_pl.merge import run_merge
from fmn_pl.merge_cli import build_parser, main, to_config
from fmn_pl.merge_config import MergeConfig
from fmn_pl.merging.base import CheckpointReader, MergeContext
from fmn_pl.merging.fmn import FMN
from fmn_pl.metrics import SCALE_METRICS

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "merge"


def add_fisher(ckpt: Path, seed: int, kind: str = "mask_fisher", fingerprint_of: Path | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"head": torch.rand(2, 4, generator=g), "neuron": torch.rand(2, 37, generator=g)}
    meta = {
        "kind": kind,
        "task": read_metadata(ckpt)["task"],
        "fingerprint": weights_fingerprint(fingerprint_of or ckpt),
    }
    return save_artifact(artifact_path(ckpt, "mask_fisher"), tensors, meta)


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit code, stderr) of a run that must fail."""
    capsys.readouterr()  # drop what the fixtures printed
    with pytest.raises(SystemExit) as e:
        shell(["merge", *argv])
    return e.value.code, capsys.readouterr().err


def common(out: Path, glue: Path) -> list[str]:
    return ["--output", str(out), "--data_dir", str(glue), "--eval.max_samples", "16", "--progress", "false"]


def memory_merge(checkpoints: list[Path], method: object) -> dict[str, torch.Tensor]:
    return dict(method.merge(MergeContext.over(checkpoints)))  # type: ignore[attr-defined]


def test_merge_end_to_end(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(["rte", "stsb", "mrpc"])]
    for s, c in enumerate(cks):
        add_fisher(c, s)
    out = tmp_path / "out"
    report = main(
        [
            "--method",
            "fmn",
            "--method.broadcast",
            "per_node",
            "--method.normalize=mean",
            "--method.scaling=1",
            "--method.power=0.25",
            "--checkpoints",
            *map(str, cks),
            *common(out, tiny_glue),
        ]
    )
    assert report is not None

    # the saved per-task models are the in-memory merge with each task's own head
    merged = memory_merge(cks, FMN(broadcast="per_node", normalize="mean", scaling=1.0, power=0.25))
    ids = torch.randint(5, 150, (3, 11))
    for ck in cks:
        task = read_metadata(ck)["task"]
        expected = AutoModelForSequenceClassification.from_pretrained(ck)
        expected.load_state_dict(merged, strict=False)
        saved = AutoModelForSequenceClassification.from_pretrained(out / task)
        with torch.no_grad():
            torch.testing.assert_close(saved(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(saved.classifier.weight, expected.classifier.weight, rtol=0, atol=0)
        # the body is stored once: every task folder links the same file
        assert os.stat(out / task / "model-body.safetensors").st_ino == os.stat(out / "model.safetensors").st_ino
        assert read_metadata(out / task)["fingerprint"] == weights_fingerprint(out / task)
        assert read_metadata(out / task)["merged"]["method"] == "fmn"
    body = AutoModel.from_pretrained(out)  # the bare merged body loads too
    torch.testing.assert_close(
        body.encoder.layer[1].output.dense.weight, merged["bert.encoder.layer.1.output.dense.weight"], rtol=0, atol=0
    )

    # the report
    on_disk = json.loads((out / "report.json").read_text())
    assert report.to_dict() == on_disk  # the returned report is the one written
    assert report.name == "fmn" and report.tasks == ["rte", "stsb", "mrpc"] and report.summary is not None
    assert on_disk["method"] == "fmn" and on_disk["options"]["broadcast"] == "per_node"
    assert on_disk["tasks"] == ["rte", "stsb", "mrpc"] and on_disk["evaluation"]["max_samples"] == 16
    assert [c["fingerprint"] for c in on_disk["checkpoints"]] == [weights_fingerprint(c) for c in cks]
    assert on_disk["checkpoints"][0]["artifacts"]["mask_fisher"]["kind"] == "mask_fisher"
    for r in on_disk["results"].values():
        assert {"merged", "individual", "average"} <= set(r)
        if r["individual"]["score"] > 0:
            assert r["normalized"] == pytest.approx(r["merged"]["score"] / r["individual"]["score"])
    assert set(on_disk["results"]["stsb"]["merged"]) == {"pearson", "spearman", "score", *SCALE_METRICS}
    assert set(on_disk["results"]["mrpc"]["merged"]) == {"f1", "accuracy", "score"}
    assert {"merge_s", "eval_s", "total_s"} <= set(on_disk["timings"]) and on_disk["peak_rss_mb"] > 0
    assert "| stsb | pearson, spearman |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folders left

    # the saved resolved config re-parses and names the same method
    parser = build_parser()
    method = to_config(parser, parser.parse_args(["--config", str(out / "config.yaml")])).method
    assert type(method).__name__ == "FMN" and method.normalize == "mean"

    # the individual checkpoint's own score matches a plain evaluation of it (same examples, same metrics)
    from fmn_pl.evaluate import EvalData, Evaluator

    ev = Evaluator(cks, EvalData(str(tiny_glue), max_samples=16), accelerator="cpu", progress=False)
    assert ev.evaluate(0) == pytest.approx(on_disk["results"]["rte"]["individual"])


def test_individual_and_average_scores_are_cached(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmn_pl.evaluate import Evaluator

    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mnli"])]
    for s, c in enumerate(cks):
        add_fisher(c, s)
    fixed = ["--method.normalize=none", "--method.scaling=1", "--method.power=0.25"]  # nothing chosen on data
    first = main(["--method=fmn", *fixed, "--checkpoints", *map(str, cks), *common(tmp_path / "a", tiny_glue)])
    # MNLI is scored on both validation splits, its score their mean
    assert first is not None
    mnli = first.results["mnli"].merged
    assert mnli is not None
    assert set(mnli) == {"matched/accuracy", "matched/score", "mismatched/accuracy", "mismatched/score", "score"}
    assert mnli["score"] == pytest.approx((mnli["matched/accuracy"] + mnli["mismatched/accuracy"]) / 2)
    calls: list[object] = []
    original = Evaluator.evaluate

    def counting(self, i, model_dir=None, body=None, limit=None, rows=None):
        calls.append(model_dir)
        return original(self, i, model_dir, body, limit, rows)

    monkeypatch.setattr(Evaluator, "evaluate", counting)
    second = main(
        [
            "--method=fmn",
            "--method.broadcast=reference",
            *fixed,
            "--checkpoints",
            *map(str, cks),
            *common(tmp_path / "b", tiny_glue),
        ]
    )
    assert len(calls) == 2 and all(c is not None for c in calls)  # only the two merged models
    assert second is not None
    for t in ("rte", "mnli"):
        assert second.results[t].individual == first.results[t].individual
        assert second.results[t].average == first.results[t].average
    assert (cks[0] / "fmn_pl_eval.json").is_file()


def test_task_arithmetic_scaling_chosen_and_reported(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path
) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "sst2"])]
    report = main(
        [
            "--method",
            "task_arithmetic",
            "--method.scalings=[0.5, 1.0]",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "8",
            "--eval.compare_average",
            "false",
            *common(tmp_path / "o", tiny_glue),
        ]
    )
    assert report is not None and report.selection is not None
    sel = report.selection
    assert sel.split == "validation" and sel.transductive and sel.evaluations == 2 and sel.max_samples == 8
    assert report.chosen()["task_arithmetic_scaling"].chosen in (0.5, 1.0)
    assert report.notes["task_arithmetic_scaling"]["chosen"] == report.chosen()["task_arithmetic_scaling"].chosen
    assert "chosen on the `validation` split" in (tmp_path / "o" / "report.md").read_text()


def test_fmn_defaults_choose_power_and_scaling(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "sst2"])]
    for s, c in enumerate(cks):
        add_fisher(c, s)
    report = main(
        [
            "--method",
            "fmn",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "8",
            *common(tmp_path / "o", tiny_glue),
        ]
    )
    assert report is not None and report.selection is not None and report.base is not None
    options = report.options
    assert options["power"] is None and options["normalize"] is None and options["broadcast"] == "per_node"
    # every (normalize, p, s) of {none, mean} x {0.25, 0.5} x [1, 1.5, 2, 2.5] and p = 0 (one body: no Fisher in
    # it) x s, by the mean score (p = 0, s = 1 is the average itself): 20 bodies
    assert report.selection.evaluations == 20 and report.base.path == read_metadata(cks[0])["base_model"]
    notes = report.notes
    s, p, n = notes["fmn_scaling"]["chosen"], notes["fmn_power"]["chosen"], notes["fmn_normalize"]["chosen"]
    assert s in (1.0, 1.5, 2.0, 2.5) and p in (0.25, 0.5, 0.0) and n in ("none", "mean")
    means = notes["fmn_scaling"]["mean_scores"]
    assert len(means) == len(notes["fmn_scaling"]["scores"]) == 20
    assert (
        means[(f"normalize={n} " if p else "") + f"p={p} s={s}"] == max(means.values()) and notes["fmn"]["power"] == p
    )
    assert (
        f"(20 evaluations): fmn scaling {s} (of [1.0, 1.5, 2.0, 2.5]), by mean, fmn power {p} (of [0.25, 0.5, 0.0])"
        in (tmp_path / "o" / "report.md").read_text()
    )


def test_screening_keeps_the_best_finalists(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    """Successive halving: every candidate scored on 4 rows per task, the 3 best by mean then on all 16; the choice
    is the best finalist on all rows."""
    cks = [make_checkpoint(t, seed=s, noise=0.2) for s, t in enumerate(["rte", "sst2"])]
    for s, c in enumerate(cks):
        add_fisher(c, s)
    report = main(
        [
            "--method",
            "fmn",
            "--checkpoints",
            *map(str, cks),
            "--selection.samples",
            "16",
            "--selection.screen",
            "4",
            "--selection.finalists",
            "3",
            *common(tmp_path / "o", tiny_glue),
        ]
    )
    assert report is not None and report.selection is not None
    notes = report.notes["fmn_scaling"]
    screened = notes["screened"]
    assert screened["rows"] == 4 and len(screened["mean_scores"]) == 20
    top = sorted(screened["mean_scores"], key=lambda k: -screened["mean_scores"][k])[:3]
    assert set(screened["finalists"]) == set(top) == set(notes["mean_scores"])
    assert report.selection.evaluations == 20 + 3
    chosen = max(notes["mean_scores"], key=notes["mean_scores"].get)
    assert notes["chosen"] == float(chosen.rsplit("s=", 1)[1])


def test_ties_uses_recorded_base_and_no_eval(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    out = tmp_path / "o"
    report = main(
        [
            "--method",
            "ties",
            "--method.top_k",
            "50",
            "--checkpoints",
            *map(str, cks),
            "--no_eval",
            *common(out, tiny_glue),
        ]
    )
    assert report is not None and report.base is not None
    assert not report.results and report.summary is None and "results" not in report.to_dict()
    assert report.base.path == read_metadata(cks[0])["base_model"]
    assert (out / "rte" / "model-head.safetensors").is_file() and not (out / "report.png").exists()
    assert "Not evaluated" in (out / "report.md").read_text()


def test_save_model_false_keeps_reports_only(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    out = tmp_path / "o"
    report = main(
        ["--method", "average", "--checkpoints", *map(str, cks), "--save_model", "false", *common(out, tiny_glue)]
    )
    assert report is not None
    assert report.results["rte"].merged == report.results["rte"].average
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("report")) == ["config.yaml"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(path: Path) -> None:
    parser = build_parser()
    init = to_config(parser, parser.parse_args(["--config", str(path)]))
    module = type(init.method).__module__.removeprefix("fmn_pl.merging.")
    assert path.stem == module or path.stem.startswith(f"{module}_")  # fmn_reference.yaml is an fmn config
    assert len(init.checkpoints) >= 2 and init.output


def test_help_shows_methods_and_their_options(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    for name in ("average", "fmn", "fisher", "task_arithmetic", "ties", "--eval.max_samples", "--overwrite"):
        assert name in text
    main(["--method", "fmn", "--help"])
    text = capsys.readouterr().out
    for option in ("broadcast", "per_node", "normalize", "universal", "epsilon", "coefficients"):
        assert option in text
    lines = text.strip().splitlines()  # that method's options only, one line each
    assert "--eval.max_samples" not in text and all(line.startswith("  --method.") for line in lines[1:])
    assert len(lines) == 1 + len(__import__("inspect").signature(FMN.__init__).parameters) - 1


# ---------------------------------------------------------------------------------------------- bad input


def export_variant(
    tmp: Path,
    tiny_base: Callable,
    name: str,
    task: str = "mrpc",
    family: str = "bert",
    vocab: dict[str, int] | None = None,
    **config: object,
) -> Path:
    """A task checkpoint whose config differs (layers, hidden size, vocabulary, family) or whose tokenizer does."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

    from fmn_pl.checkpoint import CheckpointMeta, export_checkpoint
    from fmn_pl.tasks import get_task
    from tests.conftest import tiny_config

    spec = get_task(task)
    if family == "bert":
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=160)
        cfg = AutoConfig.for_model("bert", max_position_embeddings=130, pad_token_id=0, **{**kw, **config})
    else:
        cfg = tiny_config(family)
    cfg.num_labels = spec.num_labels
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base(family))
    if vocab is not None:
        tok = BertTokenizerFast(vocab=vocab)
    meta = CheckpointMeta(
        task=task, label_names=list(spec.label_names), num_labels=spec.num_labels, base_model=str(tiny_base(family))
    )
    return export_checkpoint(model, tok, tmp / name, meta)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            {"num_hidden_layers": 3},
            r"has num_hidden_layers=3 but .* has num_hidden_layers=2: checkpoints of different architectures",
        ),
        ({"hidden_size": 48, "intermediate_size": 37}, r"has hidden_size=48 but .* has hidden_size=32"),
        ({"vocab_size": 170}, r"has vocab_size=170 but .* has vocab_size=160"),
        ({"family": "distilbert"}, r"has model_type=distilbert but .* has model_type=bert"),
        ({"tokenizer": True}, r"the tokenizer of .* differs from that of"),
    ],
    ids=["layers", "hidden", "vocab", "family", "tokenizer"],
)
def test_mismatched_checkpoints_are_refused(
    variant: dict,
    message: str,
    make_checkpoint: Callable,
    tiny_base: Callable,
    tiny_glue: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    good = make_checkpoint("rte")
    variant = dict(variant)
    family = variant.pop("family", "bert")
    vocab = None
    if variant.pop("tokenizer", False):
        from transformers import AutoTokenizer

        vocab = dict(AutoTokenizer.from_pretrained(tiny_base("bert")).get_vocab())
        vocab["[SEP]"], vocab["[MASK]"] = vocab["[MASK]"], vocab["[SEP]"]  # same tokens, different ids
    other = export_variant(tmp_path, tiny_base, "other", family=family, vocab=vocab, **variant)
    out = tmp_path / "out"
    code, err = run_main(
        ["--method", "average", "--checkpoints", str(good), str(other), *common(out, tiny_glue)], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("fmn-pl merge: error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_input_errors(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rte, mrpc = make_checkpoint("rte", seed=0), make_checkpoint("mrpc", seed=1)
    out = tmp_path / "out"

    def refused(argv: list[str], pattern: str) -> None:
        code, err = run_main([*argv, *common(out, tiny_glue)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and __import__("re").search(pattern, err), err
        assert not out.exists()

    refused(["--method", "average", "--checkpoints", str(rte)], "at least two checkpoints, got 1")
    twin = make_checkpoint("rte", seed=5, name="rte-again")
    refused(
        ["--method", "average", "--checkpoints", str(rte), str(twin)], "are both task 'rte': each task may appear once"
    )
    refused(["--method", "average", "--checkpoints", str(rte), str(tmp_path / "nope")], "does not exist")
    # Fisher artifacts: missing, computed on other weights, of the wrong kind, or of a kind the method cannot use
    refused(
        ["--method", "fmn", "--checkpoints", str(rte), str(mrpc)],
        r"method fmn needs a mask_fisher artifact beside .*rte.* compute it with `fmn-pl fisher",
    )
    add_fisher(rte, 0)
    add_fisher(mrpc, 1, fingerprint_of=rte)
    refused(["--method", "fmn", "--checkpoints", str(rte), str(mrpc)], r"was computed on weights .* recompute it")
    add_fisher(mrpc, 1, kind="full_fisher")
    refused(
        ["--method", "fmn", "--checkpoints", str(rte), str(mrpc)], r"is a 'full_fisher' artifact, not 'mask_fisher'"
    )
    refused(
        ["--method", "fisher", "--checkpoints", str(rte), str(mrpc)],
        r"method fisher needs a full_fisher artifact .* it has mask_fisher .*--kind full",
    )
    # a base model that is not these checkpoints' pretrained model
    other_base = tmp_path / "other-base"
    from transformers import AutoModel

    from tests.conftest import tiny_config

    AutoModel.from_config(tiny_config("bert", layers=1)).save_pretrained(other_base)
    refused(
        [
            "--method",
            "task_arithmetic",
            "--method.scaling",
            "0.5",
            "--checkpoints",
            str(rte),
            str(mrpc),
            "--base",
            str(other_base),
        ],
        r"base model .* lacks tensor 'bert.encoder.layer.1",
    )
    refused(["--method", "nonsense", "--checkpoints", str(rte), str(mrpc)], r"nonsense")
    # an existing output folder is refused and left untouched
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(["--method", "average", "--checkpoints", str(rte), str(mrpc), *common(out, tiny_glue)], capsys)
    assert code == 2 and "already exists and is not empty; pass --overwrite true" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_nothing_half_written_when_a_merge_fails(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old result")
    from fmn_pl.merging.average import Average

    seen = []

    def failing(self, key, models, ctx):
        seen.append(key)
        if len(seen) > 5:
            raise RuntimeError("disk on fire")
        return models[0]

    monkeypatch.setattr(Average, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_merge(
            MergeConfig(
                [str(c) for c in cks], Average(), str(out), data_dir=str(tiny_glue), overwrite=True, progress=False
            )
        )
    assert [p.name for p in out.iterdir()] == ["previous.txt"]  # the old output survives, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(c.name for c in cks)])  # no temp folder


def test_own_tensors_stay_with_each_task(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    """--own_tensors: matching body tensors are each task's own (in its folder and in its score), the rest is the
    merge; the plain average baseline keeps them too; the bare body lacks them; bad patterns are refused."""
    from fmn_pl.evaluate import EvalData, Evaluator
    from fmn_pl.merge import merge_body
    from fmn_pl.merging.average import Average

    cks = [make_checkpoint(t, seed=s, noise=0.3) for s, t in enumerate(["rte", "mrpc"])]
    out = tmp_path / "o"
    report = main(
        [
            "--method",
            "average",
            "--own_tensors",
            '["*.pooler.*"]',
            "--checkpoints",
            *map(str, cks),
            *common(out, tiny_glue),
        ]
    )
    own = ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    assert report is not None and report.own_tensors is not None
    assert sorted(report.own_tensors.tensors) == own and report.own_tensors.parameters == 32 * 32 + 32
    assert (
        "each task keeps its own 2 tensors (1,056 parameters) matching `*.pooler.*`" in (out / "report.md").read_text()
    )
    readers = [CheckpointReader(c) for c in cks]
    for i, task in enumerate(["rte", "mrpc"]):
        saved = CheckpointReader(out / task)
        for k in own:
            torch.testing.assert_close(saved.get(k), readers[i].get(k), rtol=0, atol=0)
        key = "bert.encoder.layer.0.attention.self.query.weight"
        torch.testing.assert_close(saved.get(key), (readers[0].get(key) + readers[1].get(key)) / 2)
    assert not any("pooler" in k for k in CheckpointReader(out).keys())
    # the scores: the independent in-memory average without the pooler, each task with its own
    ev = Evaluator(cks, EvalData(str(tiny_glue), max_samples=16), accelerator="cpu", progress=False)
    body = merge_body(cks, Average(), evaluator=ev, own_tensors=["*.pooler.*"])
    assert not any("pooler" in k for k in body)
    for i, task in enumerate(["rte", "mrpc"]):
        assert report.results[task].merged == pytest.approx(ev.evaluate(i, body=body))
    plain = main(["--method", "average", "--checkpoints", *map(str, cks), *common(tmp_path / "p", tiny_glue)])
    assert plain is not None
    assert (
        plain.results["rte"].average != report.results["rte"].average
        or plain.results["mrpc"].average != report.results["mrpc"].average
    )  # a baseline of its own
    for patterns, error in (
        (["*.nothing.*"], r"own_tensors pattern '\*.nothing.\*' matches no body tensor"),
        (["*"], "match every body tensor: nothing would be merged"),
    ):
        with pytest.raises(ValueError, match=error):
            run_merge(
                MergeConfig(list(map(str, cks)), Average(), str(tmp_path / "x"), own_tensors=patterns, evaluate=False)
            )
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "albert"])
def test_body_prefix_from_the_tensor_names_equals_the_models_own(family: str) -> None:
    """The merge reads the body's prefix off the checkpoint's tensor names (no model code imported); it must be
    what the model itself says, for every BERT-family head (DistilBERT's pre_classifier, RoBERTa's dense head)."""
    from fmn_pl.merge_inputs import body_prefix
    from tests.conftest import tiny_model

    model = tiny_model(family)
    keys = list(model.state_dict())
    assert body_prefix(model.config, keys) == (f"{model.base_model_prefix}.", type(model.base_model).__name__)
    assert body_prefix(model.config) == body_prefix(model.config, keys)  # the meta-model fallback agrees


def test_a_method_name_the_names_module_uses_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry names become classes of `fmn_pl.merging.names`: a name one of its functions has is refused in one
    line, not silently put in that function's place."""
    from fmn_pl.merging import METHODS

    monkeypatch.setitem(METHODS, "own_class", "average:Average")
    with pytest.raises(ValueError, match="merge method name 'own_class' is taken"):
        build_parser()


def test_registry_names_resolve_in_the_parser_with_their_types(tmp_path: Path) -> None:
    """`--method NAME`, `method: NAME` and `{class_path: NAME, init_args}` resolve with no rewriting, the options keep
    their types (a string for a list is refused), and the method is an instance of its own class."""
    from fmn_pl.merging.ties import Ties

    parser = build_parser()
    common = ["--checkpoints", "a", "b", "--output", str(tmp_path / "o")]
    config = to_config(parser, parser.parse_args(["--method", "ties", "--method.top_k", "10", *common]))
    assert type(config.method) is Ties and config.method.options()["top_k"] == 10.0
    assert config.checkpoints == ["a", "b"] and config.evaluate
    assert not to_config(parser, parser.parse_args(["--method", "average", "--no_eval", *common])).evaluate
    with pytest.raises(ArgumentError, match="coefficients"):
        parser.parse_object({"method": {"class_path": "fmn", "init_args": {"coefficients": "both"}}, "output": "o"})
