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

from fmn_pl.merging.base import MergeContext, MergeMethod, Option
from fmn_pl.module import model_inputs


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of `logits` over the batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class AdaMergingModule(L.LightningModule):
    """The merge coefficients as the only parameters; a step sums each adapted task's mean entropy.

    `models[t]` is task t's classifier (its own head); its body is replaced functionally by the merged
    body, so the models' own body weights are never used (they are shared with `base` to save memory).
    A task that is not adapted may have no model (None). `history` keeps each step's entropy per task.
    """

    def __init__(
        self,
        base: dict[str, torch.Tensor],
        task_vectors: list[dict[str, torch.Tensor]],
        models: list[nn.Module | None],
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
            if m is not None:
                m.requires_grad_(False).eval()
                m.load_state_dict(self._base, strict=False, assign=True)  # share the base storage, drop own body
        shape = (len(tasks),) if granularity == "task" else (len(tasks), len(self.keys))
        self.coefficients = nn.Parameter(torch.full(shape, float(init)))
        self.register_buffer("_adapt_mask", torch.tensor(self.adapt), persistent=False)
        self.history: list[dict[str, float]] = []

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
            if m is not None:
                m.to(dev)

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        body = self.merged_body()
        total: Any = 0.0  # a tensor after the first task
        step: dict[str, float] = {}
        for name, b in batch.items():
            if b is None:
                continue
            h = self.task_entropy(self.tasks.index(name), b, body)
            self.log(f"entropy/{name}", h, prog_bar=True, batch_size=len(b["input_ids"]))
            step[name] = float(h.detach())
            total = total + h
        self.history.append(step)
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
        callbacks=[
            ModelCheckpoint(
                dirpath=root / "checkpoints",
                monitor="entropy/sum",
                mode="min",
                save_last=True,
                every_n_train_steps=max(1, min(steps, 50)),
            )
        ],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    return module


def ties_processed_vectors(ctx: MergeContext, top_k: float) -> list[dict[str, torch.Tensor]]:
    """AdaMerging++'s task vectors: each trimmed to its top `top_k` percent and kept only where its sign agrees
    with TIES' elected sign (the entries TIES' disjoint mean averages); all models, whole body, in memory."""
    from fmn_pl.merging.ties import Ties

    ties = Ties(top_k=top_k, scaling=1.0)
    ties.setup(ctx)  # the thresholds and the majority sign
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(ctx.num_models)]
    for key in ctx.keys:
        trimmed = list(ties.trimmed(ctx, key, ctx.base(key)))  # each model read once: all are kept anyway
        total = trimmed[0].clone()
        for t in trimmed[1:]:
            total.add_(t)
        positive = ties.elect(total)
        for i, t in enumerate(trimmed):
            out[i][key] = t.mul_(torch.where(positive, t > 0, t < 0))
    return out


