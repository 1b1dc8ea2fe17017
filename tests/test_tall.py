"""TALL masks and Consensus merging on hand-made task vectors against hand-computed results."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from fmn_pl.merging.base import CheckpointReader, MergeContext
from fmn_pl.merging.consensus import Consensus
from fmn_pl.merging.tall import (
    Tall,
    compression,
    consensus_mask,
    pack_mask,
    tall_mask,
    unpack_mask,
)

# Three tasks, one 4-entry tensor plus a 2x3 one; base is non-zero so "base +" is checked too.
TAUS = [
    {"w": torch.tensor([1.0, 0.0, -2.0, 0.5]), "m": torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])},
    {"w": torch.tensor([1.0, 3.0, 2.0, 0.0]), "m": torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 1.0]])},
    {"w": torch.tensor([-1.0, 1.0, 0.5, 0.1]), "m": torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 1.0]])},
]
BASE = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0]), "m": torch.full((2, 3), 5.0)}
TASKS = ["rte", "mrpc", "cola"]


def make_ctx(tmp_path: Path, evaluate: Callable | None = None) -> MergeContext:
    dirs = []
    for name, state in [("base", BASE), *((f"t{i}", {k: BASE[k] + t[k] for k in BASE}) for i, t in enumerate(TAUS))]:
        d = tmp_path / name
        d.mkdir(parents=True)
        save_file(state, str(d / "model.safetensors"))
        dirs.append(d)
    return MergeContext(
        checkpoints=dirs[1:],
        tasks=TASKS,
        config=None,
        body_prefix="",
        keys=["w", "m"],
        readers=[CheckpointReader(d) for d in dirs[1:]],
        base_reader=CheckpointReader(dirs[0]),
        evaluate=evaluate,
        log=lambda s: None,
    )


def test_tall_mask_by_hand() -> None:
    mtl = sum(t["w"] for t in TAUS)  # [1, 4, 0.5, 0.6]
    # |tau_t| >= 0.5 |tau_MTL - tau_t|, entry by entry:
    # t0: [1>=0, 0>=2, 2>=1.25, .5>=.05]   t1: [1>=0, 3>=.5, 2>=.75, 0>=.3]   t2: [1>=1, 1>=1.5, .5>=0, .1>=.25]
    expected = [[True, False, True, True], [True, True, True, False], [True, False, True, False]]
    for t, exp in zip(TAUS, expected):
        assert tall_mask(t["w"], mtl, 0.5).tolist() == exp
    assert tall_mask(TAUS[0]["w"], mtl, 0.0).all()  # lambda 0 keeps everything


def test_consensus_mask_and_packing() -> None:
    count = torch.tensor([3, 1, 3, 1, 0, 2])
    assert consensus_mask(count, 2).tolist() == [True, False, True, False, False, True]
    assert consensus_mask(count, 0).all()
    mask = torch.rand(3, 7, 5) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, (3, 7, 5)), mask)


def test_compression_numbers() -> None:
    c = compression(numel=1000, itemsize=4, num_tasks=8)
    assert (c["base_bytes"], c["merged_vector_bytes"], c["mask_bytes"]) == (4000, 4000, 8 * 125)
    assert c["total_bytes"] == 9000 and c["checkpoints_bytes"] == 32000
    assert c["ratio"] == pytest.approx(32000 / 9000)


def test_consensus_by_hand(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    merged = dict(Consensus(k=2, scaling=1.0, lambdas=[0.5]).merge(ctx))
    # w: masks above keep counts [3, 1, 3, 1] -> k=2 keeps entries 0 and 2 of tau_MTL = [1, 4, 0.5, 0.6]
    torch.testing.assert_close(merged["w"], BASE["w"] + torch.tensor([1.0, 0.0, 0.5, 0.0]))
    # m: tau_MTL = [[2, 0, 3], [0, 0, 2]]; at lambda .5 the masks are (0 >= 0 keeps an entry)
    # t0 [[1,1,0],[1,1,0]]  t1 [[1,1,0],[1,1,1]]  t2 [[0,1,1],[1,1,1]]  -> counts [[2,3,1],[3,3,2]]
    torch.testing.assert_close(merged["m"], BASE["m"] + torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    assert ctx.notes["consensus_lambdas"] == {t: 0.5 for t in TASKS}
    # k=3 keeps only entries all three masks agree on
    merged3 = dict(Consensus(k=3, scaling=0.5, lambdas=[0.5]).merge(make_ctx(tmp_path / "k3")))
    torch.testing.assert_close(merged3["w"], BASE["w"] + 0.5 * torch.tensor([1.0, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(merged3["m"], BASE["m"])  # counts 3 only where tau_MTL is 0


def test_consensus_k0_is_task_arithmetic(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    merged = dict(Consensus(k=0, scaling=0.3).merge(ctx))
    for key in ("w", "m"):
        torch.testing.assert_close(merged[key], BASE[key] + 0.3 * sum(t[key] for t in TAUS))


def test_lambda_and_alpha_chosen_on_selection_scores(tmp_path: Path) -> None:
    """A fake evaluator whose best lambda differs per task: the choice must follow each task's own score."""
    mtl = {k: sum(t[k] for t in TAUS) for k in BASE}
    best = {"rte": 1.0, "mrpc": 1.5, "cola": 0.2}  # each gives a mask no other grid value gives
    targets = {
        task: {k: BASE[k] + tall_mask(TAUS[i][k], mtl[k], best[task]) * mtl[k] for k in BASE}
        for i, task in enumerate(TASKS)
    }
    calls = []

    def evaluate(body: dict[str, torch.Tensor], tasks: list[str] | None = None) -> dict[str, float]:
        calls.append(tasks)
        return {t: -sum(float((body[k] - targets[t][k]).abs().sum()) for k in body) for t in tasks or TASKS}

    ctx = make_ctx(tmp_path, evaluate)
    dict(Consensus(k=2, scaling=None, scalings=[0.5, 1.0], lambdas=[0.2, 1.0, 1.5]).merge(ctx))
    assert ctx.notes["consensus_lambdas"] == best
    # each lambda candidate is scored on its own task only; the scaling on every task
    assert calls == [[t] for t in TASKS for _ in range(3)] + [None, None]
    assert ctx.notes["consensus_scaling"]["chosen"] in (0.5, 1.0)
    assert set(ctx.notes["consensus_scaling"]["mean_scores"]) == {0.5, 1.0}


