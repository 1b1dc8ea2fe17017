"""The one place that writes files: whole or not at all (a temporary beside the target, then one rename), one
writer per output, and the content hashes every stage compares.

Readers never see half a file or folder; an interrupted write (SIGTERM: a cluster's time limit) leaves the
target as it was. Each temporary records who made it (`fmn_pl.owners`), so the leftovers of a killed write
(SIGKILL, a lost node) are removed by the next write of that target only when their maker is provably gone (or a
week old), never a live job's on another node. A folder output has one writer at a time (`output_lock`), and
everything written gets the mode the umask allows, so a team can read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from fmn_pl.owners import describe, gone, owner, read_record, read_text


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


LEFTOVER_AGE_S = 7 * 24 * 3600
"""A temporary whose maker cannot be proven gone (another host, boot or pid namespace) is removed after this long."""
OWNER_SUFFIX = ".owner"


# ---------------------------------------------------------------------------------------------- who made it


def _owner_file(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + OWNER_SUFFIX)


def _temporary(target: Path, kind: str = "tmp", suffix: str = "") -> Path:
    """A fresh name beside `target` for a temporary of this process; who makes it is recorded first, beside it in
    `<name>.owner`, so that no other process takes it for a leftover."""
    tmp = target.parent / f".{target.name}.{kind}-{os.getpid()}-{time.monotonic_ns()}{suffix}"
    _owner_file(tmp).write_text(json.dumps(owner()))
    return tmp


def _discard(p: Path) -> None:
    """Remove a temporary file or folder and its owner record."""
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    _owner_file(p).unlink(missing_ok=True)


def remove_leftovers(target: Path, max_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-*`, `.NAME.old-*`) a killed run (SIGKILL, a lost node) left beside
    `target` whose maker is provably gone (`gone`: this host, boot and pid namespace, and its pid gone or reused)
    or older than `max_age_s`; any other is named on stderr and left. Returns the removed ones."""
    removed, me, prefix = [], owner(), f".{target.name}."
    for p in sorted(target.parent.glob(glob.escape(prefix) + "*-*")):
        made = p.with_name(p.name.removesuffix(OWNER_SUFFIX))
        if made.name[len(prefix) :].partition("-")[0] not in ("tmp", "old") or (made != p and made.exists()):
            continue  # not a temporary, or the record of one that is handled with it
        if not p.exists():
            continue  # a record removed with its temporary in this pass
        record = read_record(_owner_file(made))
        if all(record.get(k) == me[k] for k in ("host", "boot_id", "pid_ns", "pid", "start")):
            continue  # this process's own
        why = gone(record, me) if record else None
        with contextlib.suppress(OSError):
            age = time.time() - (record.get("since") or p.lstat().st_mtime)
            why = why or (f"made {age / 86400:.1f} days ago" if age > max_age_s else None)
        if why is None:
            held = describe(record) if record else "a process it does not record"
            print(f"left {made}: made by {held}, not provably gone (remove it once that run is over)", file=sys.stderr)
        elif made != p:  # a record whose temporary never came or is removed already: no news
            _discard(made)
        else:
            _discard(made)
            print(f"removed {made}: left by an interrupted run ({why})", file=sys.stderr)
            removed.append(made)
    return removed


# ---------------------------------------------------------------------------------------------- one writer


class OutputBusy(OSError):
    """Another process is writing the output (it holds its lock)."""


_HELD: set[Path] = set()  # lock files this process holds (re-entered, not locked twice)


def lock_file(target: str | Path, inside: bool = False) -> Path:
    """The lock of `target`: `.NAME.lock` beside it, or `.fmn-pl.lock` in it (`inside`: a folder that stays)."""
    target = Path(target).expanduser().absolute()
    return target / ".fmn-pl.lock" if inside else target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | Path, wait: bool = False, inside: bool = False, hold: bool = True) -> Iterator[None]:
    """One writer per output: within the block this process holds an advisory lock (flock) on `lock_file(target)`,
    which records it (`owner`). Another holder is refused at once in one line naming it, or waited for (`wait`).
    Re-entrant within a process; the file goes on release. `hold=False`: nothing (another rank holds it)."""
    path = lock_file(target, inside)
    if not hold or path in _HELD:
        yield
        return
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, Path(target), wait)
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        if fd is not None:
            path.unlink(missing_ok=True)  # while held: who opened it meanwhile sees it is gone and opens a new one
            os.close(fd)


def _lock(path: Path, target: Path, wait: bool) -> int | None:
    """Lock `path` (made if missing) and record this process in it; None where the file system has no locks."""
    said = False
    while True:
        try:
            fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # another user's lock file: read-only is enough to test it and to read its holder
            fd, writable = os.open(path, os.O_RDONLY), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(_record_of(fd)) if _record_of(fd) else "another process"
            os.close(fd)
            if not wait:
                raise OutputBusy(
                    f"{target} is being written by {holder} (lock {path}); wait for it with --wait true"
                ) from None
            if not said:
                print(f"waiting for {holder}, which is writing {target}", file=sys.stderr)
                said = True
            time.sleep(0.5)
            continue
        except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror}): other writers are not kept out", file=sys.stderr)
            return None
        st = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino) or not writable:
            if current is not None and not writable:
                path.unlink(missing_ok=True)  # another user's, left by a killed run (we got its lock): stale
            os.close(fd)
            continue  # the holder let go and removed it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner()).encode(), 0)
        return fd


