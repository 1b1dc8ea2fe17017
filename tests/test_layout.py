"""The package's shape: no import circle between fmn_pl's modules, counting the imports made by name at run
time (the CLI's command table, the merge-method registry), so that the data line checkpoint -> artifact ->
merge -> report never loops back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """{module: fmn_pl modules it imports}, from the source: import statements anywhere in a module, and the
    "package.module:name" strings a module imports by name."""
    mods = {}
    for path in (ROOT / "fmn_pl").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmn_pl"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[m].add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name.startswith("fmn_pl")}
        graph[m] |= set(re.findall(r'"(fmn_pl(?:\.\w+)+):\w+"', src))
        if m == "fmn_pl.merging":  # the registry's "module:Class" entries
            graph[m] |= {f"fmn_pl.merging.{s}" for s in re.findall(r'"(\w+):\w+"', src)}
    return {m: {d for d in deps if d in mods and d != m} for m, deps in graph.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle() -> None:
    graph = import_graph()
    assert "fmn_pl.pipeline" in graph["fmn_pl.cli"]  # the command table is followed
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_the_check_finds_a_circle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


TOY_METHOD = '''
"""Elementwise maximum of the models' tensors (a toy: what a method of your own looks like)."""

import torch

from fmn_pl.merging.base import MergeMethod


class Maximum(MergeMethod):
    """Elementwise maximum of the models' tensors."""

    name = "maximum"

    def __init__(self, floor: float = -1e9) -> None:
        """
        Args:
            floor: no merged value below this.
        """
        self.floor = floor

    def merge_tensor(self, key, models, ctx):
        out = models[0].clone()
        for j in range(1, len(models)):
            out = torch.maximum(out, models[j])
        return out.clamp_min(self.floor)
'''


def test_a_new_method_is_one_file_and_one_registry_line(
    tmp_path: Path, make_checkpoint, tiny_glue: Path, monkeypatch, capsys
) -> None:
    from safetensors.torch import load_file

    from fmn_pl.merge_cli import main
    from fmn_pl.merging import METHODS

    (tmp_path / "toy_methods").mkdir()
    (tmp_path / "toy_methods" / "__init__.py").write_text("")
    (tmp_path / "toy_methods" / "maximum.py").write_text(TOY_METHOD)  # the one file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, "maximum", "toy_methods.maximum:Maximum")  # the one registry line
    main(["--method", "maximum", "--help"])
    assert capsys.readouterr().out.splitlines()[:2] == [
        "maximum: Elementwise maximum of the models' tensors.",
        "  --method.floor          float = -1000000000.0  no merged value below this.",
    ]
    cks = [make_checkpoint(t, seed=s) for s, t in enumerate(["rte", "mrpc"])]
    out = tmp_path / "merged"
    main(
        [
            "--method",
            "maximum",
            "--checkpoints",
            *map(str, cks),
            "--output",
            str(out),
            "--evaluate",
            "false",
            "--progress",
            "false",
        ]
    )
    merged, a, b = (load_file(p / "model.safetensors") for p in (out, *cks))
    key = next(k for k in merged if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(merged[key], torch.maximum(a[key], b[key]))
