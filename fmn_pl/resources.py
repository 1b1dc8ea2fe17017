"""Process memory: glibc's mmap threshold (streaming merges vs. scoring) and the peak resident memory of one
stage, so that a report states what that stage used, not the high-water mark of the process that ran it."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Iterator

STREAM_MMAP_THRESHOLD = 1 << 20
SCORE_MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit


def set_mmap_threshold(size: int = STREAM_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `size` bytes: every freed block of that size or more goes back to the system.

    The merge streams at 1 MiB: by default glibc raises the threshold to the size of the blocks freed (up to
    32 MiB) and then keeps freed layer-sized tensors in its heap, so a merge streaming through hundreds of
    tensors would show about one checkpoint more resident memory than it holds. No effect (False) outside glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def scoring_memory() -> Iterator[None]:
    """Forward passes free and reallocate activations of a few MiB per layer; at the streaming threshold each
    is a fresh mmap and its page faults made CPU scoring 3x slower, so scoring reuses heap blocks instead."""
    set_mmap_threshold(SCORE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        set_mmap_threshold(STREAM_MMAP_THRESHOLD)


def reset_peak() -> bool:
    """Start a new peak-memory measurement for this process (Linux: reset VmHWM through /proc/self/clear_refs).
    False where the peak cannot be reset: `peak_rss_mb` is then the process's peak so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last `reset_peak` (Linux), else of the whole process so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
