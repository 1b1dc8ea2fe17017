"""`fmn-pl fit` (and validate/test/predict): LightningCLI over the fine-tuning module and the GLUE data, with the
callback that exports the best epoch as a task checkpoint (`fmn_pl.checkpoint`)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

from fmn_pl.checkpoint import CheckpointMeta, DataSettings, ModelSettings, check_export_target, export_checkpoint
from fmn_pl.data import GLUEDataModule
from fmn_pl.errors import saved_for_resume, trainer_options
from fmn_pl.files import check_writable
from fmn_pl.fit_config import FitConfig
from fmn_pl.module import GLUETransformer, check_max_length
from fmn_pl.options import check_finite, check_outside, is_local_path
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
            resume_dir: where each finished epoch saves a resumable `last.ckpt`, which `--ckpt_path last` resumes
                after a SIGTERM (None:
                `.<dirpath's name>.resume/` beside `dirpath`, one stable place per export; the pipeline gives its
                own `<output>/resume/<task>-<key>/`).
        """
        self.dirpath, self.select, self.overwrite, self.monitor = dirpath, select, overwrite, monitor
        self.resume_dir = resume_dir or (str(default_resume_dir(dirpath)) if dirpath is not None else None)
        self.owns_resume_dir = resume_dir is None  # removed once the export is written (the pipeline clears its own)
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

    # The best epoch so far and the random state live in the checkpoints, so a fit resumed with `--ckpt_path last`
    # exports the best epoch of the whole run, and the same weights as a run never stopped (same seed).
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_metrics": self.best_metrics,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "rng_states": rng_states(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("best_score", "best_metrics", "best_epoch", "best_state"):
            setattr(self, key, state_dict.get(key))
        self.best_metrics = self.best_metrics or {}
        if state_dict.get("rng_states") is not None:  # before the resumed epoch draws its shuffle
            set_rng_states(state_dict["rng_states"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Each finished epoch (validated) is the resume point: `last.ckpt` in `resume_dir`, whole or not at all.
        An epoch's end, not the step SIGTERM stopped at: a resumed epoch then sees the batches it would have."""
        if self.resume_dir is None:
            return
        path = Path(self.resume_dir) / RESUME_FILE
        tmp = path.with_name(f".{RESUME_FILE}.tmp")  # the same name on every rank; rank zero writes it
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            tmp.replace(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM (a time limit, preemption) say where the last finished epoch was saved: `fmn-pl fit ...
        --ckpt_path last` goes on from there (`resume_checkpoint`)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        path = Path(self.resume_dir) / RESUME_FILE if self.resume_dir is not None else None
        if isinstance(exception, SIGTERMException) and path is not None and path.is_file():
            saved_for_resume(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath is None:
            return
        if self.best_state is not None:
            pl_module.model.load_state_dict(self.best_state)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, not rank 0 alone (deadlock)
        if trainer.is_global_zero:
            dm = trainer.datamodule
            hp = pl_module.hparams
            meta = CheckpointMeta(
                task=pl_module.task.name,
                label_names=list(pl_module.task.label_names),
                num_labels=pl_module.task.num_labels,
                base_model=hp.model_name_or_path,
                metrics=self.best_metrics,
                epoch=self.best_epoch,
                epochs_trained=trainer.current_epoch,
                seed=int(os.environ.get("PL_GLOBAL_SEED", -1)),
                num_train_examples=getattr(dm, "num_train_examples", None),
                data=DataSettings.from_dict(_public(getattr(dm, "hparams", {})), "the data module's options"),
                model_hparams=ModelSettings.from_dict(_public(hp), "the model's options"),
            )
            config = Path(log_dir or ".") / "config.yaml"
            tokenizer = getattr(dm, "tokenizer", None)
            export_checkpoint(pl_module.model, tokenizer, self.dirpath, meta, config, self.overwrite)
            print(f"exported {pl_module.task.name} task checkpoint to {self.dirpath}")
            if self.owns_resume_dir and self.resume_dir is not None:  # finished: nothing left to resume
                shutil.rmtree(self.resume_dir, ignore_errors=True)
        trainer.strategy.barrier("fmn_pl_export")


RESUME_FILE = "last.ckpt"


def rng_states() -> dict[str, Any]:
    """The random states a training step draws from (torch, CUDA, numpy, Python), in types a weights-only
    checkpoint load accepts (tensors, lists, numbers)."""
    import random

    import numpy as np
    import torch

    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, key.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (CUDA states only where this process has as many devices)."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(states["cuda"]):
        torch.cuda.set_rng_state_all(states["cuda"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def default_resume_dir(dirpath: str | Path) -> Path:
    """Where a standalone fit keeps what SIGTERM saved: `.<name>.resume/` beside the export `dirpath`, the same
    for every run of that export (not in a log version folder, which a rerun does not reuse)."""
    dirpath = Path(dirpath)
    return dirpath.parent / f".{dirpath.name}.resume"


def resume_checkpoint(export: dict[str, Any]) -> Path:
    """`--ckpt_path last`: the `last.ckpt` of this export's last finished epoch (`export` options: dirpath,
    resume_dir), or a one-line error when there is none."""
    folder = export.get("resume_dir") or (default_resume_dir(export["dirpath"]) if export.get("dirpath") else None)
    if folder is None:
        raise ValueError("--ckpt_path last needs --export.dirpath (or --export.resume_dir): it resumes that export")
    path = Path(folder) / RESUME_FILE
    if not path.is_file():
        raise ValueError(
            f"--ckpt_path last: no interrupted fit of {export.get('dirpath') or folder} to resume ({path} does not "
            "exist: no epoch of it finished, or it was exported); leave --ckpt_path out to start afresh"
        )
    return path


def remove_unused_log_dir(trainer: L.Trainer) -> None:
    """Remove the logger's version folder of a run that logged nothing (only the config files, empty folders),
    then its parents up to the logger's save_dir while they are empty: a failed fit leaves no empty log folders."""
    logger = trainer.logger
    if logger is None or not trainer.is_global_zero or logger.log_dir is None:
        return
    version = Path(logger.log_dir)
    if version.is_dir():
        files = [p for p in version.rglob("*") if not p.is_dir()]
        if any(p.name not in ("config.yaml", "hparams.yaml") for p in files):
            return
        shutil.rmtree(version, ignore_errors=True)
    root = Path(logger.save_dir or logger.root_dir or version.parent)
    for folder in (version.parent, *version.parent.parents):
        if not folder.is_dir() or any(folder.iterdir()) or not (folder == root or root in folder.parents):
            break
        folder.rmdir()


def _public(hparams: Any) -> dict[str, Any]:
    """Hyperparameters without LightningCLI's private entries (`_instantiator`)."""
    return {k: v for k, v in dict(hparams).items() if not k.startswith("_")}


class FmnCLI(LightningCLI):
    """LightningCLI with the task and tokenizer linked from data/model, and the task-checkpoint export."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(ExportCheckpoint, "export")

    def before_instantiate_classes(self) -> None:
        """Before any model is loaded: no NaN or infinite number in the options, and an export that neither
        replaces nor lies inside the model folder it fine-tunes."""
        config = self.config.get(self.config.get("subcommand") or "", None) or self.config
        check_finite(config)
        model, dirpath = config.get("model.model_name_or_path"), config.get("export.dirpath")
        if dirpath is not None and isinstance(model, str) and is_local_path(model):
            check_outside(dirpath, [model], "model")

    def _run_subcommand(self, subcommand: str) -> None:
        """A failed run leaves no log version folder with nothing logged in it (`remove_unused_log_dir`)."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_unused_log_dir(self.trainer)
            raise

    def instantiate_trainer(self, **kwargs):
        """The Trainer, once the model is loaded and checked against `data.max_length`; an option of the wrong kind
        (`--trainer.devices abc`) is one line (`trainer_options`)."""
        model = getattr(self.model, "model", None)  # loaded: a max_length above its positions fails here, first
        if model is not None and self.datamodule is not None:
            source = self.model.hparams.model_name_or_path
            check_max_length(getattr(self.datamodule, "max_length", None), model.config, source)
        with trainer_options():
            return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path last` is this export's resume checkpoint (`resume_checkpoint`), not Lightning's search of
        the run's own log version. A `--ckpt_path` that is not a checkpoint Lightning saved (a pickle that does
        not load as weights only) is the user's error: one line that names it, not torch's advice to unpickle
        untrusted code."""
        import pickle
        import warnings

        config = self.config.get(self.config.get("subcommand") or "", None)
        if self.config.get("subcommand") == "fit" and config is not None and config.get("ckpt_path") == "last":
            config["ckpt_path"] = str(resume_checkpoint(dict(vars(config["export"]))))
            print(f"resuming from {config['ckpt_path']}", file=sys.stderr)
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


def run_fit(config: FitConfig) -> FitResult:
    """Fine-tune one task as `fmn-pl fit --config` would with the config's data (LightningCLI parses and checks it),
    and return what it exported."""
    cli = lightning_cli({"fit": config.to_data()})
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
