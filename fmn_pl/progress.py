"""Progress inside a pipeline stage: one line on the pipeline's console that the running stage updates (fit: epoch,
step, loss, ETA; a Fisher pass: examples; a merge: tensors and candidates), while the stage's own output, Lightning's
included, goes to its log. On a terminal the line is rewritten in place; in a log or pipe it is a line at most every
`LOG_INTERVAL_S`. Outside a pipeline stage every call here does nothing."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, TextIO

LOG_INTERVAL_S = 30.0
TERMINAL_INTERVAL_S = 0.2


@dataclass
class Console:
    """Where a stage's progress goes: the pipeline's own stdout as it was when the stage began."""

    stream: TextIO
    prefix: str
    tty: bool
    last: float
    """When the last progress line was shown (or the stage began)."""
    shown: bool = False


_console: Console | None = None


def stage_line(prefix: str, text: str) -> str:
    """The line that announces a stage (`prefix: text`); the stage's progress goes to this process's stdout from
    now on (it is the console: the stage's own output is sent to its log only once it runs)."""
    global _console
    _console = Console(sys.stdout, prefix, _isatty(sys.stdout), time.monotonic())
    return f"{prefix}: {text}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _active() -> Console | None:
    """The console while a stage runs in this process: its output then goes elsewhere (the stage's log)."""
    c = _console
    return c if c is not None and sys.stdout is not c.stream else None


def show(text: str) -> None:
    """Show `text` as the stage's progress: in place on a terminal, as a line at most every `LOG_INTERVAL_S` in a
    log (the first after that long: a short stage adds no line)."""
    c = _active()
    now = time.monotonic()
    if c is None or now - c.last < (TERMINAL_INTERVAL_S if c.tty else LOG_INTERVAL_S):
        return
    c.last = now
    if c.tty:
        width = _columns(c.stream)
        _write(c, "\r\x1b[K" + f"{c.prefix}: {text}"[: width - 1])
        c.shown = True
    else:
        _write(c, f"{c.prefix}: {text}\n")


def clear() -> None:
    """Remove the progress line from a terminal (when the loop that showed it ends)."""
    c = _active() or _console
    if c is not None and c.shown:
        _write(c, "\r\x1b[K")
        c.shown = False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 120  # 0: a terminal that never set its size
    except (OSError, ValueError):
        return 120


def _write(c: Console, text: str) -> None:
    try:
        c.stream.write(text)
        c.stream.flush()
    except (OSError, ValueError):  # the console went away (a closed pipe): progress is not worth failing for
        pass


def tee(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log`, also showing each line as the stage's progress (a merge's candidates screened and scored)."""

    def both(line: str) -> None:
        log(line)
        show(line)

    return both


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far, as m:ss (or h:mm:ss)."""
    if done <= 0 or total <= done:
        return "0:00" if total <= done else "?"
    left = int(elapsed / done * (total - done))
    h, m, s = left // 3600, left // 60 % 60, left % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def lightning_callback() -> Any:
    """A Lightning callback that shows a Trainer's progress as the stage's line: fit: epoch e/E, step s/S, loss, ETA;
    a validation pass (the Fisher's): examples n/N, ETA. Lightning is imported here, not with this module."""
    return _callback_class()()


@functools.cache
def _callback_class() -> type:
    import lightning as L

    class StageProgress(L.Callback):
        """Feeds `show` from the Trainer's loops; clears the line when the Trainer is done."""

        def __init__(self) -> None:
            self.start, self.examples = time.monotonic(), 0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.monotonic()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            total, step = trainer.estimated_stepping_batches, trainer.global_step
            show(
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, step {step}/{total}"
                + (f", loss {float(loss):.4f}" if loss is not None else "")
                + f", ETA {eta(step, total, time.monotonic() - self.start)}"
            )

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.state.fn != "fit":
                self.start, self.examples = time.monotonic(), 0

        def on_validation_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            if trainer.state.fn == "fit":
                return
            self.examples += len(batch["labels"]) if isinstance(batch, Mapping) and "labels" in batch else 1
            loaders = trainer.val_dataloaders
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            total = sum(len(dl.dataset) for dl in loaders if hasattr(dl, "dataset")) or self.examples
            show(f"examples {self.examples}/{total}, ETA {eta(self.examples, total, time.monotonic() - self.start)}")

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            clear()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            clear()

    return StageProgress
