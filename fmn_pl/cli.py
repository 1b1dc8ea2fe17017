"""`fmn-pl`: LightningCLI for fit/validate/test/predict (`fmn_pl.fit`), plus the fisher, merge and pipeline stages.

Everything heavy is imported when a command needs it, so `--help` and argument errors come back at once."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Sequence

from fmn_pl.cores import share_cores
from fmn_pl.errors import (
    EXIT_SIGNAL,
    interrupted_line,
    is_user_error,
    on_signal,
    one_line,
    renamed_hint,
    run_interruptible,
)
from fmn_pl.options import check_config_files

# Stages that are not Trainer methods: name -> (module:function taking argv, one-line help).
STAGES = {
    "fisher": ("fmn_pl.fisher_cli:main", "compute a mask-node (or full) Fisher artifact beside a task checkpoint"),
    "merge": ("fmn_pl.merge_cli:main", "merge task checkpoints, evaluate every task with its own head, report"),
    "pipeline": ("fmn_pl.pipeline:main", "fine-tune, Fisher, merge and report from one config, resumably"),
}


def run_stage_command(argv: list[str], from_shell: bool = False) -> None:
    """`fmn-pl <argv>` in this process, an interrupt ending in SystemExit(143 or 130) (`run_interruptible`)."""
    run_interruptible(lambda: _main(argv, from_shell=from_shell))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: `fmn-pl` from the shell (`shell`, with SIGTERM/SIGINT handled, and threads that do not spin on
    shared cores, `share_cores`, set before torch loads); called with `argv`, the command runs in this process
    and its errors propagate to the caller."""
    if argv is not None:
        return _main(list(argv), from_shell=False)
    share_cores()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    shell(sys.argv[1:])


def shell(argv: list[str]) -> None:
    """`fmn-pl ARGV` as the shell sees it, the one error boundary of every command: bad input ends with one line
    `fmn-pl COMMAND: error: ...` and exit status 2 (set FMN_PL_TRACEBACK=1 for the traceback), a stage stopped
    by SIGTERM or SIGINT with one line and exit status 143 or 130."""
    command = " ".join(["fmn-pl", *argv[:1]]) if argv and not argv[0].startswith("-") else "fmn-pl"
    quiet_logs()
    try:
        run_stage_command(argv, from_shell=True)
    except Exception as e:
        if os.environ.get("FMN_PL_TRACEBACK") or not is_user_error(e):
            raise
        line = one_line(e)
        print(f"{command}: error: {line}{renamed_hint(line)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:
        if e.code in EXIT_SIGNAL:
            print(interrupted_line(command, e.code), file=sys.stderr)
        raise
    finally:
        close_process_group()


def quiet_logs() -> None:
    """Keep stage logs to what a user can act on: drop Lightning's product tips, its "Seed set to" (the seed is
    in the config each output carries) and the deprecation warnings
    raised inside libraries, and keep transformers to errors and without weight-loading bars (`load_model`
    checks what it loads itself). Set before transformers is imported; a user's own settings win."""
    import logging
    import warnings

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(("\N{ELECTRIC LIGHT BULB} Tip", "Seed set to"))

    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).addFilter(Drop())
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter")  # the pipeline's in-process stages
    warnings.filterwarnings("ignore", message=r".*`tensorboardX` has been removed")  # it logs to CSV instead
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)  # torch
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def close_process_group() -> None:
    """Destroy a DDP process group this process still holds (Lightning leaves it open), so that its
    communication threads stop before the interpreter exits rather than during its teardown."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and `--help` stays free of torch)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _main(argv: list[str], from_shell: bool) -> None:
    check_config_files(argv)
    if argv and argv[0] in STAGES:
        module, fn = STAGES[argv[0]][0].split(":")
        getattr(importlib.import_module(module), fn)(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        out = sys.stdout if argv else sys.stderr  # bare `fmn-pl` is a usage error: exit status 2
        print("usage: fmn-pl {fit,validate,test,predict,fisher,merge,pipeline} [options]\n", file=out)
        print(
            "  fit, validate, test, predict   LightningCLI over the fine-tuning module (see `fmn-pl fit --help`)",
            file=out,
        )
        for name, (_, text) in STAGES.items():
            print(f"  {name:<30} {text}", file=out)
        if not argv:
            raise SystemExit(2)
        return
    from fmn_pl.fit import lightning_cli

    lightning_cli(None if from_shell else argv)


if __name__ == "__main__":
    main()
