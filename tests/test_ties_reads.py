"""TIES reads each checkpoint twice and the base M + 1 times, and still equals a slow dense TIES.

The thresholds need every model's whole body (one pass per model, each with the base); then one pass per tensor
reads every model and the base once more. The slow reference stacks all task vectors of the whole body, as the
reference code does: kthvalue thresholds, the sign of the sum (the majority sign where the sum is 0), the
disjoint mean.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fmn_pl.merging.base import CheckpointReader, MergeContext
from fmn_pl.merging.dare import dare, dare_generator
from fmn_pl.merging.ties import Ties, ties_task_vector
from tests.conftest import tiny_model

M = 3


class CountingReader:
    """A reader that counts `get` per key (shape/dtype are header look-ups, not reads)."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader, self.reads = reader, Counter()

    def keys(self) -> list[str]:
        return self.reader.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.reader

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(key)

    def dtype(self, key: str) -> str:
        return self.reader.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        self.reads[key] += 1
        return self.reader.get(key)


def on_grid(x: torch.Tensor, step: float) -> torch.Tensor:
    """`x` rounded to multiples of `step` (a power of 2): sums of such values are exact in float32."""
    return torch.round(x / step) * step


def make_models(tmp_path: Path, sign: float) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list]:
    """A tiny BERT base and M checkpoints = base + tau_i, every value on a power-of-2 grid so task vectors read
    back exactly and trimmed sums cancel exactly where built to: models 0 and 1 carry +x and -x on a stretch of
    the embeddings (large enough to survive the trim) where model 2 is 0, so those sums are exactly 0 and the
    majority sign decides them; `sign` tilts every task vector, hence the majority, positive or negative."""
    state = tiny_model("bert", seed=0).state_dict()
    base = {
        k: on_grid(v.float(), 2.0**-10) for k, v in state.items() if k.startswith("bert.") and v.is_floating_point()
    }
    g = torch.Generator().manual_seed(7)
    taus = [
        {k: on_grid(torch.randn(v.shape, generator=g) + 0.3 * sign, 2.0**-6) for k, v in base.items()} for _ in range(M)
    ]
    word = "bert.embeddings.word_embeddings.weight"
    x = on_grid(torch.rand(50, generator=g) + 3.0, 2.0**-6)
    taus[0][word].view(-1)[:50] = x
    taus[1][word].view(-1)[:50] = -x
    taus[2][word].view(-1)[:50] = 0.0
    dirs = []
    for name, body in [("base", base), *((f"t{i}", {k: base[k] + t[k] for k in base}) for i, t in enumerate(taus))]:
        d = tmp_path / name
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in body.items()}, str(d / "model.safetensors"))
        dirs.append(d)
    return base, taus, dirs


def counting_ctx(dirs: list[Path], keys: list[str]) -> MergeContext:
    return MergeContext(
        checkpoints=dirs[1:],
        tasks=["rte", "mrpc", "cola"][:M],
        config=None,
        body_prefix="bert.",
        keys=keys,
        readers=[CountingReader(CheckpointReader(d)) for d in dirs[1:]],  # type: ignore[misc]
        base_reader=CountingReader(CheckpointReader(dirs[0])),  # type: ignore[arg-type]
        log=lambda s: None,
        progress=False,
    )


def dense_ties(
    base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], top_k: float
) -> tuple[dict[str, torch.Tensor], int]:
    """The merged task vector of a straightforward dense TIES over the stacked, flattened bodies (float64), and how
    many entries the majority sign decided (sum exactly 0, some trimmed entry not)."""
    keys = list(base)
    flat = torch.stack([torch.cat([t[k].reshape(-1) for k in keys]) for t in taus]).double()
    d = flat.shape[1]
    k = d - int(d * top_k / 100)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    total = trimmed.sum(0)
    sign = torch.sign(total)
    majority = torch.sign(sign.sum())
    decided = int(((total == 0) & (trimmed != 0).any(0)).sum())
    sign[sign == 0] = majority
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * keep).sum(0) / keep.sum(0).clamp_min(1)
    out, pos = {}, 0
    for key in keys:
        n = base[key].numel()
        out[key] = merged[pos : pos + n].reshape(base[key].shape).float()
        pos += n
    return out, decided


