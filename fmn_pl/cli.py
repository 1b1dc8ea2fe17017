"""`fmn-pl`: LightningCLI for fit/validate/test/predict (`fmn_pl.fit`), plus the fisher, merge and pipeline stages.

Everything heavy is imported when a command needs it, so `--help` and argument errors come back at once."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Sequence

# Stages that are not Trainer methods: name -> (module:function taking argv, one-line help).
STAGES = {
    "fisher": ("fmn_pl.fisher:main", "compute a mask-node (or full) Fisher artifact beside a task checkpoint"),
    "merge": ("fmn_pl.merge:main", "merge task checkpoints, evaluate every task with its own head, report"),
    "pipeline": ("fmn_pl.pipeline:main", "fine-tune, Fisher, merge and report from one config, resumably"),
}


# What bad input raises (unknown task, missing file or column, wrong labels, occupied output folder, an output
# that cannot be written, a full disk), besides YAML syntax errors and Lightning's configuration errors.
USER_ERRORS = (ValueError, OSError)


def is_user_error(e: BaseException) -> bool:
    """True for errors that a user's input or environment caused: shown as one line, not a traceback."""
    import argparse

    import yaml

    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")  # not imported: not raised
    config_errors = (lightning_errors.MisconfigurationException,) if lightning_errors else ()
    return isinstance(e, (*USER_ERRORS, yaml.YAMLError, *config_errors, argparse.ArgumentError))


def one_line(e: BaseException) -> str:
    """The error's message on one line: a YAML syntax error (also one wrapped by the option parser) with its file,
    line and column; a parser message's nested `key:` lines joined up to the reason."""
    cause: BaseException | None = e
    while cause is not None and getattr(cause, "problem_mark", None) is None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        mark = cause.problem_mark  # type: ignore[attr-defined]
        where = "a YAML config" if mark.name.startswith("<") else mark.name
        return f"YAML syntax error in {where} at line {mark.line + 1}, column {mark.column + 1}: {cause.problem}"
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].endswith(":"):  # jsonargparse: 'Parser key "x":' then the reasons, indented
        detail = [line for line in lines if line.startswith(("- Expected", "Given value:"))][:2]
        if not detail:  # 'Parser key "method":', 'Problem with given class_path ...:', "Option 'x' is not accepted"
            n = next((i for i, line in enumerate(lines) if not line.endswith(":")), len(lines) - 1)
            detail = lines[1 : n + 1]
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
    """Entry point: `fmn-pl` from the shell (`shell`, with SIGTERM/SIGINT handled); called with `argv`, the
    command runs in this process and its errors propagate to the caller."""
    if argv is not None:
        return _main(list(argv), from_shell=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
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
        print(f"{command}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:
        if e.code in EXIT_SIGNAL:
            print(
                f"fmn-pl: interrupted by {EXIT_SIGNAL[e.code]}: `{command}` stopped before writing its output "
                "(nothing it writes is left half-done); run it again to redo it",
                file=sys.stderr,
            )
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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
