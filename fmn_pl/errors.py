"""How a command ends: bad input as one line (`is_user_error`, `one_line`), and a stop by SIGTERM or SIGINT as
exit status 143 or 130 whatever way it surfaced (`run_interruptible`), for the CLI and the pipeline alike."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

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


@contextlib.contextmanager
def trainer_options() -> Iterator[None]:
    """Building a Trainer: an option of the wrong kind (`--trainer.devices abc`) is the user's error, one line,
    not a TypeError traceback from deep inside Lightning."""
    try:
        yield
    except TypeError as e:
        raise ValueError(f"trainer options: {e}") from e


def one_line(e: BaseException) -> str:
    """The error's message on one line: a YAML syntax error (also one wrapped by the option parser) with its file,
    line and column; a parser message's nested `key:` lines joined up to the reason."""
    cause: BaseException | None = e
    while cause is not None and getattr(cause, "problem_mark", None) is None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        mark, problem = vars(cause)["problem_mark"], vars(cause).get("problem")  # a yaml.MarkedYAMLError
        where = "a YAML config" if mark.name.startswith("<") else mark.name
        return f"YAML syntax error in {where} at line {mark.line + 1}, column {mark.column + 1}: {problem}"
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


# Options renamed when each stage got one typed config: an error that names an old one says its new name.
RENAMED = {
    "max_eval_samples": "eval.max_samples, in a pipeline merge.eval.max_samples; fit.max_eval_samples stays",
    "selection_split": "selection.split",
    "selection_samples": "selection.samples",
    "selection_screen": "selection.screen",
    "selection_finalists": "selection.finalists",
    "selection_precision": "selection.precision",
    "compare_average": "eval.compare_average",
    "cache": "eval.cache",
    "args": "typed options: merge.selection, merge.eval, merge.batch_size, fisher.<kind>.<option>, "
    "fit.accumulate_grad_batches, fit.gradient_clip_val",
}


def renamed_hint(message: str) -> str:
    """` (X is now Y)` when a parser's error names an option this version renamed, else empty."""
    import re

    for old, new in RENAMED.items():
        if re.search(rf"(--|'|\w\.){old}\b", message):  # --old, 'old', merge.old
            return f" ({old} is now {new})"
    return ""


# Exit status of a stage stopped by a signal (the shell's 128 + signal number).
EXIT_SIGNAL = {143: "SIGTERM", 130: "SIGINT"}
_received: list[int] = []  # signals received by this process (the handlers below record them)
_saved: list[Path] = []  # resumable checkpoints saved on SIGTERM (`saved_for_resume`)


def saved_for_resume(path: Path) -> None:
    """Record that a fit stopped by SIGTERM saved `path`, which `--ckpt_path last` resumes (`interrupted_line`)."""
    _saved.append(path)


def interrupted_line(command: str, status: int) -> str:
    """The one line a command stopped by a signal ends with: a standalone fit that saved a checkpoint says how to
    resume it; any other command is redone (or, the pipeline, resumed) by running it again."""
    head = f"fmn-pl: interrupted by {EXIT_SIGNAL[status]}: `{command}` stopped before writing its output"
    if _saved and command == "fmn-pl fit":
        return f"{head}; saved {_saved[-1]}: resume it with the same command and --ckpt_path last"
    return f"{head} (nothing it writes is left half-done); run it again to redo it"


def on_signal(signum: int, frame: object) -> None:
    """Record SIGTERM/SIGINT. Stop at once unless Lightning's own handler called this one after setting its flag:
    a Trainer then stops at the end of the current step and raises its SIGTERMException."""
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signal.getsignal(signum) is on_signal:
        raise SystemExit(128 + signum)


def interrupted_status(e: BaseException | None) -> int | None:
    """143 or 130 when this process received SIGTERM or SIGINT (or `e` is how one surfaced), else None."""
    if _received:
        return 128 + _received[-1]
    if isinstance(e, KeyboardInterrupt):
        return 130
    code = getattr(e, "code", None)
    return code if isinstance(e, SystemExit) and code in EXIT_SIGNAL else None


def run_interruptible(command: Callable[[], object]) -> None:
    """Run `command` in this process; one stopped by a signal ends with SystemExit(143 or 130), whatever way the
    stop surfaced (Lightning's SIGTERMException, whose exit status is 0, its `sys.exit(1)` after Ctrl-C, a
    KeyboardInterrupt), so that no caller can take an interrupted stage for a finished one."""
    try:
        command()
    except BaseException as e:
        if (status := interrupted_status(e)) is not None:
            raise SystemExit(status) from None
        raise
    if (status := interrupted_status(None)) is not None:  # a signal a loop absorbed without stopping
        raise SystemExit(status)
