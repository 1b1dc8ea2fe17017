"""The one place that writes files: whole or not at all (a temporary beside the target, then one rename), and
the content hashes every stage compares.

Readers never see half a file or folder; an interrupted write (SIGTERM: a cluster's time limit) leaves the
target as it was, and the leftovers of a killed one (SIGKILL) are removed by the next write of that target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator


def sha256_file(*paths: str | Path) -> str:
    """sha256 (first 16 hex digits) of the files' bytes, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def sha256_json(data: Any) -> str:
    """sha256 (first 16 hex digits) of `data` as sorted JSON (values JSON cannot hold are written with str)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _temporary(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (with its suffix, for writers that choose a format by it) for the
    caller to write; on success it replaces `path` in one rename, on error (or SIGTERM) it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, path.suffix)
    try:
        with sigterm_raises():
            yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, whole or not at all."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(
    target: str | Path, overwrite: bool = False, may_replace: Callable[[Path], bool] = lambda p: False
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` in one rename.

    An existing non-empty `target` is refused unless `overwrite` or `may_replace(target)` says yes.
    On error the temporary folder is removed and `target` is left as it was; so it is on SIGTERM (a cluster's
    time limit or preemption), which raises SystemExit(143) here while the folder is being written.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not (overwrite or may_replace(target)):
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite to replace it")
    check_writable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = _temporary(target)
    tmp.mkdir()
    with sigterm_raises():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(target: str | Path) -> None:
    """A one-line error, before any work, when `target` (a file or folder to create or replace) cannot be
    written: its nearest existing folder must be writable, and so must `target` itself if it exists."""
    target = Path(target).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if existing != target and not existing.is_dir():
        raise ValueError(f"cannot write {target}: {existing} is a file, not a folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {target}: {existing} is not writable (choose another output folder)")


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary folders a killed run (SIGKILL, power loss) left beside `target`: `.NAME.tmp-PID-*`
    and `.NAME.old-PID-*` whose process is gone. Says so on stderr, and returns them."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*-*-*"):
        kind, _, rest = p.name.removeprefix(f".{target.name}.").partition("-")
        pid = rest.partition("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            print(f"removed {p}: left by an interrupted run (process {pid} is gone)", file=sys.stderr)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit(128 + 15) so `finally`/`except` clean-ups run (main thread only;
    the previous handler, e.g. Lightning's, is restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure (format from the suffix) whole or not at all, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
