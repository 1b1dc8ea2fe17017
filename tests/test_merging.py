"""Merge methods against independent slow implementations written from the spec (docs/methods.md)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fmn_pl.artifacts import artifact_path, save_artifact
from fmn_pl.checkpoint import weights_fingerprint
from fmn_pl.merging import METHODS, method_class
from fmn_pl.merging.average import Average
from fmn_pl.merging.base import CheckpointReader, MergeContext
from fmn_pl.merging.dare import dare, dare_generator
from fmn_pl.merging.fisher import Fisher
from fmn_pl.merging.fmn import FMN, REFERENCE, normalize_fisher
from fmn_pl.merging.task_arithmetic import TaskArithmetic
from fmn_pl.merging.ties import Ties, ties_task_vector


def ref_fmn(**options: object) -> FMN:
    """FMN with the paper's rule (`REFERENCE`) under `options`: what the slow loops below compute."""
    return FMN(**{**REFERENCE, **options})  # type: ignore[arg-type]


L, H, F, HIDDEN = 2, 4, 37, 32  # tests/conftest.py tiny_config
D = HIDDEN // H


class FakeArtifact:
    """Stands in for a mask-Fisher artifact where the real loader would refuse the values (all zero)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.path, self.metadata = tensors, Path("fake.safetensors"), {"kind": "mask_fisher"}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def model_ctx(
    checkpoints: list[Path],
    fishers: list[dict[str, torch.Tensor]] | None = None,
    base: Path | None = None,
    evaluate: Callable | None = None,
) -> MergeContext:
    """A context over real tiny checkpoints; `fishers` become (fake) mask-Fisher artifacts."""
    artifacts = {(i, "mask_fisher"): FakeArtifact(f) for i, f in enumerate(fishers or [])}
    return MergeContext.over(
        checkpoints, base, tasks=["rte"] * len(checkpoints), evaluate=evaluate, artifacts=artifacts
    )


def random_fisher(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head": scale * torch.rand(L, H, generator=g), "neuron": scale * torch.rand(L, F, generator=g)}


# ---------------------------------------------------------------------------------------------- FMN, slow reference


def spec_weight(key: str, idx: tuple[int, ...], f: dict[str, torch.Tensor], broadcast: str, universal: bool) -> float:
    """One model's weight of one parameter entry, straight from the broadcast table of methods.md."""
    head, neuron = f["head"].double(), f["neuron"].double()
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:  # embeddings, pooler
        return float((head.mean(1) + neuron.mean(1)).mean()) if universal else 1.0
    layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
    per_node = broadcast == "per_node"
    mean_head, mean_neuron = float(head[layer].mean()), float(neuron[layer].mean())
    if module in ("attention.self.query", "attention.self.key"):
        return float(head[layer, idx[0] // D])
    if module == "attention.self.value":
        return float(head[layer, idx[0] // D]) if per_node else mean_head
    if module == "attention.output.dense":
        return float(head[layer, idx[1] // D]) if per_node and kind == "weight" else mean_head
    if module == "attention.output.LayerNorm":
        return mean_head
    if module == "intermediate.dense":
        return float(neuron[layer, idx[0]])
    if module == "output.dense":
        return float(neuron[layer, idx[1]]) if per_node and kind == "weight" else mean_neuron
    if module == "output.LayerNorm":
        return mean_neuron
    raise AssertionError(f"unexpected body tensor {key}")


def slow_fmn(
    ctx: MergeContext,
    fishers: list[dict[str, torch.Tensor]],
    broadcast: str = "reference",
    universal: bool = True,
    coefficients: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The FMN rule entry by entry in float64, with the all-zero fallback to the (coefficient-weighted) mean."""
    c = coefficients or [1.0] * len(fishers)
    out = {}
    for key in ctx.keys:
        thetas = [r.get(key).double() for r in ctx.readers]
        merged = torch.empty_like(thetas[0])
        for idx in itertools.product(*map(range, thetas[0].shape)):
            w = [cj * spec_weight(key, idx, f, broadcast, universal) for cj, f in zip(c, fishers)]
            if sum(w) == 0:
                w = list(c)
            merged[idx] = sum(wj * t[idx] for wj, t in zip(w, thetas)) / sum(w)
        out[key] = merged.float()
    return out


@pytest.mark.parametrize("broadcast", ["reference", "per_node"])
def test_fmn_equals_per_parameter_loop(make_checkpoint, broadcast: str) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(3)]
    fishers = [random_fisher(s) for s in range(3)]
    fishers[1]["head"][0, 2] = 0.0  # zero in some models only: no fallback there
    for f in fishers:
        f["neuron"][1, 5] = 0.0  # zero in every model: plain average
    ctx = model_ctx(cks, fishers)
    merged = dict(ref_fmn(broadcast=broadcast).merge(ctx))
    expected = slow_fmn(ctx, fishers, broadcast)
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fmn_universal_off_and_coefficients_against_loop(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(2)]
    fishers = [random_fisher(10 + s) for s in range(2)]
    ctx = model_ctx(cks, fishers)
    merged = dict(ref_fmn(universal=False, coefficients=[3.0, 0.5]).merge(ctx))
    expected = slow_fmn(ctx, fishers, universal=False, coefficients=[3.0, 0.5])
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def plain_average(ctx: MergeContext) -> dict[str, torch.Tensor]:
    return {k: sum(r.get(k).double() for r in ctx.readers).float() / len(ctx.readers) for k in ctx.keys}


@pytest.mark.parametrize("normalize", ["none", "mean", "type", "layer", "rank"])
@pytest.mark.parametrize("broadcast", ["reference", "per_node"])
def test_fmn_with_equal_fishers_is_the_plain_average(make_checkpoint, normalize: str, broadcast: str) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(3)]
    f = random_fisher(7)
    ctx = model_ctx(cks, [f, f, f])
    merged = dict(ref_fmn(broadcast=broadcast, normalize=normalize).merge(ctx))
    for key, avg in plain_average(ctx).items():
        torch.testing.assert_close(merged[key], avg, rtol=1e-5, atol=1e-6, msg=key)


def test_zero_fisher_model_contributes_nothing(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(2)]
    zero = {"head": torch.zeros(L, H), "neuron": torch.zeros(L, F)}
    ctx = model_ctx(cks, [random_fisher(3), zero])
    for broadcast in ("reference", "per_node"):
        merged = dict(ref_fmn(broadcast=broadcast).merge(ctx))
        for key in ctx.keys:  # the other model's Fisher is positive everywhere: its weights win everywhere
            torch.testing.assert_close(merged[key], ctx.readers[0].get(key), msg=key)


def test_all_zero_nodes_fall_back_to_the_average(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(2)]
    fishers = [random_fisher(4), random_fisher(5, scale=3.0)]
    for f in fishers:
        f["head"][0, 1] = 0.0
        f["neuron"][1, 7] = 0.0
    ctx = model_ctx(cks, fishers)
    merged = dict(ref_fmn().merge(ctx))
    avg = plain_average(ctx)
    q, ffn = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.intermediate.dense.bias"
    torch.testing.assert_close(merged[q][D : 2 * D], avg[q][D : 2 * D])  # head 1 of layer 0
    assert not torch.allclose(merged[q][:D], avg[q][:D])  # head 0 is Fisher-weighted
    torch.testing.assert_close(merged[ffn][7], avg[ffn][7])
    assert not torch.allclose(merged[ffn][6], avg[ffn][6])


def test_epsilon_floor(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(2)]
    fa = random_fisher(6)
    zero = {"head": torch.zeros(L, H), "neuron": torch.zeros(L, F)}
    ctx = model_ctx(cks, [fa, zero])
    eps = 0.05
    merged = dict(ref_fmn(epsilon=eps).merge(ctx))
    key = "bert.encoder.layer.1.intermediate.dense.weight"  # rows by neuron: (max(F_a, eps) a + eps b) / (. + eps)
    wa = fa["neuron"][1].clamp_min(eps)[:, None]
    a, b = ctx.readers[0].get(key), ctx.readers[1].get(key)
    torch.testing.assert_close(merged[key], (wa * a + eps * b) / (wa + eps))
    # a floor far above every Fisher makes all weights equal: the plain average
    huge = dict(ref_fmn(epsilon=1e3).merge(ctx))
    for k, avg in plain_average(ctx).items():
        torch.testing.assert_close(huge[k], avg, rtol=1e-5, atol=1e-6)
    # a floor far below every positive Fisher changes nothing where both are positive
    fb = random_fisher(8)
    ctx2 = model_ctx(cks, [fa, fb])
    tiny, ref = dict(ref_fmn(epsilon=1e-12).merge(ctx2)), dict(ref_fmn().merge(ctx2))
    for k in ref:
        torch.testing.assert_close(tiny[k], ref[k])


def test_normalize_fisher_as_documented() -> None:
    f = random_fisher(9, scale=5.0)
    h, n = normalize_fisher(f["head"], f["neuron"], "mean")
    torch.testing.assert_close(torch.cat([h.flatten(), n.flatten()]).mean(), torch.tensor(1.0))
    torch.testing.assert_close(h / f["head"], torch.full_like(h, float(h[0, 0] / f["head"][0, 0])))  # one scalar
    h, n = normalize_fisher(f["head"], f["neuron"], "type")
    torch.testing.assert_close((h.mean(), n.mean()), (torch.tensor(1.0), torch.tensor(1.0)))
    h, n = normalize_fisher(f["head"], f["neuron"], "layer")
    torch.testing.assert_close(h.mean(1), torch.ones(L))
    torch.testing.assert_close(n.mean(1), torch.ones(L))
    zero_layer = {"head": f["head"].clone(), "neuron": f["neuron"].clone()}
    zero_layer["head"][1] = 0
    h, _ = normalize_fisher(zero_layer["head"], zero_layer["neuron"], "layer")
    assert torch.equal(h[1], torch.zeros(H)) and torch.isfinite(h).all()
    h, n = normalize_fisher(f["head"], f["neuron"], "none")
    assert h is f["head"] and n is f["neuron"]


def test_rank_normalization_is_the_percentile_per_node_type() -> None:
    """rank: scipy's average rank within heads (and within neurons) / count; ties share, zeros stay 0."""
    from scipy.stats import rankdata

    f = random_fisher(13, scale=5.0)
    f["head"][0, :2] = 1.5  # a tie
    f["neuron"][1, 3] = 0.0  # a node no example depends on
    h, n = normalize_fisher(f["head"], f["neuron"], "rank")
    for got, x in ((h, f["head"]), (n, f["neuron"])):
        want = rankdata(x.flatten().numpy(), method="average").reshape(x.shape) / x.numel()
        want[x.numpy() == 0] = 0.0
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert h[0, 0] == h[0, 1] and n[1, 3] == 0 and float(n.max()) == 1.0
    # scale-free and invariant to any increasing transform (e.g. STS-B's larger loss scale, or F ** 3)
    h2, n2 = normalize_fisher(40.0 * f["head"] ** 3, 40.0 * f["neuron"] ** 3, "rank")
    assert torch.equal(h, h2) and torch.equal(n, n2)


def test_normalization_removes_per_model_scale(make_checkpoint) -> None:
    """Scaling one model's Fisher by a constant changes the reference merge, not the normalised ones;
    scaling one layer only is undone by `layer` normalisation alone."""
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(2)]
    fa, fb = random_fisher(11), random_fisher(12)
    scaled = {k: 40.0 * v for k, v in fb.items()}
    layer_scaled = {k: v.clone() for k, v in fb.items()}
    layer_scaled["head"][1] *= 40.0
    layer_scaled["neuron"][1] *= 40.0

    def run(fishers: list[dict], normalize: str) -> dict[str, torch.Tensor]:
        return dict(ref_fmn(normalize=normalize).merge(model_ctx(cks, fishers)))

    def same(x: dict, y: dict) -> bool:
        return all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x)

    assert not same(run([fa, fb], "none"), run([fa, scaled], "none"))
    for normalize in ("mean", "type", "layer", "rank"):
        assert same(run([fa, fb], normalize), run([fa, scaled], normalize)), normalize
    assert same(run([fa, fb], "layer"), run([fa, layer_scaled], "layer"))
    assert not same(run([fa, fb], "mean"), run([fa, layer_scaled], "mean"))


def test_fmn_reads_real_artifacts_and_checks_shapes(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(2)]
    fishers = [random_fisher(20), random_fisher(21)]
    for c, f in zip(cks, fishers):
        save_artifact(
            artifact_path(c, "mask_fisher"),
            f,
            {"kind": "mask_fisher", "task": "rte", "fingerprint": weights_fingerprint(c)},
        )
    ctx = model_ctx(cks)
    merged = dict(ref_fmn(broadcast="per_node").merge(ctx))
    ref = dict(ref_fmn(broadcast="per_node").merge(model_ctx(cks, fishers)))
    for k in ref:
        torch.testing.assert_close(merged[k], ref[k])
    save_artifact(
        artifact_path(cks[1], "mask_fisher"),
        {"head": torch.rand(L, H + 1), "neuron": torch.rand(L, F)},
        {"kind": "mask_fisher", "task": "rte", "fingerprint": weights_fingerprint(cks[1])},
    )
    with pytest.raises(ValueError, match=r"'head' has shape \(2, 5\), expected \(2, 4\)"):
        dict(ref_fmn().merge(model_ctx(cks)))


def test_fmn_option_errors() -> None:
    with pytest.raises(ValueError, match="broadcast"):
        ref_fmn(broadcast="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalize"):
        ref_fmn(normalize="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epsilon"):
        ref_fmn(epsilon=-1.0)


def test_coefficient_count_is_checked(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, name=f"m{s}") for s in range(2)]
    with pytest.raises(ValueError, match="3 coefficients given for 2 checkpoints"):
        dict(ref_fmn(coefficients=[1, 1, 1]).merge(model_ctx(cks, [random_fisher(0), random_fisher(1)])))
    with pytest.raises(ValueError, match="positive sum"):
        dict(Average(coefficients=[0, 0]).merge(model_ctx(cks)))


# ---------------------------------------------------------------------------------------------- full Fisher, average


def test_full_fisher_against_loop(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(3)]
    ctx = model_ctx(cks)
    g = torch.Generator().manual_seed(0)
    fishers = []
    for c in cks:
        f = {k: torch.rand(ctx.readers[0].shape(k), generator=g) ** 3 for k in ctx.keys}
        f[ctx.keys[0]].view(-1)[:5] = 0.0  # zero in all models: floor or average
        fishers.append(f)
        save_artifact(
            artifact_path(c, "full_fisher"),
            {k.removeprefix("bert."): v for k, v in f.items()},
            {"kind": "full_fisher", "task": "rte", "fingerprint": weights_fingerprint(c)},
        )
    for normalize, eps in ((False, 1e-6), (True, 0.0)):
        merged = dict(Fisher(normalize=normalize, epsilon=eps, coefficients=[1.0, 2.0, 0.5]).merge(model_ctx(cks)))
        norms = [
            float(np.sqrt(sum(float((v.double() ** 2).sum()) for v in f.values()))) if normalize else 1.0
            for f in fishers
        ]
        for key in ctx.keys:
            thetas = [r.get(key).double() for r in ctx.readers]
            ws = [c * (f[key].double() / n).clamp_min(eps) for c, f, n in zip([1.0, 2.0, 0.5], fishers, norms)]
            den = sum(ws)
            plain = sum(c * t for c, t in zip([1.0, 2.0, 0.5], thetas)) / 3.5
            ref = torch.where(den > 0, sum(w * t for w, t in zip(ws, thetas)) / torch.where(den > 0, den, 1.0), plain)
            torch.testing.assert_close(merged[key], ref.float(), rtol=1e-4, atol=1e-6, msg=key)


def test_full_fisher_missing_tensor(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, name=f"m{s}") for s in range(2)]
    for c in cks:
        save_artifact(
            artifact_path(c, "full_fisher"),
            {"bert.pooler.dense.bias": torch.ones(HIDDEN)},
            {"kind": "full_fisher", "task": "rte", "fingerprint": weights_fingerprint(c)},
        )
    with pytest.raises(ValueError, match="has no Fisher for 'bert.embeddings"):
        dict(Fisher().merge(model_ctx(cks)))


def test_average_and_registry(make_checkpoint) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"m{s}") for s in range(3)]
    ctx = model_ctx(cks)
    merged = dict(Average().merge(ctx))
    for k, v in plain_average(ctx).items():
        torch.testing.assert_close(merged[k], v)
    weighted = dict(Average(coefficients=[2, 1, 1]).merge(ctx))
    k = ctx.keys[3]
    torch.testing.assert_close(
        weighted[k], (2 * ctx.readers[0].get(k) + ctx.readers[1].get(k) + ctx.readers[2].get(k)) / 4
    )
    for name in ("average", "fmn", "fisher", "task_arithmetic", "ties"):
        assert name in METHODS and method_class(name).__doc__


# ---------------------------------------------------------------------------------------------- task vectors


def vector_ctx(
    tmp_path: Path, base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], evaluate: Callable | None = None
) -> MergeContext:
    """Hand-made 'checkpoints' (plain safetensors folders) = base + tau_i."""
    dirs = []
    for name, state in [("base", base), *((f"t{i}", {k: base[k] + t[k] for k in base}) for i, t in enumerate(taus))]:
        d = tmp_path / name
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
        dirs.append(d)
    return MergeContext(
        checkpoints=dirs[1:],
        tasks=["rte", "mrpc", "cola"][: len(taus)],
        config=None,
        body_prefix="",
        keys=list(base),
        readers=[CheckpointReader(d) for d in dirs[1:]],
        base_reader=CheckpointReader(dirs[0]),
        evaluate=evaluate,
        log=lambda s: None,
    )