def _record_of(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------- whole or not at all


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (with its suffix, for writers that choose a format by it) for the
    caller to write; on success it replaces `path` in one rename (with the mode the umask allows), on error (or
    SIGTERM) it is removed. A full disk is one line naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = _temporary(path, suffix=path.suffix)
    try:
        with sigterm_raises(), naming_disk_full(path):
            yield tmp
        team_readable(tmp)
        tmp.replace(path)
    finally:
        _discard(tmp)


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
    target: str | Path,
    overwrite: bool = False,
    may_replace: Callable[[Path], bool] = lambda p: False,
    wait: bool = False,
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` in one rename, its files
    given the mode the umask allows. This process is `target`'s one writer meanwhile (`output_lock`, `wait`).

    An existing non-empty `target` is refused unless `overwrite` or `may_replace(target)` says yes; so is one that
    appeared (or changed) while the folder was written. On error the temporary folder is removed and `target` is
    left as it was; so it is on SIGTERM (a cluster's time limit or preemption), which raises SystemExit(143) here
    while the folder is being written.
    """
    target = Path(target)
    with output_lock(target, wait):
        before = _occupant(target)
        if before is not None and not (overwrite or may_replace(target)):
            raise FileExistsError(f"{target} already exists and is not empty; pass overwrite to replace it")
        remove_leftovers(target)
        tmp = _temporary(target)
        tmp.mkdir()
        try:
            with sigterm_raises(), naming_disk_full(target):
                yield tmp
            now = _occupant(target)
            if now is not None and now != before and not (overwrite or may_replace(target)):
                raise FileExistsError(
                    f"{target} appeared while this run wrote it (another writer?): left as it is, this run's output "
                    "discarded; pass overwrite to replace it"
                )
            team_readable(tmp)
            _swap_in(tmp, target)
        except BaseException:
            _discard(tmp)
            raise
        _owner_file(tmp).unlink(missing_ok=True)


def _occupant(target: Path) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of a non-empty `target`; None when it is missing or an empty folder."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return None
    if target.is_dir() and not any(target.iterdir()):
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the folder `tmp` to `target`, the old `target` moved aside first and removed after."""
    old = None
    if target.exists():
        old = _temporary(target, "old")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        _discard(old)


# ---------------------------------------------------------------------------------------------- modes and space


def umask() -> int:
    """This process's umask, read without changing it (/proc/self/status; elsewhere set and restored at once)."""
    for line in read_text("/proc/self/status").splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def team_readable(path: Path) -> None:
    """Give `path` and, for a folder, everything in it the mode the umask allows (0644 files and 0755 folders
    under 022, 0664/0775 under 002), as a plain open or mkdir would: some writers (safetensors' save_file, under
    `save_pretrained`) make 0600 files that the rest of a team cannot read."""
    allowed = ~umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        mode = p.lstat().st_mode
        if not stat.S_ISLNK(mode):
            os.chmod(p, (0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666) & allowed)


class DiskFull(OSError):
    """No space left (ENOSPC, or a quota: EDQUOT) for a named target: one line, with the bytes needed when known."""

    def __init__(self, target: Path, needed: int | None = None) -> None:
        self.target, self.needed = Path(target), needed
        need = f", {needed:,} needed" if needed is not None else ""
        super().__init__(f"no space left on the device of {target}: {_free_bytes(self.target):,} bytes free{need}")


def _free_bytes(target: Path) -> int:
    existing = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    return shutil.disk_usage(existing if existing.is_dir() else existing.parent).free


@contextlib.contextmanager
def naming_disk_full(target: Path, needed: int | None = None) -> Iterator[None]:
    """Within the block a full disk or quota raises `DiskFull` naming `target` (with `needed`, or what an inner
    block knew) instead of a bare `[Errno 28]`."""
    try:
        yield
    except OSError as e:
        if isinstance(e, DiskFull) or e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(target, needed if needed is not None else getattr(e, "needed", None)) from e
        raise


def check_space(target: Path, needed: int) -> None:
    """Refuse at once, in one line, to write `needed` bytes at `target` on a device with fewer free."""
    if _free_bytes(target) < needed:
        raise DiskFull(target, needed)


def check_writable(target: str | Path) -> None:
    """A one-line error, before any work, when `target` (a file or folder to create or replace) cannot be
    written: a file is created (and removed) in its nearest existing folder, which must be a folder. A real
    write, not `os.access`, which says yes to root everywhere (read-only mounts, root-squashed NFS)."""
    target = Path(target).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if existing != target and not existing.is_dir():
        raise ValueError(f"cannot write {target}: {existing} is a file, not a folder")
    folder = existing if existing.is_dir() else existing.parent
    probe = folder / f".fmn-pl-probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"cannot write {target}: {folder} is not writable ({e.strerror}); choose another output folder"
        ) from None


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
