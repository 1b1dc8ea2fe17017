"""AdaMerging: entropy goes down, coefficients stay in [0, 1], layer-wise has one per task per tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from fmn_pl.merging.adamerging import AdaMergingModule, entropy, train_coefficients
from tests.conftest import tiny_model


def _problem(n_tasks: int = 2, noise: float = 0.3):
    """A tiny base BERT, task models = base + noise with their own random heads, random token batches."""
    base_model = tiny_model("bert", seed=0)
    body_keys = [k for k, v in base_model.state_dict().items() if k.startswith("bert.") and v.is_floating_point()]
    base = {k: base_model.state_dict()[k].clone() for k in body_keys}
    models, taus = [], []
    for t in range(n_tasks):
        torch.manual_seed(10 + t)
        m = copy.deepcopy(base_model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.add_(noise * torch.randn_like(p)) if name in base else p.normal_(0, 1.0)
        taus.append({k: m.state_dict()[k] - base[k] for k in body_keys})
        models.append(m.eval())
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(5, 150, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long)}
        for _ in range(32)
    ]
    return base, taus, models, rows


def _reference_entropy(model: torch.nn.Module, base: dict, taus: list[dict], coef: torch.Tensor, rows: list) -> float:
    """Entropy of an explicitly merged copy of `model` (independent of the functional forward)."""
    m = copy.deepcopy(model)
    keys = list(base)
    state = {
        k: base[k] + sum((coef[t] if coef.dim() == 1 else coef[t, j]) * taus[t][k] for t in range(len(taus)))
        for j, k in enumerate(keys)
    }
    m.load_state_dict(state, strict=False)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        return entropy(m(**batch).logits).item()


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_goes_down_and_coefficients_stay_in_unit_interval(granularity: str, tmp_path: Path) -> None:
    base, taus, models, rows = _problem()
    refs = [copy.deepcopy(m) for m in models]  # the module takes over the models' body storage
    module = AdaMergingModule(base, taus, models, ["rte", "mrpc"], granularity=granularity, init=0.3, lr=0.1)
    assert module.coefficients.shape == ((2,) if granularity == "task" else (2, len(base)))
    assert [n for n, _ in module.named_parameters()] == ["coefficients"]
    before = [_reference_entropy(refs[t], base, taus, module.effective().detach(), rows) for t in range(2)]
    loaders = {t: DataLoader(rows, batch_size=16, shuffle=True) for t in ("rte", "mrpc")}
    train_coefficients(module, loaders, steps=20, root=tmp_path, accelerator="cpu", progress=False)
    coef = module.effective().detach()
    after = [_reference_entropy(refs[t], base, taus, coef, rows) for t in range(2)]
    assert sum(after) < sum(before) - 1e-3, (before, after)
    assert (coef >= 0).all() and (coef <= 1).all()
    assert not torch.equal(coef, torch.full_like(coef, 0.3))
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts and set(torch.load(ckpts[0], weights_only=False)["state_dict"]) == {"coefficients"}
    assert (tmp_path / "logs").rglob("metrics.csv")


def test_functional_forward_matches_explicit_merge() -> None:
    base, taus, models, rows = _problem()
    refs = [copy.deepcopy(m) for m in models]
    module = AdaMergingModule(base, taus, models, ["rte", "mrpc"], granularity="layer", init=0.3)
    with torch.no_grad():
        module.coefficients.uniform_(0, 1)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        got = module.task_entropy(1, batch, module.merged_body()).item()
    assert got == pytest.approx(_reference_entropy(refs[1], base, taus, module.effective(), rows), rel=1e-5)


def test_non_adapted_task_keeps_its_init_coefficient(tmp_path: Path) -> None:
    base, taus, models, rows = _problem()
    module = AdaMergingModule(base, taus, models, ["rte", "stsb"], adapt=[True, False], init=0.3, lr=0.1)
    train_coefficients(
        module, {"rte": DataLoader(rows, batch_size=16)}, steps=5, root=tmp_path, accelerator="cpu", progress=False
    )
    coef = module.effective().detach()
    assert coef[1].item() == pytest.approx(0.3) and coef[0].item() != pytest.approx(0.3)
