"""The package's shape: no import circle between fmn_pl's modules, counting the imports made by name at run
time (the CLI's command table, the merge-method registry), so that the data line checkpoint -> artifact ->
merge -> report never loops back."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """{module: fmn_pl modules it imports}, from the source: import statements anywhere in a module, and the
    "package.module:name" strings a module imports by name. The package itself imports its public names on first
    use only (`fmn_pl.__getattr__`): it has no edges, and `from fmn_pl import name` imports the name's module."""
    import fmn_pl

    mods = {}
    for path in (ROOT / "fmn_pl").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        if m == "fmn_pl":
            continue
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmn_pl"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if node.module == "fmn_pl" and alias.name in fmn_pl._API:
                        sub = fmn_pl._API[alias.name].split(":")[0]
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
    def __init__(self, num_labels, pseudo_count):
        self.examples = torch.zeros((), dtype=torch.long)
        self.counts = torch.full((num_labels,), float(pseudo_count))

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

    def __init__(self, checkpoint_dir, pseudo_count=0.0, metadata=None):  # the kind's own option
        super().__init__(checkpoint_dir, metadata)
        self.pseudo_count = pseudo_count

    def make(self, model):
        return LabelCounts(model.config.num_labels, self.pseudo_count)
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


def register_toy_kind(tmp_path: Path, monkeypatch) -> None:
    """The toy kind's one file (and a toy method that needs it) on the path, and its one registry line, with the
    option of its own it declares."""
    from fmn_pl.kinds import KINDS, ArtifactKind, KindOption
    from fmn_pl.merging import METHODS

    (tmp_path / "toy_kinds").mkdir()
    (tmp_path / "toy_kinds" / "__init__.py").write_text("")
    (tmp_path / "toy_kinds" / "label_counts.py").write_text(TOY_KIND)  # the one file
    (tmp_path / "toy_kinds" / "prior.py").write_text(TOY_PRIOR_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = ArtifactKind(  # the one registry line
        "label_counts",
        "labels",
        "toy_kinds.label_counts:LabelCountsPass",
        options=(KindOption("pseudo_count", Optional[float], help="Added to every label's count."),),
    )
    monkeypatch.setitem(KINDS, "label_counts", toy)
    monkeypatch.setitem(METHODS, "prior", "toy_kinds.prior:Prior")


def fresh_import(name: str, monkeypatch) -> ModuleType:
    """Module `name` imported anew for this test (the imported one is back after it): what a process whose registry
    has the test's entries from the start imports, its classes made from them."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # the module's own annotations resolve in it
    spec.loader.exec_module(module)
    return module


def test_a_new_artifact_kind_is_one_file_and_one_registry_line(
    tmp_path: Path, make_checkpoint, tiny_glue: Path, monkeypatch
) -> None:
    """The toy kind is computed by `fmn-pl fisher --kind`, its own option from `--pseudo_count` reaching its pass
    (and refused for another kind), read back checked, needed by a method (the merge finds and checks it) and
    planned by the pipeline, with no other change."""
    from safetensors.torch import load_file

    from fmn_pl.artifacts import artifact_path, load_artifact
    from fmn_pl.fisher_cli import main as fisher
    from fmn_pl.merge_cli import main as merge
    from fmn_pl.pipeline_config import parse_config
    from fmn_pl.sources import read_split
    from fmn_pl.stages import plan
    from fmn_pl.tasks import get_task

    register_toy_kind(tmp_path, monkeypatch)
    cks = [make_checkpoint("rte", seed=0), make_checkpoint("mrpc", seed=1)]
    for ck in cks:
        common = ["--checkpoint", str(ck), "--data_dir", str(tiny_glue), "--trainer.accelerator", "cpu"]
        fisher([*common, "--kind", "labels", "--num_examples", "null", "--split", "validation", "--pseudo_count=0.5"])
        assert artifact_path(ck, "label_counts") == ck / "label_counts.safetensors"
    art = load_artifact(cks[0], "label_counts")
    labels = read_split(str(tiny_glue), get_task("rte"), "validation")["label"]
    assert art.metadata["kind"] == "label_counts" and art.metadata["task"] == "rte"
    assert art.get("counts").tolist() == [0.5 + sum(v == c for v in labels) for c in (0, 1)]
    with pytest.raises(ValueError, match="pseudo_count does not apply to kind 'mask' \\(an option of kind labels\\)"):
        fisher([*common, "--kind", "mask", "--pseudo_count", "1"])

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


def test_a_new_kinds_option_is_a_pipeline_option(tmp_path: Path, monkeypatch) -> None:
    """The toy kind's own option is `fisher.label_counts.pseudo_count` of a pipeline config (YAML or flag) beside
    the options every kind has, and no option of another kind's section. The pipeline's config classes are made
    from the registry when `fmn_pl.pipeline_config` is imported, so the test imports it after registering."""
    register_toy_kind(tmp_path, monkeypatch)
    pipeline_config = fresh_import("fmn_pl.pipeline_config", monkeypatch)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        "tasks: [rte, mrpc]\nmerge:\n  methods: [{name: prior}]\n"
        "fisher:\n  label_counts: {pseudo_count: 0.5, num_examples: 16}\n"
    )
    parsed, _ = pipeline_config.parse_config(["--config", str(cfg)])
    options = pipeline_config.artifact_options(parsed, "label_counts")
    assert (options.pseudo_count, options.num_examples, options.seed) == (0.5, 16, 0)
    parsed, _ = pipeline_config.parse_config(["--config", str(cfg), "--fisher.label_counts.pseudo_count", "2"])
    assert pipeline_config.artifact_options(parsed, "label_counts").pseudo_count == 2.0
    assert not hasattr(pipeline_config.artifact_options(parsed, "mask_fisher"), "pseudo_count")
    with pytest.raises(ArgumentError, match="pseudo_count"):
        pipeline_config.parse_config(["--config", str(cfg), "--fisher.mask_fisher.pseudo_count", "2"])


def test_run_fisher_takes_its_config_alone(monkeypatch) -> None:
    """`run_fisher(config)` has no parameter of a kind: the kinds' options are `FisherConfig` fields made from their
    registry lines, one per name, None (not set) by default; two kinds declaring one name with two types fail
    when the fields are made."""
    import inspect
    from dataclasses import fields

    from fmn_pl.fisher_cli import run_fisher
    from fmn_pl.kinds import KINDS, ArtifactKind, FisherConfig, KindOption, fisher_config_class

    assert list(inspect.signature(run_fisher).parameters) == ["config"]
    declared = {o.name for kind in KINDS.values() for o in kind.options}
    assert declared == {"aggregation", "labels", "include_padding"}
    assert {f.name: f.default for f in fields(FisherConfig) if f.name in declared} == dict.fromkeys(declared)
    assert fisher_config_class() is FisherConfig
    clash = ArtifactKind("clash", "clash", "toy:Pass", options=(KindOption("labels", Optional[int]),))
    monkeypatch.setitem(KINDS, "clash", clash)
    with pytest.raises(TypeError, match="declare option 'labels' with two types"):
        fisher_config_class()


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
