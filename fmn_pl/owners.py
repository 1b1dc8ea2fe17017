"""Who made a file: a record of the process (host, boot id, pid namespace, pid, start time) that temporaries and
locks carry, and whether that process has provably ended: the same pid on another node, in another container or
after a reboot is another process, so only a record of this host, boot and pid namespace can prove it gone."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


def read_text(path: str) -> str:
    """A small system file's text, stripped; empty when it cannot be read (no /proc: not Linux)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat), "" when there is no such process:
    the same pid with another start time is another process."""
    stat_line = read_text(f"/proc/{pid}/stat")
    return stat_line.rpartition(")")[2].split()[19] if stat_line else ""


def owner() -> dict[str, Any]:
    """This process as a temporary's or a lock's record: host, boot id, pid namespace, pid, its start time, since
    when (unix time) and the command."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return {
        "host": socket.gethostname(),
        "boot_id": read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
        "pid": os.getpid(),
        "start": process_start(os.getpid()),
        "since": time.time(),
        "command": " ".join(sys.argv)[:300],
    }


def gone(record: dict[str, Any], me: dict[str, Any] | None = None) -> str | None:
    """Why the process `record` names has provably ended, or None when this process cannot tell (another host, boot
    or pid namespace: its pids mean other processes) or it still runs."""
    me = me or owner()
    pid = record.get("pid")
    if not isinstance(pid, int) or not all(me[k] and record.get(k) == me[k] for k in ("host", "boot_id", "pid_ns")):
        return None
    start = process_start(pid)
    if not start:
        return f"process {pid} on {me['host']} is gone"
    return None if start == str(record.get("start")) else f"process {pid} on {me['host']} is gone (its pid was reused)"


def describe(record: dict[str, Any]) -> str:
    """'process PID on HOST since TIME' of an owner record."""
    since = record.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"process {record.get('pid', '?')} on {record.get('host') or '?'} since {when}"


def read_record(path: Path) -> dict[str, Any]:
    """An owner record read back; {} when it is missing or unreadable (half-written, another format)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
