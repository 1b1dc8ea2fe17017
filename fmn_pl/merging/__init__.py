"""Merge methods by name. A new method is one file in this folder and one line in `METHODS`."""

from __future__ import annotations

from fmn_pl.merging.base import MergeContext, MergeMethod

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


def method_class(name: str) -> type[MergeMethod]:
    """The class registered under `name`, with an error that lists the known names."""
    import importlib

    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; expected one of: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"fmn_pl.merging.{module}"), cls)


__all__ = ["METHODS", "MergeContext", "MergeMethod", "method_class"]