def test_grid_without_evaluator_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="selection data"):
        dict(Consensus(k=2, scaling=1.0).merge(make_ctx(tmp_path)))


def test_tall_task_bodies_by_hand(tmp_path: Path) -> None:
    """Output body theta0 + tau_MTL; task t's own body theta0 + m_t * tau_MTL with the masks computed above."""
    ctx = make_ctx(tmp_path)
    ctx.workdir = tmp_path / "work"
    method = Tall(lambdas=[0.5])
    merged = dict(method.merge(ctx))
    mtl_w = torch.tensor([1.0, 4.0, 0.5, 0.6])
    torch.testing.assert_close(merged["w"], BASE["w"] + mtl_w)
    masks_w = [[1, 0, 1, 1], [1, 1, 1, 0], [1, 0, 1, 0]]  # test_tall_mask_by_hand
    masks_m = [[[1, 1, 0], [1, 1, 0]], [[1, 1, 0], [1, 1, 1]], [[0, 1, 1], [1, 1, 1]]]  # test_consensus_by_hand
    mtl_m = torch.tensor([[2.0, 0.0, 3.0], [0.0, 0.0, 2.0]])
    for i in range(3):
        body = dict(method.task_body(i, ctx))
        torch.testing.assert_close(body["w"], BASE["w"] + torch.tensor(masks_w[i], dtype=torch.float32) * mtl_w)
        torch.testing.assert_close(body["m"], BASE["m"] + torch.tensor(masks_m[i], dtype=torch.float32) * mtl_m)
    sizes = ctx.notes["tall_compression"]
    assert (sizes["base_bytes"], sizes["mask_bytes"], sizes["checkpoints_bytes"]) == (40, 3 * 2, 3 * 40)
    from safetensors import safe_open

    with safe_open(str(ctx.workdir / "masks.safetensors"), "pt") as f:
        assert torch.equal(unpack_mask(f.get_tensor("mrpc/w"), (4,)), torch.tensor(masks_w[1], dtype=torch.bool))
    assert "TALL storage" in ctx.remarks[0]


def test_tall_lambda_zero_is_task_arithmetic_for_every_task(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    method = Tall(lambdas=[0.0])
    dict(method.merge(ctx))
    for i in range(3):
        body = dict(method.task_body(i, ctx))
        for key in ("w", "m"):
            torch.testing.assert_close(body[key], BASE[key] + sum(t[key] for t in TAUS))


def test_consensus_k0_over_ties_is_ties(tmp_path: Path) -> None:
    from fmn_pl.merging.ties import Ties

    merged = dict(Consensus(over="ties", k=0, scaling=0.7, top_k=50.0).merge(make_ctx(tmp_path / "c")))
    ties = dict(Ties(top_k=50.0, scaling=0.7).merge(make_ctx(tmp_path / "t")))
    for key in ("w", "m"):
        torch.testing.assert_close(merged[key], ties[key])


def test_consensus_k_above_task_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the 3 tasks"):
        dict(Consensus(k=4, scaling=1.0, lambdas=[0.5]).merge(make_ctx(tmp_path)))
