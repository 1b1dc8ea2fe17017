"""`fmn-pl fisher`: one artifact beside a task checkpoint (mask-node Fisher, full Fisher or Grams) from the
command line or `run_fisher`: the checkpoint's own task data, a Trainer of the user's options, one pass."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from torch import nn

from fmn_pl.artifacts import artifact_path
from fmn_pl.errors import trainer_options
from fmn_pl.fisher import Aggregation, LabelMode
from fmn_pl.module import load_model, model_inputs
from fmn_pl.options import check_finite
from fmn_pl.progress import lightning_callback


class _NodePass(L.LightningModule):
    """The task model in a validation loop: a plain forward (`forward=True`, for hook-based passes such as
    the Grams) or nothing at all (the Fisher callbacks run their own forward and backward)."""

    def __init__(self, model: nn.Module, forward: bool = False) -> None:
        super().__init__()
        self.model, self.forward_in_step = model, forward

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.forward_in_step:
            self.model(**model_inputs(batch))


def run_fisher(
    checkpoint: str,
    kind: str = "mask",
    task: Optional[str] = None,
    data_dir: Optional[str] = None,
    split: str = "train",
    num_examples: Optional[int] = 2048,
    batch_size: Optional[int] = None,
    seed: int = 0,
    aggregation: Optional[Aggregation] = None,
    labels: Optional[LabelMode] = None,
    include_padding: Optional[bool] = None,
    max_length: Optional[int] = None,
    trainer: Optional[dict[str, Any]] = None,
    wait: bool = False,
) -> Path:
    """Compute one artifact of a task checkpoint and write it beside the weights.

    Args:
        checkpoint: task checkpoint folder (written by `fmn-pl fit`); the artifact is written there.
        kind: mask (mask-node Fisher, FMN), full (diagonal Fisher of every body parameter), grams (RegMean), or
            another kind registered in `fmn_pl.kinds.KINDS`.
        task: GLUE task; default the checkpoint's. A different one is an error.
        data_dir: GLUE data (parquet/TSV folder or hub name); default the one the checkpoint was trained on.
        split: split to read; "train" excludes the rows the checkpoint held out (`holdout_samples`).
        num_examples: examples drawn without replacement with `seed` (None: the whole split).
        batch_size: examples per batch (default: the kind's, 32; 16 for full).
        seed: seed of the example sample and of sampled labels.
        aggregation: per_example (default; exact) or per_batch (the FMN reference code). Fisher kinds only.
        labels: empirical (default for mask), sampled, or expected (default for full). Fisher kinds only.
        include_padding: grams only: count padding positions too (the RegMean reference does).
        max_length: truncation length (default: the checkpoint's fine-tuning setting).
        trainer: Lightning Trainer options (devices, strategy, accelerator, precision, ...).
        wait: wait for another run computing this artifact (it holds `.<kind>.safetensors.lock` beside it) to
            finish, instead of refusing at once.
    """
    from fmn_pl.checkpoint import CheckpointMeta, task_datamodule
    from fmn_pl.files import check_writable, output_lock
    from fmn_pl.kinds import get_kind
    from fmn_pl.options import check_checkpoint_folder, check_count
    from fmn_pl.ranks import is_global_zero

    spec = get_kind(kind)
    for name, value in (("num_examples", num_examples), ("batch_size", batch_size), ("max_length", max_length)):
        check_count(name, value)
    meta = CheckpointMeta.read(check_checkpoint_folder(checkpoint))
    path = artifact_path(checkpoint, spec.name)
    check_writable(path)
    if task is not None and task != meta.task:
        raise ValueError(f"{checkpoint} is a {meta.task!r} checkpoint, not {task!r}")
    with output_lock(path, wait, hold=is_global_zero()):  # one writer; other ranks run under rank 0's
        cls = spec.pass_class()
        own = pass_options(spec.cli, cls, seed, aggregation=aggregation, labels=labels, include_padding=include_padding)
        dm = task_datamodule(
            checkpoint,
            meta,
            split,
            data_dir,
            batch_size or spec.batch_size,
            num_examples,
            seed,
            max_length,
            unpadded_shards=True,
        )
        info = {
            "task": meta.task,
            "split": split,
            "data_dir": str(dm.hparams.data_dir),
            "batch_size": dm.hparams.eval_batch_size,
            "max_length": dm.max_length,
            "sample_seed": seed,
            "holdout_samples": dm.hparams.holdout_samples,
        }
        callback = cls(checkpoint, metadata=info, **own)
        options = {
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            **(trainer or {}),
            "use_distributed_sampler": False,
        }
        options["callbacks"] = [*(options.get("callbacks") or []), callback, lightning_callback()]
        model = load_model(str(checkpoint), dm.task, max_length=dm.max_length)  # fails before the Trainer
        with trainer_options():
            pl_trainer = L.Trainer(**options)
        pl_trainer.validate(_NodePass(model, forward=spec.forward), datamodule=dm, verbose=False)
        if pl_trainer.is_global_zero:
            print(f"wrote {path}")
        return path


def pass_options(kind: str, cls: type, seed: int, **options: Any) -> dict[str, Any]:
    """The options the user set (not None), each checked to be one the kind's pass takes, and `seed` when the pass
    takes one (sampled labels)."""
    accepted = inspect.signature(cls).parameters
    given = {k: v for k, v in options.items() if v is not None}
    wrong = [k for k in given if k not in accepted]
    if wrong:
        raise ValueError(f"{' and '.join(wrong)} does not apply to kind {kind!r} (its pass takes no such option)")
    return given | ({"seed": seed} if "seed" in accepted else {})


def build_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="fmn-pl fisher",
        description="Compute a mask-node Fisher, full Fisher or Gram "
        "artifact beside a task checkpoint (see configs/fisher/).",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(run_fisher, as_group=False, skip={"trainer"})
    parser.add_class_arguments(
        L.Trainer, "trainer", skip={"logger", "enable_checkpointing", "use_distributed_sampler"}, instantiate=False
    )
    parser.set_defaults({"trainer.enable_model_summary": False})
    return parser


def main(argv: Sequence[str] | None = None) -> Path | None:
    """`fmn-pl fisher ...`: the artifact's path; bad input raises (one line at `fmn_pl.cli.shell`)."""
    parser = build_parser()
    cfg = parser.instantiate_classes(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    check_finite(cfg)
    kwargs = {k: v for k, v in vars(cfg).items() if k not in ("config", "trainer", "__path__")}
    return run_fisher(**kwargs, trainer=dict(vars(cfg.trainer)))
