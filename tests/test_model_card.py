"""Model cards: every exported checkpoint and merged folder carries a README.md that `ModelCard.load` reads back
with the Hub's metadata; `--push_to_hub` uploads the merge (the hub mocked) and refuses in one line without a token."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from huggingface_hub import ModelCard

from fmn_pl.checkpoint import read_metadata, weights_fingerprint
from fmn_pl.cli import shell
from fmn_pl.merge_cli import main

from .test_merge_cli import common


def test_exported_checkpoint_has_a_card(make_checkpoint: Callable) -> None:
    ck = make_checkpoint("mrpc")
    card = ModelCard.load(ck / "README.md")
    data = card.data.to_dict()
    meta = read_metadata(ck)
    assert data["base_model"] == meta["base_model"] and data["library_name"] == "transformers"
    assert data["tags"] == ["fmn-pl", "glue", "mrpc"] and data["datasets"] == ["nyu-mll/glue"]
    assert data["fmn_pl"]["fingerprint"] == meta["fingerprint"] == weights_fingerprint(ck)
    assert data["fmn_pl"]["inputs"]["base_fingerprint"] == weights_fingerprint(meta["base_model"])


def test_merged_folders_have_cards(make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path) -> None:
    cks = [make_checkpoint(t, seed=s, noise=0.05) for s, t in enumerate(["rte", "stsb"])]
    out = tmp_path / "out"
    report = main(["--method", "task_arithmetic", "--checkpoints", *map(str, cks), *common(out, tiny_glue)])
    assert report is not None
    for folder, tasks in ((out, ["rte", "stsb"]), (out / "rte", ["rte"]), (out / "stsb", ["stsb"])):
        card = ModelCard.load(folder / "README.md")
        data = card.data.to_dict()
        assert data["base_model"] == [read_metadata(cks[0])["base_model"], *map(str, cks)]
        assert data["base_model_relation"] == "merge" and data["library_name"] == "transformers"
        assert data["tags"] == ["fmn-pl", "merge", "task_arithmetic", *tasks]
        info = data["fmn_pl"]
        assert [i["fingerprint"] for i in info["inputs"]] == [weights_fingerprint(c) for c in cks]
        assert info["options"] == report.options and info["label"] == report.name == "task_arithmetic"
        assert info["choices"] == {k: c.chosen for k, c in report.chosen().items()}
        assert info["choices"]["task_arithmetic_scaling"] is not None
        assert info["command"] == f"fmn-pl merge --config {out / 'config.yaml'}"
        # model-index: each task's metrics with the constant prediction's beside them
        metrics = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
        for t in tasks:
            merged, constant = report.results[t].merged, report.results[t].baseline
            assert merged is not None and constant is not None
            if t == "rte":
                assert metrics[("rte", "accuracy")] == round(merged["accuracy"], 4)
                assert metrics[("rte", "accuracy_constant")] == round(constant["accuracy"], 4)
            else:
                assert metrics[("stsb", "pearsonr")] == round(merged["pearson"], 4)
                assert metrics[("stsb", "mse_constant")] == round(constant["mse"], 4)
        assert {r.dataset_config for r in card.data.eval_results} == set(tasks)
    # the card is no weight file: the task folders keep the fingerprints their fmn_pl.json records
    assert read_metadata(out / "rte")["fingerprint"] == weights_fingerprint(out / "rte")


def test_push_to_hub(
    make_checkpoint: Callable, tiny_glue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    args = ["merge", "--method", "average", "--checkpoints", *map(str, cks), "--no_eval"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as e:
        shell([*args, "--output", str(tmp_path / "none"), "--push_to_hub", "me/merged"])
    assert e.value.code == 2 and not (tmp_path / "none").exists()  # refused before any work

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", {"repo": repo})))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    out = tmp_path / "out"
    main([*args[1:], "--output", str(out), "--push_to_hub", "me/merged"])
    assert calls[0] == ("create", {"repo": "me/merged"})
    assert calls[1][1]["repo_id"] == "me/merged" and Path(calls[1][1]["folder_path"]) == out
    assert (out / "README.md").is_file() and (out / "rte" / "README.md").is_file()