BASE = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]), "m": torch.full((2, 3), 5.0)}
TAUS = [
    {"w": torch.tensor([4.0, -0.1, 0.2, -3.0, 1.0]), "m": torch.tensor([[0.3, -2.0, 0.0], [0.1, 0.0, 0.05]])},
    {"w": torch.tensor([2.0, 0.3, -0.1, 5.0, -1.0]), "m": torch.tensor([[-0.2, -1.0, 0.4], [0.0, 6.0, 0.1]])},
]


def test_task_arithmetic_by_hand(tmp_path: Path) -> None:
    merged = dict(TaskArithmetic(scaling=0.4).merge(vector_ctx(tmp_path, BASE, TAUS)))
    for k in BASE:
        torch.testing.assert_close(merged[k], BASE[k] + 0.4 * (TAUS[0][k] + TAUS[1][k]))
    # the one-tensor protocol gives the same
    ctx = vector_ctx(tmp_path / "b", BASE, TAUS)
    m = TaskArithmetic(scaling=0.4)
    m.setup(ctx)
    torch.testing.assert_close(m.merge_tensor("w", ctx.models("w"), ctx), merged["w"])


def test_task_arithmetic_chooses_scaling_on_selection_scores(tmp_path: Path) -> None:
    target = {k: BASE[k] + 0.3 * (TAUS[0][k] + TAUS[1][k]) for k in BASE}
    calls = []

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:
        calls.append(1)
        d = -sum(float((body[k] - target[k]).abs().sum()) for k in body)
        return {"rte": d, "mrpc": d}

    ctx = vector_ctx(tmp_path, BASE, TAUS, evaluate)
    merged = dict(TaskArithmetic(scaling=None, scalings=[0.1, 0.3, 0.7]).merge(ctx))
    assert ctx.notes["task_arithmetic_scaling"]["chosen"] == 0.3 and len(calls) == 3
    for k in BASE:
        torch.testing.assert_close(merged[k], target[k])
    with pytest.raises(ValueError, match="needs evaluation"):
        dict(TaskArithmetic(scaling=None).merge(vector_ctx(tmp_path / "n", BASE, TAUS)))


