"""`fmn-pl`: LightningCLI for fit/validate/test/predict, plus the fisher, merge and pipeline stages."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Sequence

from lightning.pytorch.cli import LightningCLI

from fmn_pl.checkpoint import ExportCheckpoint
from fmn_pl.data import GLUEDataModule
from fmn_pl.module import GLUETransformer

# Stages that are not Trainer methods: name -> (module:function taking argv, one-line help).
STAGES = {
    "fisher": ("fmn_pl.fisher:main", "compute a mask-node (or full) Fisher artifact beside a task checkpoint"),
    "merge": ("fmn_pl.merge:main", "merge task checkpoints, evaluate every task with its own head, report"),
    "pipeline": ("fmn_pl.pipeline:main", "fine-tune, Fisher, merge and report from one config, resumably"),
}


class FmnCLI(LightningCLI):
    """LightningCLI with the task and tokenizer linked from data/model, and the task-checkpoint export."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(ExportCheckpoint, "export")

    def instantiate_trainer(self, **kwargs):  # noqa: ANN003, ANN201 - LightningCLI's signature
        """A Trainer option of the wrong kind (`--trainer.devices abc`) is the user's error: one line, not a
        TypeError traceback from deep inside Lightning."""
        try:
            return super().instantiate_trainer(**kwargs)
        except TypeError as e:
            raise ValueError(f"trainer options: {e}") from e


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> FmnCLI:
    """The fit/validate/test/predict CLI (also used by tests and the pipeline)."""
    return FmnCLI(
        GLUETransformer,
        GLUEDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # argument errors raise (one line at the error boundary) instead of printing the whole usage
        parser_kwargs={"description": "fmn-pl: fine-tune a BERT-family model on one GLUE task.", "exit_on_error": False},
    )


# What bad input raises (unknown task, missing file or column, wrong labels, occupied output folder, an output
# that cannot be written, a full disk), besides YAML syntax errors and Lightning's configuration errors.
USER_ERRORS = (ValueError, OSError)


def is_user_error(e: BaseException) -> bool:
    """True for errors that a user's input or environment caused: shown as one line, not a traceback."""
    import argparse

    import yaml
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(e, (*USER_ERRORS, yaml.YAMLError, MisconfigurationException, argparse.ArgumentError))


def one_line(e: BaseException) -> str:
    """The first line of an error's message, with the file and line of a YAML syntax error."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = "a YAML config" if mark.name.startswith("<") else mark.name
        return f"YAML syntax error in {where} at line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    lines = [line.strip() for line in str(e).strip().splitlines()]
    if not lines:
        return type(e).__name__
    if lines[0].endswith(":"):  # jsonargparse: 'Parser key "x":' then the reasons, indented
        detail = [line for line in lines if line.startswith(("- Expected", "Given value:"))][:2] or lines[1:2]
        return " ".join([lines[0], *detail])
    return lines[0]


# Exit status of a stage stopped by a signal (the shell's 128 + signal number).
EXIT_SIGNAL = {143: "SIGTERM", 130: "SIGINT"}
_received: list[int] = []  # signals received by this process (the handlers below record them)


def _on_signal(signum: int, frame: object) -> None:
    """Record SIGTERM/SIGINT. Stop at once unless Lightning's own handler called this one after setting its flag:
    a Trainer then stops at the end of the current step and raises its SIGTERMException."""
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signal.getsignal(signum) is _on_signal:
        raise SystemExit(128 + signum)


def interrupted_status(e: BaseException | None) -> int | None:
    """143 or 130 when this process received SIGTERM or SIGINT (or `e` is how one surfaced), else None."""
    if _received:
        return 128 + _received[-1]
    if isinstance(e, KeyboardInterrupt):
        return 130
    code = getattr(e, "code", None)
    return code if isinstance(e, SystemExit) and code in EXIT_SIGNAL else None


def run_stage_command(argv: list[str], from_shell: bool = False) -> None:
    """`fmn-pl <argv>` in this process; a stage stopped by a signal ends with SystemExit(143 or 130), whatever way
    the stop surfaced (Lightning's SIGTERMException, whose exit status is 0, its `sys.exit(1)` after Ctrl-C, a
    KeyboardInterrupt), so that no caller can take an interrupted stage for a finished one."""
    try:
        _main(argv, from_shell=from_shell)
    except BaseException as e:
        if (status := interrupted_status(e)) is not None:
            raise SystemExit(status) from None
        raise
    if (status := interrupted_status(None)) is not None:  # a signal a loop absorbed without stopping
        raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point. From the shell, bad input ends with one line `fmn-pl: error: ...` and exit status 2
    (set FMN_PL_TRACEBACK=1 for the traceback), and a stage stopped by SIGTERM or SIGINT with one line and
    exit status 143 or 130; called with `argv`, errors propagate to the caller."""
    if argv is not None:
        return _main(list(argv), from_shell=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    command = " ".join(["fmn-pl", *sys.argv[1:2]])
    try:
        run_stage_command(sys.argv[1:], from_shell=True)
    except Exception as e:
        if os.environ.get("FMN_PL_TRACEBACK") or not is_user_error(e):
            raise
        print(f"fmn-pl: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:
        if e.code in EXIT_SIGNAL:
            print(f"fmn-pl: interrupted by {EXIT_SIGNAL[e.code]}: `{command}` stopped before writing its output "
                  "(nothing it writes is left half-done); run it again to redo it", file=sys.stderr)
        raise
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy a DDP process group this process still holds (Lightning leaves it open), so that its
    communication threads stop before the interpreter exits rather than during its teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _main(argv: list[str], from_shell: bool) -> None:
    if argv and argv[0] in STAGES:
        module, fn = STAGES[argv[0]][0].split(":")
        getattr(importlib.import_module(module), fn)(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        out = sys.stdout if argv else sys.stderr  # bare `fmn-pl` is a usage error: exit status 2
        print("usage: fmn-pl {fit,validate,test,predict,fisher,merge,pipeline} [options]\n", file=out)
        print("  fit, validate, test, predict   LightningCLI over the fine-tuning module (see `fmn-pl fit --help`)",
              file=out)
        for name, (_, text) in STAGES.items():
            print(f"  {name:<30} {text}", file=out)
        if not argv:
            raise SystemExit(2)
        return
    lightning_cli(None if from_shell else argv)


if __name__ == "__main__":
    main()