class AdaMerging(MergeMethod):
    """AdaMerging: task-vector coefficients learned by minimising each task's prediction entropy (++: TIES vectors)."""

    needs = frozenset({"base"})

    schema = (
        Option(
            "granularity",
            "Literal['task', 'layer']",
            "task",
            "task: one coefficient per task; layer: one per task per body tensor.",
        ),
        Option("plus", "bool", False, "AdaMerging++: learn coefficients of TIES-processed task vectors."),
        Option("init", "float", 0.3, "initial coefficient (fixed for tasks not adapted)."),
        Option("lr", "float", 1e-3, "Adam learning rate."),
        Option("steps", "int", 500, "optimisation steps; each step sees one batch of every adapted task."),
        Option("batch_size", "int", 16, "unlabeled examples per task per step (selection split)."),
        Option("top_k", "float", 20.0, "with `plus`: % of each task vector's largest entries TIES keeps."),
        Option(
            "regression",
            "Literal['exclude', 'refuse']",
            "exclude",
            "a regression task (no entropy): exclude it or refuse.",
        ),
        Option("seed", "int", 0, "seed of the order in which the unlabeled inputs are drawn."),
    )

    def __init__(
        self,
        granularity: Literal["task", "layer"] = "task",
        plus: bool = False,
        init: float = 0.3,
        lr: float = 1e-3,
        steps: int = 500,
        batch_size: int = 16,
        top_k: float = 20.0,
        regression: Literal["exclude", "refuse"] = "exclude",
        seed: int = 0,
    ) -> None:
        """
        Args:
            granularity: task: one coefficient per task; layer: one per task per body tensor.
            plus: AdaMerging++: learn the coefficients of TIES-processed task vectors (trimmed, sign-elected).
            init: initial coefficient (also the fixed coefficient of tasks that are not adapted).
            lr: Adam learning rate.
            steps: optimisation steps; each step sees one batch of every adapted task.
            batch_size: unlabeled examples per task per step, drawn from the merge stage's selection split.
            top_k: with `plus`, the percentage of each task vector's largest entries TIES keeps.
            regression: a regression task (STS-B) has no predictive entropy: exclude it from the adaptation
                (its task vector keeps `init`; a warning in the log and the report) or refuse the merge.
            seed: seed of the order in which the unlabeled inputs are drawn.
        """
        if granularity not in ("task", "layer"):
            raise ValueError(f"adamerging granularity must be 'task' or 'layer', got {granularity!r}")
        if regression not in ("exclude", "refuse"):
            raise ValueError(f"adamerging regression must be 'exclude' or 'refuse', got {regression!r}")
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"adamerging init must be in [0, 1] (coefficients are clamped there), got {init}")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"adamerging steps and batch_size must be >= 1, got {steps} and {batch_size}")
        if not 0.0 < top_k <= 100.0:
            raise ValueError(f"adamerging top_k is a percentage in (0, 100], got {top_k}")
        self.granularity, self.plus, self.init, self.lr = granularity, plus, init, lr
        self.steps, self.batch_size, self.top_k, self.regression, self.seed = steps, batch_size, top_k, regression, seed

    def _adapted(self, ctx: MergeContext) -> list[bool]:
        """Which tasks adapt: the classification ones; regression tasks refused or excluded with a remark."""
        from fmn_pl.tasks import get_task

        regression = [t for t in ctx.tasks if get_task(t).is_regression]
        if regression and self.regression == "refuse":
            raise ValueError(
                f"adamerging minimises the prediction entropy of classifiers, and {', '.join(regression)} "
                "is a regression task: leave it out, or pass --method.regression exclude"
            )
        for t in regression:
            ctx.remark(
                f"Warning: {t} is a regression task (no predictive distribution, so no entropy): AdaMerging "
                f"did not adapt on it; its task vector keeps the initial coefficient {self.init}."
            )
        if len(regression) == len(ctx.tasks):
            raise ValueError("adamerging needs at least one classification task to adapt on")
        if ctx.selection_inputs is None:
            raise ValueError("adamerging adapts on unlabeled inputs: it needs the merge stage's selection data")
        return [t not in regression for t in ctx.tasks]

    def _loader(self, datamodule: Any, i: int) -> DataLoader:
        """Task i's selection examples (MNLI: both splits), shuffled by a seeded generator; labels unused."""
        from torch.utils.data import ConcatDataset

        sets = list(datamodule.eval_datasets.values())
        return DataLoader(
            sets[0] if len(sets) == 1 else ConcatDataset(sets),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed * 1000 + i),
            collate_fn=datamodule.collator(),
        )

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        import tempfile

        from fmn_pl.module import load_model
        from fmn_pl.tasks import get_task

        adapt = self._adapted(ctx)
        base = {k: ctx.base(k) for k in ctx.keys}
        taus = ties_processed_vectors(ctx, self.top_k) if self.plus else _task_vectors(ctx, base)
        models = []
        for c, t, a in zip(ctx.checkpoints, ctx.tasks, adapt):
            model = load_model(str(c), get_task(t)) if a else None
            if model is not None:  # drop its own body now, before the next model loads (the heads are what it adds)
                model.load_state_dict(base, strict=False, assign=True)
            models.append(model)
        selection = ctx.selection_inputs
        assert selection is not None, "the merge stage gives AdaMerging its selection data"
        loaders = {t: self._loader(selection(i), i) for i, t in enumerate(ctx.tasks) if adapt[i]}
        module = AdaMergingModule(base, taus, models, ctx.tasks, adapt, self.granularity, self.init, self.lr)
        del base, taus, models
        with tempfile.TemporaryDirectory() as scratch:
            root = ctx.workdir if ctx.workdir is not None else Path(scratch)
            train_coefficients(module, loaders, self.steps, root, ctx.accelerator, ctx.progress)
        coef = module.effective().detach().cpu()
        self._note_coefficients(ctx, module, coef, adapt)
        with torch.no_grad():
            for j, key in enumerate(module.keys):
                w = coef if self.granularity == "task" else coef[:, j]
                merged = module._base.pop(key).cpu()
                for i, tau in enumerate(module._taus):
                    merged.add_(tau.pop(key).cpu(), alpha=float(w[i]))
                yield key, merged

    def _note_coefficients(
        self, ctx: MergeContext, module: AdaMergingModule, coef: torch.Tensor, adapt: list[bool]
    ) -> None:
        """Record the learned coefficients and the entropy of the first and last step in the notes, and say them
        in a remark (per task; the mean over tensors when layer-wise)."""
        named = {
            t: (float(coef[i]) if self.granularity == "task" else dict(zip(module.keys, coef[i].tolist())))
            for i, t in enumerate(ctx.tasks)
        }
        ctx.notes["adamerging"] = {
            "adapted": [t for t, a in zip(ctx.tasks, adapt) if a],
            "not_adapted": [t for t, a in zip(ctx.tasks, adapt) if not a],
            "steps": len(module.history),
            "entropy_first_step": module.history[0],
            "entropy_last_step": module.history[-1],
            "coefficients": named,
        }
        per_task = coef if self.granularity == "task" else coef.mean(1)
        ctx.remark(
            f"AdaMerging{'++' if self.plus else ''} ({self.granularity}-wise, {len(module.history)} steps) "
            + ("coefficients" if self.granularity == "task" else "mean coefficients over tensors")
            + ": "
            + ", ".join(
                f"{t} {float(c):.3f}" + ("" if a else " (not adapted)") for t, c, a in zip(ctx.tasks, per_task, adapt)
            )
            + "; entropy first -> last step: "
            + ", ".join(f"{t} {module.history[0][t]:.3f} -> {module.history[-1][t]:.3f}" for t in module.history[0])
        )


def _task_vectors(ctx: MergeContext, base: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each model's task vector over the body (its fine-tuned weights minus `base`), in place (the reader's tensors
    are the merge's own), so only one copy per model is held."""
    return [{k: ctx.models(k)[i].sub_(base[k]) for k in ctx.keys} for i in range(ctx.num_models)]