@pytest.mark.parametrize(
    "grid, dare_p, evaluations", [([0.2, 0.5, 1.0], 0.0, 3), ([0.2, 1.0], 0.0, 3), ([0.2, 0.5, 1.0], 0.3, 4)]
)
def test_task_arithmetic_worst_gain_by_brute_force(
    tmp_path: Path, grid: list[float], dare_p: float, evaluations: int
) -> None:
    """worst_gain: the lambda whose smallest per-task gain over the plain average is largest, checked against a
    search over bodies built by hand. With two models lambda = 0.5 is the average itself, scored once as the
    reference; without it in the grid, or with DARE, the average is scored on its own (one more evaluation)."""
    calls: list[dict[str, torch.Tensor]] = []

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:  # rte wants lambda 1.0 of tau_0, mrpc 0.35
        calls.append(body)
        x = float((body["w"] - BASE["w"])[0]) / float((TAUS[0]["w"] + TAUS[1]["w"])[0])
        return {"rte": -abs(x - 1.0), "mrpc": -abs(x - 0.35)}  # by the mean, 1.0 beats 0.2

    ctx = vector_ctx(tmp_path, BASE, TAUS, evaluate)
    lam = TaskArithmetic(scaling=None, scalings=grid, dare_p=dare_p, objective="worst_gain")
    dict(lam.merge(ctx))
    assert len(calls) == evaluations
    avg = {k: (2 * BASE[k] + TAUS[0][k] + TAUS[1][k]) / 2 for k in BASE}
    reference = evaluate(avg)
    if dare_p == 0:

        def rank(x: float) -> tuple[float, float]:
            sc = evaluate({k: BASE[k] + x * (TAUS[0][k] + TAUS[1][k]) for k in BASE})
            return min(sc[t] - reference[t] for t in sc), sum(sc.values())

        assert ctx.notes["task_arithmetic_scaling"]["chosen"] == max(grid, key=rank)
    assert ctx.notes["task_arithmetic_scaling"]["average_scores"] == pytest.approx(reference)


