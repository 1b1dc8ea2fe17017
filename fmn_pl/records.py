"""JSON records: a JSON object read into a dataclass of typed known keys and written back as the same object.

A `Record` subclass declares the object's known keys as fields; `from_dict` checks and reads a dict, `to_dict`
gives it back. The keys' order as read is kept (so a file read and written back is byte-identical, and an absent
key stays absent), keys the record does not know are kept in `extra`. A field's type is checked as read: str,
int, float (an int is one), bool, None, Any, list[X], dict[str, X] and unions of them, and nested records, alone
or in a list or a dict by name, read in turn. A required key (a field without a default) missing, a value of the
wrong type or an object that is not one fails with one line naming the source and the dotted key (`data.seed`,
`checkpoints[0].task`). Standard library only: the checkpoint and report modules read files without torch.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")
_BASE_FIELDS = ("extra", "source_keys")


class RecordError(ValueError):
    """A JSON object that does not fit its record (not an object, a key missing, a value of the wrong type)."""


@dataclass(kw_only=True)
class Record:
    """A JSON object of typed known keys: unknown keys kept in `extra`, and the keys' order as read kept, so that
    an object read and written back is the same object, key order included."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Keys this version does not know (written by a newer fmn-pl, a script or by hand): kept on a rewrite."""
    source_keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    """The keys as read, in order (None: built here)."""

    source_name: ClassVar[str] = "the JSON object"
    """The source an error line names where `from_dict` is given none."""
    lead: ClassVar[str] = ""
    """Said after the source on an error line, before its colon (" is not a merge report")."""
    error: ClassVar[type[RecordError]] = RecordError
    """The exception a record that does not fit raises."""
    write_unset: ClassVar[bool] = False
    """Built here (not read): whether every field is written (True) or only the required ones and those set."""

    @classmethod
    def hints(cls) -> dict[str, Any]:
        """{known key: its type}, in field order."""
        return {k: hint for k, (_, hint) in _known(cls).items()}

    @classmethod
    def fail(cls, source: str | Path, detail: str) -> RecordError:
        """The one-line error for `detail` about `source` (raised by the caller)."""
        return cls.error(f"{source}{cls.lead}: {detail}")

    @classmethod
    def from_dict(cls: type[R], data: Any, source: str | Path | None = None, prefix: str = "") -> R:
        """Checked: `data` an object, the required keys present and every known key of its field's type (nested
        records read in turn); else one line naming `source` and the key (`prefix`: the nested record's path)."""
        source = cls.source_name if source is None else source
        if not isinstance(data, dict):
            where = f"key {prefix.rstrip('.')!r}" if prefix else "it"
            raise cls.fail(source, f"{where} holds a {type(data).__name__}, not an object")
        known = _known(cls)
        for key, (f, hint) in known.items():
            if key not in data and _required(f):
                raise cls.fail(source, f"it lacks key {prefix + key!r} ({_type_name(hint)})")
        kwargs = {k: cls._read(known[k][1], v, source, prefix + k) for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra, source_keys=tuple(data))

    @classmethod
    def _read(cls, hint: Any, value: Any, source: str | Path, key: str) -> Any:
        """A known key's value checked against its field's type, its records read (plain JSON as it is)."""
        if not _fits(value, hint):
            got = f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"
            raise cls.fail(source, f"key {key!r} must be {_type_name(hint)}, got {got}")
        return _convert(hint, value, source, key) if _has_records(hint) else value

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys as read in their order, then fields set since and new `extra` keys; built
        here: the fields in field order (every one with `write_unset`, else the required ones and those not at
        their default), then `extra`. Nested records are written afresh; other dicts and lists are the record's."""
        known = _known(type(self))
        read = self.source_keys or ()
        write_all = self.source_keys is None and self.write_unset
        new = [
            k
            for k, (f, _) in known.items()
            if k not in read and (write_all or _required(f) or getattr(self, k) != _default(f))
        ]
        order = [*read, *new, *(k for k in self.extra if k not in read)]
        return {k: self._value(k) for k in order if k in known or k in self.extra}

    def _value(self, key: str) -> Any:
        """A key's JSON value: a known key's field (its records as dicts), else its `extra` entry."""
        known = _known(type(self))
        if key not in known:
            return self.extra[key]
        value = getattr(self, key)
        return _write(value) if _has_records(known[key][1]) else value


_KNOWN: dict[type[Record], dict[str, tuple[Field[Any], Any]]] = {}


def _known(cls: type[Record]) -> dict[str, tuple[Field[Any], Any]]:
    """{key: (its field, its type)} of a record's known keys, in field order (worked out once per record)."""
    if cls not in _KNOWN:
        resolved = typing.get_type_hints(cls)
        _KNOWN[cls] = {f.name: (f, resolved[f.name]) for f in fields(cls) if f.name not in _BASE_FIELDS}
    return _KNOWN[cls]


def _is_record(hint: Any) -> bool:
    """Whether `hint` is a record class."""
    return isinstance(hint, type) and issubclass(hint, Record)


def _is_union(hint: Any) -> bool:
    """Whether `hint` is a union (`X | None`, `Optional[X]`, ...)."""
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


@functools.cache
def _has_records(hint: Any) -> bool:
    """Whether a value of type `hint` may hold records (`P`, `P | None`, `list[P]`, `dict[str, P]`, ...)."""
    return _is_record(hint) or any(_has_records(a) for a in typing.get_args(hint))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of a field's type (a record: any object, its keys checked as it is read; an int
    is a float, a bool is neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or args[0] is Any or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        item = args[1] if args else Any
        return isinstance(value, dict) and all(isinstance(k, str) and _fits(v, item) for k, v in value.items())
    if _is_record(hint):
        return isinstance(value, dict)
    if isinstance(value, bool) and hint is not bool:
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _convert(hint: Any, value: Any, source: str | Path, key: str) -> Any:
    """A value that fits `hint` with its records read (`key`: its dotted path, for error lines)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or not _has_records(hint):
        return value
    if _is_union(hint):
        return _convert(next(a for a in args if _fits(value, a)), value, source, key)
    if _is_record(hint):
        return hint.from_dict(value, source, f"{key}.")
    if origin is list:
        return [_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    return {k: _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}


def _write(value: Any) -> Any:
    """A value as JSON: its records as dicts (in lists and dicts too), plain JSON as it is."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_write(v) for v in value]
    if isinstance(value, dict):
        return {k: _write(v) for k, v in value.items()}
    return value


def _type_name(hint: Any, nested: bool = False) -> str:
    """`int`, `str | None`, `list[str]`, ... as a type is written; a record: "a mapping" (`dict` within a type)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_record(hint):
        return "dict" if nested else "a mapping"
    if _is_union(hint):
        return " | ".join(_type_name(a, True) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a, True) for a in args)}]" if args else origin.__name__
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint).removeprefix("typing.")


def _required(f: Field[Any]) -> bool:
    """Whether a key must be in the object: its field has no default."""
    return f.default is MISSING and f.default_factory is MISSING


def _default(f: Field[Any]) -> Any:
    """A field's default value (a fresh one where it has a factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default
