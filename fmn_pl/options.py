"""Checks on options the stages share: counts and sizes, and whether a model or data source is a local folder."""

from __future__ import annotations

import re
from pathlib import Path


def check_count(name: str, value: int | None, minimum: int = 1) -> int | None:
    """`value` if it is None or an integer >= `minimum`, else a one-line error naming the option: a negative
    cap would silently mean "all but N" in a slice, and 0 leaves nothing to compute on."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} (or null where that means all), got {value!r}")
    return value


def is_local_path(source: str) -> bool:
    """True for a folder path, false for a hub name such as `nyu-mll/glue` (owner/name, not on disk)."""
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        return True
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is None
