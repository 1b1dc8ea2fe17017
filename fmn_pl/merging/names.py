"""Registry names as jsonargparse class names: this module holds one class per registered method, named by its
registry name, so that the parsers resolve `--method fmn` and `method: {class_path: fmn}` themselves (jsonargparse
finds a class by its name among the subclasses of the field's type). Only its functions and imports share the module:
a method registered under one of their names is refused."""

from __future__ import annotations

from typing import Any


def name_methods() -> None:
    """(Re)create the named class of every method in `METHODS`: a bare subclass, so jsonargparse reads the method's
    own `__init__` (its options, with their types). A method whose module cannot be imported gets no name: asking
    for it fails with the registered names."""
    import sys

    from fmn_pl.merging import METHODS, method_class

    module = sys.modules[__name__]
    for name in METHODS:
        try:
            cls = method_class(name)
        except Exception:  # noqa: BLE001 - a broken method module must not break the others' CLI
            continue
        taken = getattr(module, name, None)
        if taken is not None and not hasattr(taken, "registered"):
            raise ValueError(f"merge method name {name!r} is taken by {__name__}.{name}; register it under another")
        if getattr(taken, "registered", None) is not cls:
            setattr(module, name, type(name, (cls,), {"__module__": __name__, "__qualname__": name, "registered": cls}))


def own_class(method: Any) -> Any:
    """A method the parser built from its named class, as an instance of the method's own class (the named class
    adds nothing: it only carries the name)."""
    registered = type(method).__dict__.get("registered")
    if registered is not None:
        method.__class__ = registered
    return method
