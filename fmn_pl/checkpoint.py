"""Task checkpoints: a Hugging Face folder plus `fmn_pl.json`, written atomically, and their fingerprints.

A task checkpoint is the contract between fine-tuning, the Fisher pass and merging:

    <dir>/config.json, model.safetensors     AutoModelForSequenceClassification.from_pretrained(<dir>)
    <dir>/tokenizer.json, ...                AutoTokenizer.from_pretrained(<dir>)
    <dir>/fmn_pl.json                        task, label names, base model, metrics, seed, examples, fingerprint
    <dir>/config.yaml                        the resolved LightningCLI config that produced it (when run by the CLI)
    <dir>/mask_fisher.safetensors, ...       artifacts of later stages, each tied to the fingerprint
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

METADATA_FILE = "fmn_pl.json"
FORMAT_VERSION = 1


def weights_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of the checkpoint's safetensors weight files, in name order."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name.startswith("model")]
    if not files:
        raise FileNotFoundError(f"{path} holds no model*.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `fmn_pl.json` of a task checkpoint, with an error that says what the folder is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"task checkpoint {path} does not exist")
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not an fmn-pl task checkpoint: {METADATA_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is not valid JSON: {e}") from e
    for key in ("task", "base_model"):
        if key not in meta:
            raise ValueError(f"{meta_file} lacks key {key!r}")
    return meta


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
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    with _sigterm_raises():
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
def _sigterm_raises() -> Iterator[None]:
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


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def check_export_target(target: str | Path, task: str, overwrite: bool = False) -> None:
    """Refuse a non-empty `target` unless it holds an export of the same `task` (or `overwrite`)."""
    target = Path(target)
    if overwrite or not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; refusing to export task {task!r} there")
    if not any(target.iterdir()):
        return
    try:
        other = read_metadata(target)["task"]
    except (FileNotFoundError, ValueError):
        other = None
    if other != task:
        what = f"an export of task {other!r}" if other else "files that are not an fmn-pl export"
        raise FileExistsError(f"{target} already holds {what}; refusing to write task {task!r} there without overwrite")


def export_checkpoint(
    model: Any,
    tokenizer: Any,
    target: str | Path,
    metadata: dict[str, Any],
    config_file: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` and `tokenizer` as a task checkpoint at `target` (atomically) and return its path.

    An existing export of the same task is replaced; one of another task is refused unless `overwrite`.
    """
    target = Path(target)
    check_export_target(target, metadata["task"], overwrite)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if config_file is not None and Path(config_file).is_file():
            shutil.copy(config_file, tmp / "config.yaml")
        meta = {"format_version": FORMAT_VERSION, **metadata, "fingerprint": weights_fingerprint(tmp)}
        write_json(tmp / METADATA_FILE, meta)
    return target
