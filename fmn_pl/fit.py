"""`fmn-pl fit` (and validate/test/predict): LightningCLI over the fine-tuning module and the GLUE data, with the
callback that exports the best epoch as a task checkpoint (`fmn_pl.checkpoint`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

from fmn_pl.checkpoint import check_export_target, export_checkpoint
from fmn_pl.data import GLUEDataModule
from fmn_pl.files import check_writable
from fmn_pl.module import GLUETransformer
from fmn_pl.progress import lightning_callback


class ExportCheckpoint(L.Callback):
    """At the end of `fit`, export the best validation epoch's weights as a task checkpoint.

    It keeps a CPU copy of the weights whenever the monitored score improves (so it needs no Lightning
    checkpoint file), then writes `dirpath` from rank zero with the metrics of that epoch.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        select: Literal["best", "last"] = "best",
        overwrite: bool = False,
        monitor: str = "val/score",
        resume_dir: str | None = None,
    ):
        """
        Args:
            dirpath: where to write the task checkpoint (None: no export).
            select: export the epoch with the best `monitor` score (higher is better), or the last one.
            overwrite: replace a folder that holds another task's export (or other files).
            monitor: the logged metric that picks the epoch. With `data.eval_splits: [holdout, validation]`,
                `val_holdout/score` picks it on the held-out training rows and leaves validation unseen
                (`val/score` is then the mean of both splits).
            resume_dir: where SIGTERM saves a resumable `last.ckpt` when no ModelCheckpoint keeps files (the
                pipeline's fine-tuning stages); with a ModelCheckpoint, its folder.
        """
        self.dirpath, self.select, self.overwrite, self.monitor = dirpath, select, overwrite, monitor
        self.resume_dir = resume_dir
        if dirpath is not None:
            check_writable(dirpath)  # before the Trainer is built and the data read
        self.best_score: float | None = None
        self.best_state: dict[str, Any] | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_epoch: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse an occupied export folder before training, not after it."""
        if stage == "fit" and self.dirpath is not None and trainer.is_global_zero:
            check_export_target(self.dirpath, pl_module.task.name, self.overwrite)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.dirpath is None or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if self.select == "best" and self.monitor not in metrics:
            raise ValueError(
                f"export.monitor {self.monitor!r} is not a logged validation metric; "
                f"logged: {', '.join(sorted(metrics))}"
            )
        score = metrics.get(self.monitor, float("nan"))
        if self.select == "last" or self.best_score is None or score > self.best_score:
            self.best_score, self.best_metrics, self.best_epoch = score, metrics, trainer.current_epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.model.state_dict().items()}

    # The best epoch so far lives in Lightning's checkpoints, so a fit resumed with `--ckpt_path last` exports
    # the best epoch of the whole run, not of the part after the resume.
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_metrics": self.best_metrics,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("best_score", "best_metrics", "best_epoch", "best_state"):
            setattr(self, key, state_dict.get(key))
        self.best_metrics = self.best_metrics or {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (a time limit, preemption) save a resumable `last.ckpt` where the run's ModelCheckpoint
        keeps its files: `fmn-pl fit ... --ckpt_path last` then goes on from there."""
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        saver = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        folder = saver.dirpath if saver is not None else self.resume_dir
        if isinstance(exception, SIGTERMException) and folder is not None and trainer.state.fn == "fit":
            path = Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                print(
                    f"saved {path} on SIGTERM: resume with `fmn-pl fit ... --ckpt_path {path}` (the pipeline "
                    "resumes it by itself)",
                    file=sys.stderr,
                )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath is None:
            return
        if self.best_state is not None:
            pl_module.model.load_state_dict(self.best_state)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not rank 0 alone (deadlock)
        if trainer.is_global_zero:
            dm = trainer.datamodule
            hp = pl_module.hparams
            metadata = {
                "task": pl_module.task.name,
                "label_names": list(pl_module.task.label_names),
                "num_labels": pl_module.task.num_labels,
                "base_model": hp.model_name_or_path,
                "metrics": self.best_metrics,
                "epoch": self.best_epoch,
                "epochs_trained": trainer.current_epoch,
                "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
                "num_train_examples": getattr(dm, "num_train_examples", None),
                "data": _public(getattr(dm, "hparams", {})),
                "model_hparams": _public(hp),
            }
            config = Path(log_dir or ".") / "config.yaml"
            tokenizer = getattr(dm, "tokenizer", None)
            export_checkpoint(pl_module.model, tokenizer, self.dirpath, metadata, config, self.overwrite)
            print(f"exported {pl_module.task.name} task checkpoint to {self.dirpath}")
        trainer.strategy.barrier("fmn_pl_export")


def _public(hparams: Any) -> dict[str, Any]:
    """Hyperparameters without LightningCLI's private entries (`_instantiator`)."""
    return {k: v for k, v in dict(hparams).items() if not k.startswith("_")}


class FmnCLI(LightningCLI):
    """LightningCLI with the task and tokenizer linked from data/model, and the task-checkpoint export."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(ExportCheckpoint, "export")

    def instantiate_trainer(self, **kwargs):
        """A Trainer option of the wrong kind (`--trainer.devices abc`) is the user's error: one line, not a
        TypeError traceback from deep inside Lightning."""
        try:
            return super().instantiate_trainer(**kwargs)
        except TypeError as e:
            raise ValueError(f"trainer options: {e}") from e

    def _parse_ckpt_path(self) -> None:
        """A `--ckpt_path` that is not a checkpoint Lightning saved (a pickle that does not load as weights only)
        is the user's error: one line that names it, not torch's advice to unpickle untrusted code."""
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it all
                warnings.simplefilter("ignore")
                super()._parse_ckpt_path()
        except pickle.UnpicklingError as e:
            ckpt = self.config[self.config.subcommand].get("ckpt_path")
            raise ValueError(
                f"--ckpt_path {ckpt} is not a checkpoint that `fmn-pl fit` saved (it does not load as weights "
                "only); give its last.ckpt or a best-epoch .ckpt, or leave --ckpt_path out to start afresh"
            ) from e


@dataclass
class FitResult:
    """What `run_fit` exported: the task checkpoint and its epoch's validation metrics."""

    checkpoint: Path | None
    """The task checkpoint folder (None when the config sets no `export.dirpath`)."""
    metrics: dict[str, float]
    """Validation metrics of the exported epoch (`val/score`, ...)."""
    epoch: int | None
    """The exported epoch (0-based; None when nothing was exported)."""


def run_fit(config: dict[str, Any]) -> FitResult:
    """Fine-tune one task from a config with the layout of `configs/fit/*.yaml` (model, data, trainer, export,
    seed_everything, ckpt_path), as `fmn-pl fit --config` would, and return what it exported."""
    cli = lightning_cli({"fit": config})
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportCheckpoint))
    folder = Path(export.dirpath) if export.dirpath is not None else None
    return FitResult(folder, dict(export.best_metrics or {}), export.best_epoch)


def lightning_cli(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True) -> FmnCLI:
    """The fit/validate/test/predict CLI (also used by tests and `run_fit`): `args` as a command line, or as a
    config ({"fit": {...}}); None reads the process's own command line."""
    return FmnCLI(
        GLUETransformer,
        GLUEDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=42,  # reproducible unless asked otherwise (the fit configs say 42 too)
        trainer_defaults={"callbacks": [lightning_callback()]},  # a pipeline stage's progress line (else idle)
        # argument errors raise (one line at the error boundary) instead of printing the whole usage
        parser_kwargs={
            "description": "fmn-pl: fine-tune a BERT-family model on one GLUE task.",
            "exit_on_error": False,
        },
    )