def test_dare_option_drops_and_rescales_each_task_vector(tmp_path: Path) -> None:
    big = {"w": torch.zeros(2000)}
    taus = [{"w": torch.randn(2000)} for _ in range(2)]
    merged = dict(TaskArithmetic(scaling=1.0, dare_p=0.5, dare_seed=3).merge(vector_ctx(tmp_path, big, taus)))
    expected = sum(dare(t["w"], 0.5, dare_generator(3, i, "w")) for i, t in enumerate(taus))
    torch.testing.assert_close(merged["w"], expected)
    assert 0.2 < float((merged["w"] == 0).float().mean()) < 0.3  # both dropped: p^2 = 1/4


def slow_ties(
    base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], top_k: float, lam: float
) -> dict[str, torch.Tensor]:
    """The reference TIES on flattened vectors: kthvalue trim, sign by sum with majority for zeros, disjoint mean."""
    keys = list(base)
    flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus]).double()
    d = flat.shape[1]
    k = d - int(d * top_k / 100)
    # (the reference's kthvalue(0) fails at 100%; keeping everything is what 100% means)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values if k > 0 else torch.zeros(len(flat), 1, dtype=flat.dtype)
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    merged = sel.sum(0) / (sel != 0).sum(0).clamp_min(1)
    out, pos = {}, 0
    for key in keys:
        n = base[key].numel()
        out[key] = (base[key].double() + lam * merged[pos : pos + n].reshape(base[key].shape)).float()
        pos += n
    return out


