"""DARE: p=0 is the identity, the rescaled vector is unbiased, and the pattern is seeded per (model, tensor)."""

from __future__ import annotations

import pytest
import torch

from fmn_pl.merging.dare import dare, dare_generator, dare_task_vectors


def test_p_zero_is_identity() -> None:
    tau = torch.randn(7, 5)
    assert torch.equal(dare(tau, 0.0, dare_generator(0, 0, "w")), tau)
    assert dare_task_vectors([tau, 2 * tau], "w", 0.0, 3)[1].equal(2 * tau)


def test_kept_entries_are_rescaled_and_dropped_entries_zero() -> None:
    tau = torch.randn(1000) + 3.0  # no exact zeros
    out = dare(tau, 0.25, dare_generator(1, 0, "w"))
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.75)
    assert 0.65 < kept.float().mean().item() < 0.85


def test_expectation_over_seeds_equals_original() -> None:
    tau = torch.randn(50)
    p, n = 0.6, 4000
    mean = torch.stack([dare(tau, p, dare_generator(s, 0, "w")) for s in range(n)]).mean(0)
    # per-entry std of the mean: |tau| * sqrt(p / (1-p)) / sqrt(n); allow 5 sigma
    tol = 5 * tau.abs() * (p / (1 - p)) ** 0.5 / n**0.5
    assert ((mean - tau).abs() <= tol + 1e-6).all()


def test_seeded_per_model_and_key_independent_of_order() -> None:
    taus = [torch.randn(200) for _ in range(3)]
    a = dare_task_vectors(taus, "layer.0.w", 0.5, seed=7)
    b = [dare(taus[i], 0.5, dare_generator(7, i, "layer.0.w")) for i in reversed(range(3))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_key = dare_task_vectors(taus, "layer.1.w", 0.5, seed=7)
    other_seed = dare_task_vectors(taus, "layer.0.w", 0.5, seed=8)
    assert not torch.equal(a[0], other_key[0]) and not torch.equal(a[0], other_seed[0])
    assert not torch.equal(a[0] != 0, a[1] != 0)  # each model has its own drop pattern


def test_bad_rate_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dare(torch.ones(3), 1.0)


def test_methods_with_p_zero_equal_the_underlying_method(tmp_path) -> None:
    from fmn_pl.merging.task_arithmetic import TaskArithmetic
    from fmn_pl.merging.ties import Ties
    from tests.test_merging import BASE, TAUS, vector_ctx

    for name, make in (
        ("ta", lambda **kw: TaskArithmetic(scaling=0.4, **kw)),
        ("ties", lambda **kw: Ties(top_k=60.0, scaling=0.8, **kw)),
    ):
        plain = dict(make().merge(vector_ctx(tmp_path / f"{name}-plain", BASE, TAUS)))
        zero = dict(make(dare_p=0.0, dare_seed=9).merge(vector_ctx(tmp_path / f"{name}-zero", BASE, TAUS)))
        dropped = dict(make(dare_p=0.5, dare_seed=9).merge(vector_ctx(tmp_path / f"{name}-half", BASE, TAUS)))
        for k in BASE:
            assert torch.equal(zero[k], plain[k])
        assert any(not torch.equal(dropped[k], plain[k]) for k in BASE)


def test_task_arithmetic_with_dare_is_unbiased_over_seeds(tmp_path) -> None:
    """Task arithmetic is linear in the task vectors, so its DARE merge averages to the plain merge."""
    from fmn_pl.merging.task_arithmetic import TaskArithmetic
    from tests.test_merging import vector_ctx

    base = {"w": torch.zeros(64)}
    taus = [{"w": torch.randn(64)} for _ in range(2)]
    p, n = 0.5, 300
    ctx = vector_ctx(tmp_path, base, taus)
    mean = sum(dict(TaskArithmetic(scaling=1.0, dare_p=p, dare_seed=s).merge(ctx))["w"] for s in range(n)) / n
    plain = taus[0]["w"] + taus[1]["w"]
    tol = 5 * (taus[0]["w"].abs() + taus[1]["w"].abs()) * (p / (1 - p)) ** 0.5 / n**0.5
    assert ((mean - plain).abs() <= tol + 1e-6).all()
