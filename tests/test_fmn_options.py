"""FMN's scaling and power options (issue 8) against slow computations: theta0 + s (FMN - theta0), and FMN on
Fisher values raised to the power p entry by entry (p = 0: the plain average)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from fmn_pl.merging.fmn import FMN
from tests.test_merging import model_ctx, plain_average, random_fisher, ref_fmn, slow_fmn


def _ctx(make_checkpoint: Callable, tiny_base: Callable, evaluate: Callable | None = None):
    ckpts = [make_checkpoint("rte", seed=s, name=f"m{s}") for s in (0, 1)]
    return model_ctx(ckpts, [random_fisher(0), random_fisher(1, scale=30.0)], base=tiny_base("bert"), evaluate=evaluate)


def test_scaling_one_is_the_reference_rule_and_needs_no_base() -> None:
    assert (
        "base" not in ref_fmn().needs and "base" in ref_fmn(scaling=1.5).needs and "base" in ref_fmn(scaling=None).needs
    )
    assert "needs" not in ref_fmn(scaling=2.0).options()


def test_defaults_are_the_study_selection() -> None:
    """The code defaults (docs/study): per_node; the normalization from {none, mean}, p from {0.25, 0.5, 0} and s
    chosen on data together by the mean score."""
    options = FMN().options()
    assert (options["broadcast"], options["normalize"], options["power"], options["scaling"]) == (
        "per_node",
        None,
        None,
        None,
    )
    assert options["normalizes"] == ["none", "mean"] and options["powers"] == [0.25, 0.5, 0.0]
    assert options["scalings"] == [1.0, 1.5, 2.0, 2.5]
    assert options["objective"] == "mean" and "base" in FMN().needs


def test_fixed_scaling_scales_the_merged_task_vector(make_checkpoint: Callable, tiny_base: Callable) -> None:
    plain = dict(ref_fmn(normalize="mean").merge(_ctx(make_checkpoint, tiny_base)))
    ctx = _ctx(make_checkpoint, tiny_base)
    scaled = dict(ref_fmn(normalize="mean", scaling=1.7).merge(ctx))
    for key, value in plain.items():
        base = ctx.base(key)
        torch.testing.assert_close(scaled[key], base + 1.7 * (value - base), rtol=1e-5, atol=1e-6)


def test_null_scaling_is_chosen_on_selection_scores(make_checkpoint: Callable, tiny_base: Callable) -> None:
    plain = dict(ref_fmn().merge(_ctx(make_checkpoint, tiny_base)))
    ref_ctx = _ctx(make_checkpoint, tiny_base)
    target = {k: ref_ctx.base(k) + 2.0 * (v - ref_ctx.base(k)) for k, v in plain.items()}

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:
        d = -sum(float((body[k] - target[k]).abs().sum()) for k in body)
        return {"rte": d}

    ctx = _ctx(make_checkpoint, tiny_base, evaluate)
    merged = dict(ref_fmn(scaling=None, scalings=[1.0, 2.0, 3.0]).merge(ctx))
    assert ctx.notes["fmn_scaling"]["chosen"] == 2.0
    for key in target:
        torch.testing.assert_close(merged[key], target[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(scaling=0.0), dict(scaling=None, scalings=[]), dict(scalings=[1.0, -1.0])])
def test_bad_scaling(bad: dict) -> None:
    with pytest.raises(ValueError, match="scaling"):
        ref_fmn(**bad)


@pytest.mark.parametrize("broadcast", ["reference", "per_node"])
def test_power_is_fmn_on_powered_fishers(make_checkpoint: Callable, broadcast: str) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"p{s}") for s in (0, 1)]
    fishers = [random_fisher(0), random_fisher(1, scale=30.0)]
    fishers[0]["head"][1, 0] = 0.0  # 0 ** 0.5 = 0: still no weight there
    ctx = model_ctx(cks, fishers)
    merged = dict(ref_fmn(broadcast=broadcast, power=0.5).merge(ctx))
    powered = [{k: v.double().sqrt() for k, v in f.items()} for f in fishers]
    expected = slow_fmn(ctx, powered, broadcast)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_power_zero_is_the_plain_average(make_checkpoint: Callable) -> None:
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"z{s}") for s in (0, 1, 2)]
    fishers = [random_fisher(0), random_fisher(1, scale=30.0), random_fisher(2)]
    fishers[2] = {k: torch.zeros_like(v) for k, v in fishers[0].items()}  # even a zero Fisher weighs 0 ** 0 = 1
    ctx = model_ctx(cks, fishers)
    merged = dict(ref_fmn(broadcast="per_node", power=0.0).merge(ctx))
    for key, avg in plain_average(ctx).items():
        torch.testing.assert_close(merged[key], avg, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("objective", ["mean", "worst_gain"])
def test_objective_chooses_s_as_a_brute_force_search(
    make_checkpoint: Callable, tiny_base: Callable, objective: str
) -> None:
    """worst_gain: the s whose smallest per-task gain over the plain average is largest (then the mean); the two
    objectives pick different values here, and each matches a search written out over independent bodies."""
    grid = [1.0, 1.5, 2.0, 2.5, 3.0]
    plain = dict(ref_fmn().merge(_ctx(make_checkpoint, tiny_base)))
    ref_ctx = _ctx(make_checkpoint, tiny_base)
    base = {k: ref_ctx.base(k) for k in plain}
    average = plain_average(ref_ctx)
    key = next(iter(plain))
    direction = plain[key] - base[key]
    unit = float((direction * direction).sum())

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:
        x = float(((body[key] - base[key]) * direction).sum()) / unit  # s for the candidates
        return {"a": 10.0 - (x - 3.0) ** 2, "b": -abs(x - 1.4)}  # a wants s = 3, b wants s near 1.4

    candidates = {s: evaluate({key: base[key] + s * direction}) for s in grid}
    avg = evaluate(average)
    by_mean = max(grid, key=lambda s: sum(candidates[s].values()))
    by_worst = max(grid, key=lambda s: (min(candidates[s][t] - avg[t] for t in avg), sum(candidates[s].values())))
    assert by_mean != by_worst  # the test tells the objectives apart
    want = by_mean if objective == "mean" else by_worst
    ctx = _ctx(make_checkpoint, tiny_base, evaluate)
    merged = dict(ref_fmn(scaling=None, scalings=grid, objective=objective).merge(ctx))
    notes = ctx.notes["fmn_scaling"]
    assert notes["chosen"] == want and notes["objective"] == objective
    assert ("average_scores" in notes) == (objective == "worst_gain")
    if objective == "worst_gain":
        assert notes["average_scores"] == pytest.approx(avg)
    torch.testing.assert_close(merged[key], base[key] + want * direction, rtol=1e-5, atol=1e-6)


def test_bad_objective() -> None:
    with pytest.raises(ValueError, match="objective"):
        ref_fmn(objective="median")  # type: ignore[arg-type]


def test_null_power_is_chosen_with_s_as_a_brute_force_search(make_checkpoint: Callable, tiny_base: Callable) -> None:
    """power null: every (p, s) of powers x scalings scored, the best by the objective kept; the candidate bodies
    here are built independently from FMN at each fixed power (p = 0: task arithmetic with lambda = s / M)."""
    powers, grid = [1.0, 0.25, 0.0], [1.0, 2.0]
    ref_ctx = _ctx(make_checkpoint, tiny_base)
    base = {k: ref_ctx.base(k) for k in ref_ctx.keys}
    bodies = {}
    for p in powers:
        plain = dict(ref_fmn(power=p).merge(_ctx(make_checkpoint, tiny_base)))
        for s in grid:
            bodies[(p, s)] = {k: base[k] + s * (plain[k] - base[k]) for k in plain}
    tau = {k: ref_ctx.readers[1].get(k) - base[k] for k in base}  # the second task vector

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:  # rewards the second model's direction
        along = sum(float(((body[k] - base[k]) * tau[k]).sum()) for k in tau)
        size = sum(float(((body[k] - base[k]) ** 2).sum()) for k in tau)
        return {"a": along - 0.3 * size, "b": -0.01 * size}

    for objective in ("mean", "worst_gain"):
        avg = evaluate(plain_average(ref_ctx))

        def rank(c: tuple[float, float]) -> tuple[float, float]:
            sc = evaluate(bodies[c])
            return (min(sc[t] - avg[t] for t in sc) if objective == "worst_gain" else 0.0, sum(sc.values()))

        want = max(bodies, key=rank)
        assert want != (powers[0], grid[0])  # not merely the first candidate
        ctx = _ctx(make_checkpoint, tiny_base, evaluate)
        merged = dict(ref_fmn(power=None, powers=powers, scaling=None, scalings=grid, objective=objective).merge(ctx))
        assert (ctx.notes["fmn_power"]["chosen"], ctx.notes["fmn_scaling"]["chosen"]) == want, objective
        assert bool(ctx.remarks) == (want[0] == 0.0)  # a chosen power 0 is named in the report
        assert set(ctx.notes["fmn_scaling"]["scores"]) == {f"p={p} s={s}" for p in powers for s in grid}
        for key in base:
            torch.testing.assert_close(merged[key], bodies[want][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("bad", [dict(power=-1.0), dict(power=None, powers=[]), dict(powers=[0.5, -0.5])])
def test_bad_power_grid(bad: dict) -> None:
    with pytest.raises(ValueError, match="power"):
        ref_fmn(**bad)


def test_null_power_with_fixed_scaling_one_needs_no_base(make_checkpoint: Callable) -> None:
    """power null, scaling 1: p alone is chosen, among the FMN bodies themselves (no task vectors, no base)."""
    cks = [make_checkpoint("rte", seed=s, noise=0.05, name=f"q{s}") for s in (0, 1)]
    fishers = [random_fisher(0), random_fisher(1, scale=30.0)]
    method = ref_fmn(power=None, powers=[1.0, 0.0], scaling=1.0)
    assert "base" not in method.needs
    target = plain_average(model_ctx(cks, fishers))  # p = 0 is the plain average: the body this evaluation wants

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"rte": -sum(float((body[k] - target[k]).abs().sum()) for k in target)}

    ctx = model_ctx(cks, fishers, evaluate=evaluate)
    merged = dict(method.merge(ctx))
    assert ctx.notes["fmn_power"]["chosen"] == 0.0 and ctx.notes["fmn_scaling"]["chosen"] == 1.0
    assert ctx.remarks == [
        "fmn: the selection split chose power 0, the unweighted merge: the plain average itself "
        "(no candidate scored better)"
    ]
    for key in target:
        torch.testing.assert_close(merged[key], target[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("coefficients", [None, [2.0, 2.0], [1.0, 3.0]])
def test_worst_gain_reference_is_the_average_candidate_when_there_is_one(
    make_checkpoint: Callable, tiny_base: Callable, coefficients: list[float] | None
) -> None:
    """With p = 0, s = 1 among the candidates and equal coefficients, that candidate is the plain average: its
    scores are worst_gain's reference and the average is not scored again (8 evaluations, not 9). With unequal
    coefficients p = 0 is a weighted mean, so the plain average is scored on its own."""
    average = plain_average(_ctx(make_checkpoint, tiny_base))
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:
        seen.append(body)
        return {"a": float(sum(v.double().sum() for v in body.values())), "b": float(len(seen))}

    ctx = _ctx(make_checkpoint, tiny_base, evaluate)
    dict(FMN(coefficients=coefficients, objective="worst_gain", normalize="none", powers=[0.25, 0.0]).merge(ctx))
    notes = ctx.notes["fmn_scaling"]
    assert len(notes["scores"]) == 8 and list(notes["scores"])[0] == "p=0.25 s=1.0"  # reported in grid order
    shared = coefficients != [1.0, 3.0]
    assert len(seen) == (8 if shared else 9)
    assert (notes["average_scores"] == notes["scores"]["p=0.0 s=1.0"]) == shared
    for key in average:  # the first body scored is the plain average, the reference
        torch.testing.assert_close(seen[0][key], average[key], rtol=1e-5, atol=1e-5, msg=key)
    p = ctx.notes["fmn_power"]["chosen"]
    assert ctx.notes["fmn"]["power"] == p  # the notes describe the chosen weights
    if p == 0.0:
        assert len(set(ctx.notes["fmn"]["universal_weights"])) == 1


def test_null_normalize_is_chosen_with_p_and_s_as_a_brute_force_search(
    make_checkpoint: Callable, tiny_base: Callable
) -> None:
    """normalize null: every (normalize, p, s) scored, p = 0 once (it ignores the Fisher), the best kept; the bodies
    here are built independently from FMN with every option fixed. The evaluation prefers the body nearest to
    normalize mean, p 1, s 2, which differs from normalize none's because the second Fisher is 30x larger."""
    normalizes, powers, grid = ["none", "mean"], [1.0, 0.0], [1.0, 2.0]
    ref_ctx = _ctx(make_checkpoint, tiny_base)
    base = {k: ref_ctx.base(k) for k in ref_ctx.keys}
    bodies = {}
    for n in normalizes:
        for p in powers:
            plain = dict(ref_fmn(normalize=n, power=p).merge(_ctx(make_checkpoint, tiny_base)))
            for s in grid:
                bodies[(n, p, s)] = {k: base[k] + s * (plain[k] - base[k]) for k in plain}
    target = bodies[("mean", 1.0, 2.0)]
    assert any(not torch.allclose(target[k], bodies[("none", 1.0, 2.0)][k]) for k in target)
    evaluations = []

    def evaluate(body: dict[str, torch.Tensor]) -> dict[str, float]:
        evaluations.append(1)
        return {"rte": -sum(float((body[k] - target[k]).abs().sum()) for k in target)}

    ctx = _ctx(make_checkpoint, tiny_base, evaluate)
    merged = dict(
        ref_fmn(normalize=None, normalizes=normalizes, power=None, powers=powers, scaling=None, scalings=grid).merge(
            ctx
        )
    )
    assert ctx.notes["fmn_normalize"] == {"chosen": "mean", "grid": normalizes}
    assert (ctx.notes["fmn_power"]["chosen"], ctx.notes["fmn_scaling"]["chosen"]) == (1.0, 2.0)
    assert ctx.notes["fmn"]["normalize"] == "mean" and ctx.notes["fmn"]["power"] == 1.0
    assert list(ctx.notes["fmn_scaling"]["scores"]) == [
        "normalize=none p=1.0 s=1.0",
        "normalize=none p=1.0 s=2.0",
        "p=0.0 s=1.0",
        "p=0.0 s=2.0",
        "normalize=mean p=1.0 s=1.0",
        "normalize=mean p=1.0 s=2.0",
    ]
    assert len(evaluations) == 6
    for key in target:
        torch.testing.assert_close(merged[key], target[key], rtol=1e-5, atol=1e-6, msg=key)
    # p = 0 under either normalization is the same body
    for key in target:
        torch.testing.assert_close(bodies[("none", 0.0, 2.0)][key], bodies[("mean", 0.0, 2.0)][key])


@pytest.mark.parametrize(
    "bad",
    [dict(normalize="odd"), dict(normalize=None, normalizes=["none", "odd"]), dict(normalize=None, normalizes=[])],
)
def test_bad_normalize_grid(bad: dict) -> None:
    with pytest.raises(ValueError, match="normalize"):
        ref_fmn(**bad)
