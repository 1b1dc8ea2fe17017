"""Merge methods by name. A new method is one file in this folder (or any importable module) and one line in
`METHODS`."""

from __future__ import annotations

from fmn_pl.merging.base import MergeContext, MergeMethod, Option

METHODS: dict[str, str] = {
    # name: "module:Class" (imported lazily, so one method's dependencies never slow the others)
    "average": "average:Average",
    "fmn": "fmn:FMN",
    "fisher": "fisher:Fisher",
    "task_arithmetic": "task_arithmetic:TaskArithmetic",
    "ties": "ties:Ties",
    "regmean": "regmean:RegMean",
    "adamerging": "adamerging:AdaMerging",
    "tall": "tall:Tall",
    "consensus": "consensus:Consensus",
}


def target(name: str) -> tuple[str, str]:
    """(importable module, class name) of the method registered under `name`: a bare module name lives in this
    folder; a dotted one anywhere on the path (a method of your own, e.g. "mypkg.merges:MyMethod")."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; expected one of: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return (module if "." in module else f"fmn_pl.merging.{module}"), cls


def method_class(name: str) -> type[MergeMethod]:
    """The class registered under `name`, with an error that lists the known names."""
    import importlib

    module, cls = target(name)
    return getattr(importlib.import_module(module), cls)


def method_summary(name: str) -> str:
    """The first line of method `name`'s docstring, read from its source without importing it, so that one
    method's heavy dependencies (AdaMerging's Lightning) stay out of `fmn-pl merge --help`."""
    import ast
    import importlib.util
    from pathlib import Path

    module, cls = target(name)
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"merge method {name!r}: module {module} is not importable")
    tree = ast.parse(Path(spec.origin).read_text())
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    return ((ast.get_docstring(node) if node else None) or "").strip().partition("\n")[0]


def option_lines(name: str) -> list[str]:
    """Method `name`'s summary, then its options as its `schema` declares them, one line each:
    `--method.OPTION  TYPE = DEFAULT  help`."""
    return [f"{name}: {method_summary(name)}", *(option.line() for option in method_class(name).schema)]


__all__ = [
    "METHODS",
    "MergeContext",
    "MergeMethod",
    "Option",
    "method_class",
    "method_summary",
    "option_lines",
    "target",
]
