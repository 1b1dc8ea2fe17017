"""The package's shape: no import circle between fmn_pl's modules, counting the imports made by name at run
time (the CLI's command table, the merge-method registry), so that the data line checkpoint -> artifact ->
merge -> report never loops back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
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

from fmn_pl.merging.base import MergeMethod, Option


class Maximum(MergeMethod):
    """Elementwise maximum of the models' tensors."""

    name = "maximum"
    schema = (Option("floor", "float", -1e9, "no merged value below this."),)

    def __init__(self, floor: float = -1e9) -> None:
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


TOY_KIND = '''
"""How often each label occurs in the pass's examples (a toy: what an artifact kind of your own looks like)."""

import contextlib

import torch

from fmn_pl.passes import ArtifactPass


class LabelCounts:
    def __init__(self, num_labels):
        self.examples = torch.zeros((), dtype=torch.long)
        self.counts = torch.zeros(num_labels)

    def active(self):
        return contextlib.nullcontext()

    def step(self, batch):
        labels = batch["labels"]
        self.counts += torch.bincount(labels, minlength=len(self.counts)).float()
        self.examples += len(labels)

    def tensors(self):
        return [self.examples, self.counts]

    def result(self):
        return {"counts": self.counts}

    def meta(self):
        return {}


class LabelCountsPass(ArtifactPass):
    kind = "label_counts"

    def make(self, model):
        return LabelCounts(model.config.num_labels)
'''

TOY_PRIOR_METHOD = '''
"""Each model weighted by how many examples its label-count artifact saw (a toy method that needs the toy kind)."""

from fmn_pl.merging.base import MergeMethod


class Prior(MergeMethod):
    needs = frozenset({"label_counts"})

    def merge_tensor(self, key, models, ctx):
        weights = [float(ctx.artifact(i, "label_counts").get("counts").sum()) for i in range(len(models))]
        return sum(w * models[i] for i, w in enumerate(weights)) / sum(weights)
'''


def test_a_new_artifact_kind_is_one_file_and_one_registry_line(
    tmp_path: Path, make_checkpoint, tiny_glue: Path, monkeypatch
) -> None:
    """The toy kind is computed by `fmn-pl fisher --kind`, read back checked, needed by a method (the merge finds
    and checks it) and planned by the pipeline, with no other change."""
    from safetensors.torch import load_file

    from fmn_pl.artifacts import artifact_path, load_artifact
    from fmn_pl.fisher_cli import main as fisher
    from fmn_pl.kinds import KINDS, ArtifactKind
    from fmn_pl.merge_cli import main as merge
    from fmn_pl.merging import METHODS
    from fmn_pl.pipeline_config import parse_config
    from fmn_pl.sources import read_split
    from fmn_pl.stages import plan
    from fmn_pl.tasks import get_task

    (tmp_path / "toy_kinds").mkdir()
    (tmp_path / "toy_kinds" / "__init__.py").write_text("")
    (tmp_path / "toy_kinds" / "label_counts.py").write_text(TOY_KIND)  # the one file
    (tmp_path / "toy_kinds" / "prior.py").write_text(TOY_PRIOR_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = ArtifactKind("label_counts", "labels", "toy_kinds.label_counts:LabelCountsPass")
    monkeypatch.setitem(KINDS, "label_counts", toy)  # the one registry line
    monkeypatch.setitem(METHODS, "prior", "toy_kinds.prior:Prior")

    cks = [make_checkpoint("rte", seed=0), make_checkpoint("mrpc", seed=1)]
    for ck in cks:
        common = ["--checkpoint", str(ck), "--data_dir", str(tiny_glue), "--trainer.accelerator", "cpu"]
        fisher([*common, "--kind", "labels", "--num_examples", "null", "--split", "validation"])
        assert artifact_path(ck, "label_counts") == ck / "label_counts.safetensors"
    art = load_artifact(cks[0], "label_counts")
    labels = read_split(str(tiny_glue), get_task("rte"), "validation")["label"]
    assert art.metadata["kind"] == "label_counts" and art.metadata["task"] == "rte"
    assert art.get("counts").tolist() == [float(sum(v == c for v in labels)) for c in (0, 1)]

    out = tmp_path / "merged"
    merge(["--method", "prior", "--checkpoints", *map(str, cks), "--output", str(out), "--evaluate", "false"])
    n = [float(load_artifact(c, "label_counts").get("counts").sum()) for c in cks]
    merged, a, b = (load_file(p / "model.safetensors") for p in (out, *cks))
    key = next(k for k in merged if k.endswith("encoder.layer.0.attention.self.query.weight"))
    torch.testing.assert_close(merged[key], (n[0] * a[key] + n[1] * b[key]) / sum(n))
    (cks[1] / "label_counts.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"fmn-pl fisher --checkpoint \S+ --kind labels"):
        merge(["--method", "prior", "--checkpoints", *map(str, cks), "--output", str(tmp_path / "m2")])

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        f"model: {cks[0]}\ntasks: [rte, mrpc]\ndata_dir: {tiny_glue}\noutput: {tmp_path / 'run'}\n"
        "merge:\n  methods: [{name: prior}]\n"
    )
    stages = {s.id: s for s in plan(parse_config(["--config", str(cfg)])[0])}
    assert stages["fisher/rte/label_counts"].options["kind"] == "labels"
    assert "fisher/mrpc/label_counts" in stages["merge/rte+mrpc/prior"].deps


def code_lines(node: ast.AST, src: list[str]) -> int:
    """Lines of code in a function's body: its docstring, blank lines and comment-only lines not counted (nor its
    signature, which is not part of the body)."""
    body = list(node.body)  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    if not body:
        return 0
    lines = src[body[0].lineno - 1 : node.end_lineno]  # type: ignore[attr-defined]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_size_limits() -> None:
    """No module of fmn_pl over 400 lines, no function over 60 lines of code (docstrings, blank and comment lines
    and the signature are not counted as code): the limits are checked, not remembered."""
    over = []
    for path in sorted((ROOT / "fmn_pl").rglob("*.py")):
        src = path.read_text().splitlines()
        name = path.relative_to(ROOT)
        if len(src) > 400:
            over.append(f"{name}: {len(src)} lines")
        for node in ast.walk(ast.parse("\n".join(src))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (n := code_lines(node, src)) > 60:
                over.append(f"{name}:{node.lineno} {node.name}: {n} lines of code")
    assert not over, "over the limits (400 lines a module, 60 lines of code a function):\n" + "\n".join(over)
