"""DARE (Yu et al. 2024): drop each task-vector entry with probability p and rescale the rest by 1/(1-p).

The rescale keeps the expected task vector unchanged. Every (seed, model, tensor) triple gets its own
generator, so the drop pattern does not depend on the order in which a merge streams its tensors.
Task arithmetic and TIES apply it to each task vector before merging (`dare_p`, `dare_seed`).
"""

from __future__ import annotations

import hashlib

import torch


def dare_generator(seed: int, model: int, key: str) -> torch.Generator:
    """A CPU generator seeded by (seed, model index, tensor name): reproducible in any merge order."""
    digest = hashlib.sha256(f"{seed}:{model}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare(tau: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop-and-rescale one task vector: keep each entry with probability 1-p, scaled by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop rate p must be in [0, 1), got {p}")
    if p == 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) >= p  # drawn on CPU: same pattern on every device
    return tau * keep.to(tau.device) / (1.0 - p)


def dare_task_vectors(taus: list[torch.Tensor], key: str, p: float, seed: int) -> list[torch.Tensor]:
    """DARE on every model's task vector of tensor `key` (model i gets generator (seed, i, key))."""
    if p == 0.0:
        return taus
    return [dare(t, p, dare_generator(seed, i, key)) for i, t in enumerate(taus)]
