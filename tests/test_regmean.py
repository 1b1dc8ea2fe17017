"""RegMean: merged linear weights against an independent least-squares solve; ridge fallback; Gram keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fmn_pl.artifacts import save_artifact
from fmn_pl.checkpoint import weights_fingerprint
from fmn_pl.grams import gram_keys
from fmn_pl.merging.base import CheckpointReader, MergeContext
from fmn_pl.merging.regmean import RegMean, regmean_solve
from tests.conftest import tiny_model


def lstsq_reference(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W sum_i |X_i W^T - X_i W_i^T|^2 / n_i, by lstsq over the stacked, row-scaled inputs."""
    a = torch.cat([x.double() / len(x) ** 0.5 for x in xs])
    b = torch.cat([x.double() @ w.double().T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    return torch.linalg.lstsq(a, b).solution.T.float()


def test_solve_equals_least_squares_over_stacked_inputs() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(n, 6) * torch.linspace(0.5, 2, 6) for n in (20, 35, 50)]
    ws = [torch.randn(4, 6) for _ in xs]
    grams = [x.T @ x / len(x) for x in xs]
    merged, singular = regmean_solve(grams, ws, alpha=1.0)
    assert not singular
    torch.testing.assert_close(merged, lstsq_reference(xs, ws), rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_a_per_input_weighted_average() -> None:
    torch.manual_seed(1)
    xs = [torch.randn(30, 5) for _ in range(2)]
    ws = [torch.randn(3, 5) for _ in xs]
    grams = [x.T @ x / len(x) for x in xs]
    merged, _ = regmean_solve(grams, ws, alpha=0.0)
    d = [g.diagonal() for g in grams]  # column j weighted by each model's input energy on j
    expected = (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_singular_sum_adds_ridge_and_unseen_inputs_fall_back_to_average() -> None:
    torch.manual_seed(2)
    xs = [torch.randn(40, 5) for _ in range(2)]
    for x in xs:
        x[:, 3] = 0.0  # no model ever sees input 3
    ws = [torch.randn(4, 5) for _ in xs]
    grams = [x.T @ x / len(x) for x in xs]
    merged, singular = regmean_solve(grams, ws, alpha=1.0, ridge=1e-8)
    assert singular
    torch.testing.assert_close(merged[:, 3], (ws[0][:, 3] + ws[1][:, 3]) / 2)
    keep = [0, 1, 2, 4]
    ref = lstsq_reference([x[:, keep] for x in xs], [w[:, keep] for w in ws])
    torch.testing.assert_close(merged[:, keep], ref, rtol=1e-4, atol=1e-4)


def test_query_key_value_share_the_query_gram() -> None:
    keys = gram_keys(tiny_model("bert"))
    q = "bert.encoder.layer.1.attention.self.query"
    assert keys["bert.encoder.layer.1.attention.self.key"] == q == keys["bert.encoder.layer.1.attention.self.value"]
    assert keys["bert.encoder.layer.1.output.dense"] == "bert.encoder.layer.1.output.dense"
    assert "bert.pooler.dense" in keys and "classifier" not in keys  # the head is not body
    dkeys = gram_keys(tiny_model("distilbert"))
    assert dkeys["distilbert.transformer.layer.0.attention.v_lin"] == "distilbert.transformer.layer.0.attention.q_lin"
    assert "pre_classifier" not in dkeys


def _saved_models(tmp_path: Path, n: int) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """n tiny BERT classifiers saved as bare safetensors folders (what CheckpointReader reads)."""
    dirs, states = [], []
    for i in range(n):
        model = tiny_model("bert", seed=i)
        d = tmp_path / f"m{i}"
        d.mkdir()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(d / "model.safetensors"))
        dirs.append(d)
        states.append(state)
    return dirs, states


def test_merge_over_context_with_hand_made_grams(tmp_path: Path) -> None:
    """Through the protocol: linear weights solved per Gram (Q/K/V from one), everything else averaged."""
    torch.manual_seed(3)
    dirs, states = _saved_models(tmp_path, 2)
    model = tiny_model("bert")
    linear = gram_keys(model)
    inputs: list[dict[str, torch.Tensor]] = []
    for i, d in enumerate(dirs):
        xs = {g: torch.randn(64, states[i][f"{g}.weight"].shape[1]) for g in set(linear.values())}
        inputs.append(xs)
        grams = {g: x.T @ x / len(x) for g, x in xs.items()}
        save_artifact(d / "grams.safetensors", grams,
                      {"kind": "grams", "fingerprint": weights_fingerprint(d), "task": "rte", "num_examples": 8})
    keys = [k for k, v in states[0].items() if k.startswith("bert.") and v.is_floating_point()]
    ctx = MergeContext(checkpoints=dirs, tasks=["rte", "mrpc"], config=model.config, body_prefix="bert.",
                       keys=keys, readers=[CheckpointReader(d) for d in dirs], log=lambda s: None)
    merged = dict(RegMean(alpha=1.0).merge(ctx))
    assert set(merged) == set(keys)
    for module, gram in linear.items():
        w = f"{module}.weight"
        ref = lstsq_reference([inputs[i][gram] for i in range(2)], [states[i][w] for i in range(2)])
        torch.testing.assert_close(merged[w], ref, rtol=1e-4, atol=1e-5)
    for k in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.bias",
              "bert.encoder.layer.1.output.LayerNorm.weight"):
        torch.testing.assert_close(merged[k], (states[0][k] + states[1][k]) / 2)
    assert ctx.notes["regmean_ridge"] == []


def test_missing_gram_is_a_clear_error(tmp_path: Path) -> None:
    dirs, states = _saved_models(tmp_path, 2)
    for d in dirs:
        save_artifact(d / "grams.safetensors", {"bert.pooler.dense": torch.eye(32)},
                      {"kind": "grams", "fingerprint": weights_fingerprint(d), "task": "rte"})
    model = tiny_model("bert")
    keys = [k for k in states[0] if k.startswith("bert.")]
    ctx = MergeContext(checkpoints=dirs, tasks=["rte", "mrpc"], config=model.config, body_prefix="bert.",
                       keys=keys, readers=[CheckpointReader(d) for d in dirs])
    with pytest.raises(ValueError, match="lacks the Gram"):
        dict(RegMean().merge(ctx))