def test_ties_by_hand(tmp_path: Path) -> None:
    """Two 11-entry task vectors, top 40%: as the reference, keep |tau| >= the 7th smallest magnitude
    (k = 11 - int(11 * 0.4) = 7), i.e. the 5 largest."""
    merged = dict(Ties(top_k=40.0, scaling=1.0).merge(vector_ctx(tmp_path, BASE, TAUS)))
    # tau0 |.|: w [4, .1, .2, 3, 1], m [.3, 2, 0, .1, 0, .05]; 7th smallest .3 -> keep w0, w3, w4, m00, m01
    # tau1 |.|: w [2, .3, .1, 5, 1], m [.2, 1, .4, 0, 6, .1];  7th smallest 1  -> keep w0, w3, w4, m01, m11
    # trimmed t0: w [4, 0, 0, -3, 1]  m [[.3, -2, 0], [0, 0, 0]]
    # trimmed t1: w [2, 0, 0, 5, -1]  m [[0, -1, 0], [0, 6, 0]]
    # sum: w [6, 0, 0, 2, 0], m [[.3, -3, 0], [0, 6, 0]]; signs + + - + + -> majority +, given to the zero sums
    # disjoint mean: w0 (4+2)/2, w3 5 (t0's -3 disagrees), w4 1 (t1's -1 disagrees); m01 (-2-1)/2, m11 6
    expected_w = torch.tensor([3.0, 0.0, 0.0, 5.0, 1.0])
    expected_m = torch.tensor([[0.3, -1.5, 0.0], [0.0, 6.0, 0.0]])
    torch.testing.assert_close(merged["w"], BASE["w"] + expected_w)
    torch.testing.assert_close(merged["m"], BASE["m"] + expected_m)
    ref = slow_ties(BASE, TAUS, 40.0, 1.0)
    for k in BASE:
        torch.testing.assert_close(merged[k], ref[k])


