"""Registry names as jsonargparse class names: this module holds one class per registered method, named by its
registry name, so that the parsers resolve `--method fmn` and `method: {class_path: fmn}` themselves (jsonargparse
finds a class by its name among the subclasses of the field's type). Nothing else is defined here, so that no
method name can collide with one."""

from __future__ import annotations


def name_methods() -> None:
    """(Re)create the named class of every method in `METHODS` (jsonargparse's `class_from_function`: instantiating
    it returns the method's own class). A method whose module cannot be imported gets no name: asking for it
    fails with the registered names."""
    import sys

    from jsonargparse import class_from_function

    from fmn_pl.merging import METHODS, method_class

    module = sys.modules[__name__]
    for name in METHODS:
        try:
            cls = method_class(name)
        except Exception:  # noqa: BLE001 - a broken method module must not break the others' CLI
            continue
        if getattr(module, name, None) is not None and getattr(module, name).wrapped_function is not cls:
            delattr(module, name)  # re-registered under the same name (tests): the new class
        class_from_function(cls, func_return=cls, name=name)
