"""The life cycle every artifact pass shares (mask Fisher, full Fisher, Grams), as one Lightning callback base.

A pass adds a callback to a `trainer.validate(...)`: at the start it builds an accumulator over the
module's `model` and enters its `active()` context (hooks, frozen weights); before every batch it calls
`step(batch)` under `torch.inference_mode(False)` and `torch.enable_grad()` with the batch cloned (tensors
made under the loop's inference mode cannot be saved for backward), so any Trainer setting works; at the
end it all-reduces the accumulator's `tensors()` across DDP ranks once, and rank zero writes `result()`
atomically beside the checkpoint with the header metadata. The context is always left, even on error.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import lightning as L
import torch
from torch import nn

from fmn_pl.artifacts import artifact_path, save_artifact
from fmn_pl.checkpoint import weights_fingerprint


class Accumulator(Protocol):
    examples: torch.Tensor  # examples seen by this rank (a tensor, so it all-reduces with the sums)

    def active(self) -> contextlib.AbstractContextManager: ...
    def step(self, batch: dict[str, torch.Tensor]) -> None: ...
    def tensors(self) -> list[torch.Tensor]: ...
    def result(self) -> dict[str, torch.Tensor]: ...
    def meta(self) -> dict[str, Any]: ...


class ArtifactPass(L.Callback):
    """Base callback: subclasses set `kind` (an artifact kind) and implement `make(model) -> Accumulator`."""

    kind = ""

    def __init__(self, checkpoint_dir: str | Path, metadata: Optional[dict[str, Any]] = None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metadata = dict(metadata or {})
        self.acc: Any = None
        self._stack: contextlib.ExitStack | None = None
        self._start = 0.0
        self.path: Path | None = None

    def make(self, model: nn.Module) -> Accumulator:
        raise NotImplementedError

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.inference_mode(False):  # sums are updated in place outside the loop's inference mode
            self.acc = self.make(pl_module.model)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.acc.active())
        self._start = time.perf_counter()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            self.acc.step({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        if trainer.world_size > 1:
            import torch.distributed as dist

            for t in self.acc.tensors():
                dist.all_reduce(t)
        seconds = time.perf_counter() - self._start
        if trainer.is_global_zero:
            if not int(self.acc.examples.item()):
                raise ValueError(f"the {self.kind} pass saw no examples: is the split empty?")
            meta = {
                "kind": self.kind,
                "fingerprint": weights_fingerprint(self.checkpoint_dir),
                "num_examples": int(self.acc.examples.item()),
                "seconds": round(seconds, 3),
                "finished_unix": time.time(),  # a recomputed artifact is a new file, whatever its numbers
                "world_size": trainer.world_size,
                **self.acc.meta(),
                **self.metadata,
            }
            self.path = save_artifact(artifact_path(self.checkpoint_dir, self.kind), self.acc.result(), meta)
        trainer.strategy.barrier()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()