@pytest.mark.parametrize("sign, dare_p", [(1.0, 0.0), (-1.0, 0.0), (1.0, 0.3)])
def test_ties_reads_each_checkpoint_twice_and_equals_dense_ties(tmp_path: Path, sign: float, dare_p: float) -> None:
    base, taus, dirs = make_models(tmp_path, sign)
    keys = list(base)
    ctx = counting_ctx(dirs, keys)
    merged = dict(Ties(top_k=20.0, scaling=0.7, dare_p=dare_p, dare_seed=5).merge(ctx))

    for reader in ctx.readers:
        assert reader.reads == dict.fromkeys(keys, 2)  # type: ignore[attr-defined]
    assert ctx.base_reader.reads == dict.fromkeys(keys, M + 1)  # type: ignore[union-attr]

    if dare_p:
        taus = [{k: dare(t[k], dare_p, dare_generator(5, i, k)) for k in keys} for i, t in enumerate(taus)]
    vector, decided = dense_ties(base, taus, 20.0)
    assert decided >= 40  # the majority fallback is exercised (the 50 cancelling entries, less any DARE dropped)
    assert ctx.notes["ties"]["majority_sign"] == sign
    assert list(merged) == keys
    for k in keys:
        torch.testing.assert_close(merged[k], base[k] + 0.7 * vector[k], rtol=1e-6, atol=1e-6)
    word = "bert.embeddings.word_embeddings.weight"
    x = taus[0][word].view(-1)[:50]
    picked = (merged[word].view(-1)[:50] - base[word].view(-1)[:50]) / 0.7
    expected = torch.where(x * sign > 0, x, -x) if not dare_p else vector[word].view(-1)[:50]
    torch.testing.assert_close(picked, expected, rtol=1e-5, atol=1e-5)  # the majority's side, not the other


def test_ties_task_vector_reads_and_equals_dense_ties(tmp_path: Path) -> None:
    """The helper TALL and Consensus use: the same reads, the merged task vector before lambda."""
    base, taus, dirs = make_models(tmp_path, 1.0)
    keys = list(base)
    ctx = counting_ctx(dirs, keys)
    vector = ties_task_vector(ctx, 20.0)
    for reader in ctx.readers:
        assert reader.reads == dict.fromkeys(keys, 2)  # type: ignore[attr-defined]
    assert ctx.base_reader.reads == dict.fromkeys(keys, M + 1)  # type: ignore[union-attr]
    ref, _ = dense_ties(base, taus, 20.0)
    for k in keys:
        torch.testing.assert_close(vector[k], ref[k], rtol=1e-6, atol=1e-6)


def test_ties_chosen_scaling_reads(tmp_path: Path) -> None:
    """scaling: null: the merged vector once (same reads), the base once more, kept for the candidates."""
    base, taus, dirs = make_models(tmp_path, 1.0)
    keys = list(base)
    ctx = counting_ctx(dirs, keys)
    ref, _ = dense_ties(base, taus, 20.0)
    word = "bert.embeddings.word_embeddings.weight"

    def evaluate(body: dict[str, torch.Tensor], **kw: object) -> dict[str, float]:  # best at lambda 0.4
        lam = float((body[word] - base[word]).abs().sum() / ref[word].abs().sum())
        return dict.fromkeys(ctx.tasks, -abs(lam - 0.4))

    ctx.evaluate = evaluate
    merged = dict(Ties(top_k=20.0, scaling=None, scalings=[0.2, 0.4, 0.9]).merge(ctx))
    assert ctx.notes["ties_scaling"]["chosen"] == 0.4
    for reader in ctx.readers:
        assert reader.reads == dict.fromkeys(keys, 2)  # type: ignore[attr-defined]
    assert ctx.base_reader.reads == dict.fromkeys(keys, M + 2)  # type: ignore[union-attr]
    for k in keys:
        torch.testing.assert_close(merged[k], base[k] + 0.4 * ref[k], rtol=1e-6, atol=1e-6)
