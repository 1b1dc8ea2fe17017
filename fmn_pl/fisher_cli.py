"""`fmn-pl fisher`: one artifact beside a task checkpoint (mask-node Fisher, full Fisher or Grams) from the
command line or `run_fisher`: the checkpoint's own task data, a Trainer of the user's options, one pass."""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from torch import nn

from fmn_pl.artifacts import artifact_path
from fmn_pl.errors import trainer_options
from fmn_pl.kinds import ArtifactKind, FisherConfig, fisher_config_class
from fmn_pl.module import load_model, model_inputs
from fmn_pl.options import check_finite
from fmn_pl.passes import ArtifactPass
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


@dataclass(frozen=True)
class ArtifactResult:
    """What one `run_fisher` wrote, for its caller (the pipeline, a study): where, what and at what cost."""

    path: Path
    """The artifact file, beside the checkpoint's weights."""
    kind: str
    """The kind's name, as its header records it (e.g. "mask_fisher")."""
    task: str
    """The checkpoint's task."""
    num_examples: int
    """Examples the pass saw (on every rank together)."""
    seconds: float
    """Wall time of the run: data, model, pass and writing."""


def run_fisher(config: FisherConfig) -> ArtifactResult:
    """Compute one artifact of a task checkpoint and write it beside the weights: the checkpoint's own task data, a
    Trainer of `config.trainer`, the pass of `config.kind` given that kind's options that are set."""
    from fmn_pl.checkpoint import CheckpointMeta
    from fmn_pl.data import task_datamodule
    from fmn_pl.files import check_writable, output_lock
    from fmn_pl.kinds import get_kind
    from fmn_pl.options import check_checkpoint_folder, check_count
    from fmn_pl.ranks import is_global_zero

    start = time.perf_counter()
    spec = get_kind(config.kind)
    cls = spec.pass_class()
    own = pass_options(config, spec, cls)
    for name in ("num_examples", "batch_size", "max_length"):
        check_count(name, getattr(config, name))
    checkpoint = config.checkpoint
    meta = CheckpointMeta.read(check_checkpoint_folder(checkpoint))
    path = artifact_path(checkpoint, spec.name)
    check_writable(path)
    if config.task is not None and config.task != meta.task:
        raise ValueError(f"{checkpoint} is a {meta.task!r} checkpoint, not {config.task!r}")
    with output_lock(path, config.wait, hold=is_global_zero()):  # one writer; other ranks run under rank 0's
        dm = task_datamodule(
            checkpoint,
            meta,
            config.split,
            config.data_dir,
            config.batch_size or spec.batch_size,
            config.num_examples,
            config.seed,
            config.max_length,
            unpadded_shards=True,
        )
        hp = dm.hparams
        info = {
            "task": meta.task,
            "split": config.split,
            "data_dir": str(hp["data_dir"]),
            "batch_size": hp["eval_batch_size"],
            "max_length": dm.max_length,
            "sample_seed": config.seed,
            "holdout_samples": hp["holdout_samples"],
        }
        callback = cls(checkpoint, metadata=info, **own)
        if run_pass(callback, dm, spec.forward, config.trainer):
            print(f"wrote {path}")
    seconds = round(time.perf_counter() - start, 3)
    return ArtifactResult(path, spec.name, meta.task, int(callback.acc.examples.item()), seconds)


def run_pass(callback: ArtifactPass, dm: Any, forward: bool, trainer: Optional[dict[str, Any]]) -> bool:
    """One validation loop over `dm` with the pass as a callback, in a Trainer of the user's options; True on
    global rank 0 (the rank that wrote the artifact)."""
    options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **(trainer or {}),
        "use_distributed_sampler": False,
    }
    options["callbacks"] = [*(options.get("callbacks") or []), callback, lightning_callback()]
    model = load_model(str(callback.checkpoint_dir), dm.task, max_length=dm.max_length)  # fails before the Trainer
    with trainer_options():
        pl_trainer = L.Trainer(**options)
    pl_trainer.validate(_NodePass(model, forward=forward), datamodule=dm, verbose=False)
    return bool(pl_trainer.is_global_zero)


def pass_options(config: FisherConfig, spec: ArtifactKind, cls: type) -> dict[str, Any]:
    """The kind's own options for its pass: those set in `config`, else the kind's declared defaults (neither: the
    pass's own), and `seed` when the pass takes one (sampled labels). Another kind's option that is set is refused:
    it would do nothing."""
    from fmn_pl.kinds import KINDS, kind_options

    own = {o.name: o for o in spec.options}
    wrong = {
        name: clis
        for name, (_, clis) in kind_options(KINDS.values()).items()
        if name not in own and getattr(config, name, None) is not None
    }
    if wrong:
        kinds = ", ".join(dict.fromkeys(c for clis in wrong.values() for c in clis))
        raise ValueError(f"{' and '.join(wrong)} does not apply to kind {spec.cli!r} (an option of kind {kinds})")
    values = {name: o.default if getattr(config, name) is None else getattr(config, name) for name, o in own.items()}
    seed = {"seed": config.seed} if "seed" in inspect.signature(cls).parameters else {}
    return {k: v for k, v in values.items() if v is not None} | seed


def build_parser() -> Any:
    """The `fmn-pl fisher` parser: `FisherConfig`'s fields as flags (the registered kinds' options among them) and
    Lightning Trainer's options as `--trainer.*`."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # FisherConfig's field docs are --help
    parser = ArgumentParser(
        prog="fmn-pl fisher",
        description="Compute a mask-node Fisher, full Fisher or Gram "
        "artifact beside a task checkpoint (see configs/fisher/).",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_class_arguments(fisher_config_class(), None, as_group=False, skip={"trainer"})
    parser.add_class_arguments(
        L.Trainer, "trainer", skip={"logger", "enable_checkpointing", "use_distributed_sampler"}, instantiate=False
    )
    parser.set_defaults({"trainer.enable_model_summary": False})
    return parser


def parse_config(argv: Sequence[str]) -> FisherConfig:
    """`fmn-pl fisher` arguments as a `FisherConfig`. Its `trainer` holds the Trainer options given (on the command
    line or in a `--config` file; None: none), so the YAML of its `to_data()` parses back to an equal config."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    check_finite(ns)
    given = parser.parse_args(list(argv), defaults=False).get("trainer")
    init = parser.instantiate_classes(ns)
    cls = fisher_config_class()
    values = {f.name: init[f.name] for f in fields(cls) if f.name != "trainer"}
    return cls(**values, trainer={k: init.trainer[k] for k in vars(given)} if given else None)


def main(argv: Sequence[str] | None = None) -> ArtifactResult:
    """`fmn-pl fisher ...`: what it wrote; bad input raises (one line at `fmn_pl.cli.shell`)."""
    return run_fisher(parse_config(sys.argv[1:] if argv is None else argv))
