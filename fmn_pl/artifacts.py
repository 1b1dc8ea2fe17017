"""Artifacts beside a task checkpoint (Fisher, Grams): safetensors with metadata, checked on load.

Every artifact records in its safetensors header the `kind`, the task, and the `fingerprint` of
the checkpoint weights it was computed on; loading it for another checkpoint is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from fmn_pl.checkpoint import weights_fingerprint
from fmn_pl.tensorfile import SafetensorsFile, save_tensors


def artifact_path(checkpoint_dir: str | Path, kind: str) -> Path:
    """Where an artifact of `kind` (a name in `fmn_pl.kinds.KINDS`, checked there) lives in a task checkpoint."""
    return Path(checkpoint_dir) / f"{kind}.safetensors"


def save_artifact(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors (contiguous, on CPU) and JSON-encoded metadata through a temp file and a rename."""
    for key in ("kind", "fingerprint"):
        if key not in metadata:
            raise ValueError(f"artifact metadata needs {key!r}")
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save_tensors(path, tensors, header)


def _decode(header: dict[str, str]) -> dict[str, Any]:
    out = {}
    for k, v in header.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


class Artifact:
    """A checked, lazily read artifact: `metadata`, `keys()`, `get(key)` and `load_all()`."""

    def __init__(
        self, path: str | Path, kind: str, checkpoint_dir: str | Path | None = None, fingerprint: str | None = None
    ) -> None:
        """`checkpoint_dir`: check the artifact against its weights, whose fingerprint the caller may pass when
        it has one (hashing a checkpoint once per merge, not once per artifact and again for the report)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} does not exist: compute it with `fmn-pl fisher --checkpoint {self.path.parent} "
                f"--kind {kind}`"
            )
        try:
            self._file = SafetensorsFile(self.path)
        except ValueError as e:
            raise ValueError(f"{self.path} is corrupt or truncated: {e}") from e
        self.metadata = _decode(self._file.metadata)
        if self.metadata.get("kind") != kind:
            raise ValueError(f"{self.path} is a {self.metadata.get('kind')!r} artifact, not {kind!r}")
        if checkpoint_dir is not None:
            expected = fingerprint or weights_fingerprint(checkpoint_dir)
            if self.metadata.get("fingerprint") != expected:
                raise ValueError(
                    f"{self.path} was computed on weights {self.metadata.get('fingerprint')}, "
                    f"but {checkpoint_dir} holds weights {expected}: recompute it"
                )

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def get(self, key: str) -> torch.Tensor:
        """One tensor, checked for NaN/Inf. Read with plain file reads: the pages of a memory map stay resident
        while the artifact is open (a whole Gram or full-Fisher artifact per checkpoint during a merge)."""
        try:
            t = self._file.get(key)
        except Exception as e:
            raise ValueError(f"{self.path}: cannot read tensor {key!r} (corrupt or truncated file?): {e}") from e
        if not t.is_floating_point():
            raise ValueError(
                f"{self.path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}; artifacts hold "
                "floating-point values (float32): recompute it with `fmn-pl fisher`"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"{self.path}: tensor {key!r} has NaN or Inf entries")
        return t

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.get(key)

    def load_all(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}  # not dict(self): keys() would make dict() subscript

    def check(self, shapes: dict[str, tuple[int, ...]] | None = None) -> "Artifact":
        """Read every tensor once: NaN/Inf, expected shapes, and not all zero. Returns self."""
        nonzero = False
        for key, t in self:
            if shapes is not None and key in shapes and tuple(t.shape) != tuple(shapes[key]):
                raise ValueError(f"{self.path}: tensor {key!r} has shape {tuple(t.shape)}, expected {shapes[key]}")
            nonzero = nonzero or bool(t.any())
        if shapes is not None and (missing := set(shapes) - set(self.keys())):
            raise ValueError(f"{self.path} lacks tensor(s) {sorted(missing)}")
        if not nonzero:
            raise ValueError(f"{self.path}: every entry is zero (no gradient reached the nodes?)")
        return self


def load_artifact(
    checkpoint_dir: str | Path,
    kind: str,
    shapes: dict[str, tuple[int, ...]] | None = None,
    fingerprint: str | None = None,
) -> Artifact:
    """Open the `kind` artifact of a task checkpoint, checked against its weights (their `fingerprint`, when the
    caller has it) and `shapes`."""
    return Artifact(artifact_path(checkpoint_dir, kind), kind, checkpoint_dir, fingerprint).check(shapes)