@pytest.mark.parametrize("top_k", [10.0, 20.0, 100.0])
def test_ties_against_reference_on_random_vectors(tmp_path: Path, top_k: float) -> None:
    g = torch.Generator().manual_seed(int(top_k))
    base = {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.randn(13, generator=g),
        "c": torch.randn(3, 4, 2, generator=g),
    }
    taus = [{k: torch.randn(v.shape, generator=g) * (i + 1) for k, v in base.items()} for i in range(3)]
    ctx = vector_ctx(tmp_path, base, taus)
    merged = dict(Ties(top_k=top_k, scaling=0.7).merge(ctx))
    stored = [{k: (base[k] + t[k]) - base[k] for k in base} for t in taus]  # float32 rounding as read back
    ref = slow_ties(base, stored, top_k, 0.7)
    for k in base:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-5, atol=1e-5)
    vec = ties_task_vector(vector_ctx(tmp_path / "v", base, taus), top_k)  # the helper TALL/Consensus use
    for k in base:
        torch.testing.assert_close(base[k] + 0.7 * vec[k], ref[k], rtol=1e-5, atol=1e-5)


def test_ties_options() -> None:
    with pytest.raises(ValueError, match="top_k"):
        Ties(top_k=0)
    with pytest.raises(ValueError, match="dare_p"):
        Ties(dare_p=1.0)
