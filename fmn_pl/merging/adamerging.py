"""AdaMerging (Yang et al. 2024): learn the merge coefficients by minimising prediction entropy.

theta(c) = theta0 + sum_t c_t tau_t, with one coefficient per task (`granularity: task`) or one per task
per body tensor (`granularity: layer`), initialised to `init`, clamped to [0, 1] after every step and
learned with Adam on the unlabeled inputs of each classification task, each scored by its own head.
AdaMerging++ (`plus: true`) uses TIES-processed task vectors (trimmed, sign-elected, disjoint).
The coefficients are the only parameters of a LightningModule trained by a Lightning Trainer.

Memory: not streamed. It holds the base body and all T task vectors (T+1 body copies, float32) plus T
classification heads, and during a step one merged body with its autograd graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from fmn_pl.merging.base import MergeContext, MergeMethod
from fmn_pl.module import model_inputs


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of `logits` over the batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class AdaMergingModule(L.LightningModule):
    """The merge coefficients as the only parameters; a step sums each adapted task's mean entropy.

    `models[t]` is task t's classifier (its own head); its body is replaced functionally by the merged
    body, so the models' own body weights are never used (they are shared with `base` to save memory).
    """

    def __init__(
        self,
        base: dict[str, torch.Tensor],
        task_vectors: list[dict[str, torch.Tensor]],
        models: list[nn.Module],
        tasks: list[str],
        adapt: list[bool] | None = None,
        granularity: Literal["task", "layer"] = "task",
        init: float = 0.3,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.keys = list(base)
        self.tasks, self.granularity, self.init, self.lr = list(tasks), granularity, init, lr
        self.adapt = list(adapt) if adapt is not None else [True] * len(tasks)
        # Plain containers: not submodules or buffers, so the state_dict (and checkpoints) hold only the coefficients.
        self._base, self._taus, self._models = dict(base), list(task_vectors), list(models)
        for m in self._models:
            m.requires_grad_(False).eval()
            m.load_state_dict(self._base, strict=False, assign=True)  # share the base storage, drop own body
        shape = (len(tasks),) if granularity == "task" else (len(tasks), len(self.keys))
        self.coefficients = nn.Parameter(torch.full(shape, float(init)))
        self.register_buffer("_adapt_mask", torch.tensor(self.adapt), persistent=False)

    def effective(self) -> torch.Tensor:
        """The coefficients in use: learned ones for adapted tasks, `init` for the others; always [T] or [T, K]."""
        mask = self._adapt_mask.view(-1, *([1] * (self.coefficients.dim() - 1)))
        return torch.where(mask, self.coefficients, torch.full_like(self.coefficients, self.init))

    def merged_body(self) -> dict[str, torch.Tensor]:
        """{key: theta0 + sum_t c[t] tau_t} with the graph to the coefficients."""
        c = self.effective()
        body = {}
        for j, key in enumerate(self.keys):
            w = c if self.granularity == "task" else c[:, j]
            body[key] = self._base[key] + sum(w[t] * tau[key] for t, tau in enumerate(self._taus))
        return body

    def task_entropy(self, t: int, batch: dict[str, torch.Tensor], body: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.func.functional_call(self._models[t], body, args=(), kwargs=model_inputs(batch)).logits
        return entropy(logits)

    def on_fit_start(self) -> None:
        """Follow the module's device: move the (unregistered) base, task vectors and heads there."""
        dev = self.device
        self._base = {k: v.to(dev) for k, v in self._base.items()}
        self._taus = [{k: v.to(dev) for k, v in tau.items()} for tau in self._taus]
        for m in self._models:
            m.to(dev)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        body = self.merged_body()
        total = 0.0
        for name, b in batch.items():
            if b is None:
                continue
            h = self.task_entropy(self.tasks.index(name), b, body)
            self.log(f"entropy/{name}", h, prog_bar=True, batch_size=len(b["input_ids"]))
            total = total + h
        self.log("entropy/sum", total, batch_size=1)
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.coefficients.clamp_(0.0, 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.lr)


def train_coefficients(
    module: AdaMergingModule,
    loaders: dict[str, DataLoader],
    steps: int,
    root: str | Path,
    accelerator: str = "auto",
    progress: bool = True,
) -> AdaMergingModule:
    """Fit the coefficients for `steps` Adam steps over the tasks' loaders (cycled together), with a
    progress bar, CSV logs of each task's entropy and a checkpoint of the coefficients under `root`."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import CombinedLoader

    root = Path(root)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        logger=CSVLogger(root, name="logs"),
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", monitor="entropy/sum", mode="min",
                                   save_last=True, every_n_train_steps=max(1, min(steps, 50)))],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    return module
