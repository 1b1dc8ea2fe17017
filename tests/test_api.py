"""The public API (`fmn_pl.__all__`): every name resolves from its module on first use, `import fmn_pl` alone
loads no torch, and an unknown name is an AttributeError."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import fmn_pl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", fmn_pl.__all__)
def test_every_public_name_resolves(name: str) -> None:
    module, attr = fmn_pl._API[name].split(":")
    assert getattr(fmn_pl, name) is getattr(importlib.import_module(module), attr)
    assert name in fmn_pl.__dict__  # kept: resolved once


def test_all_the_table_and_the_type_checking_imports_agree() -> None:
    """`__all__`, the lazy table and the imports mypy reads name the same things."""
    assert fmn_pl.__all__ == list(fmn_pl._API)
    tree = ast.parse((ROOT / "fmn_pl" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    imports = {f"{n.module}:{a.name}" for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imports == set(fmn_pl._API.values())


def test_import_fmn_pl_loads_no_torch() -> None:
    """A subprocess: this one has torch loaded already."""
    code = "import fmn_pl, sys; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'fmn_pl' has no attribute 'no_such_name'"):
        fmn_pl.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from fmn_pl import no_such_name  # noqa: F401
    assert not hasattr(fmn_pl, "_private_name")


def test_submodules_still_import_by_name() -> None:
    """`from fmn_pl import bundle`: the lazy names do not hide the package's modules."""
    from fmn_pl import bundle

    assert bundle.__name__ == "fmn_pl.bundle"
