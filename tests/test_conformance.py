"""One conformance harness for every registered merge method (in the spirit of torchmetrics' `MetricTester`).

Parametrised over `fmn_pl.merging.METHODS` plus the toy method of tests/test_layout.py (one file, one registry
line), on two tiny random-weight checkpoints with the artifacts each method `needs`: the schema matches
`__init__`; streaming (`run_merge`, on disk) equals the merge held in memory (`MergeContext.over`); `needs` is
honoured (a missing input refused in one line; nothing undeclared read); options round-trip through CLI argv, a
YAML config and a pipeline `MethodSpec`; two runs are bit-identical; float16/bfloat16 checkpoints are accepted.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmn_pl.artifacts import artifact_path
from fmn_pl.checkpoint import CheckpointMeta, read_metadata, weights_fingerprint
from fmn_pl.kinds import KINDS
from fmn_pl.merge_config import MergeConfig
from fmn_pl.merging import METHODS, MergeContext, MergeMethod, method_class
from fmn_pl.options import SelectionOptions
from tests.conftest import tiny_checkpoint
from tests.test_layout import TOY_METHOD

TASKS = ("rte", "mrpc")
TOY = "maximum"
FAST: dict[str, dict[str, Any]] = {  # options without a search on selection data, so the harness stays fast
    "fmn": {"normalize": "mean", "power": 0.5, "scaling": 0.8},
    "task_arithmetic": {"scaling": 0.3},
    "ties": {"top_k": 50.0},
    "tall": {"lambdas": [0.4]},
    "consensus": {"scaling": 0.5, "lambdas": [0.4]},
    "adamerging": {"steps": 2, "batch_size": 4},
}


@pytest.fixture(params=[*METHODS, TOY])
def name(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> str:
    """Each registered method's name; the toy one registered as a user would: one file, one registry line."""
    if request.param == TOY:
        folder = tmp_path_factory.mktemp("toy")
        (folder / "toy_conformance").mkdir()
        (folder / "toy_conformance" / "__init__.py").write_text("")
        (folder / "toy_conformance" / "maximum.py").write_text(TOY_METHOD)  # the one file
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.setitem(METHODS, TOY, "toy_conformance.maximum:Maximum")  # the one registry line
    return request.param


def make(name: str) -> MergeMethod:
    return method_class(name)(**FAST.get(name, {}))


class Models:
    """Two tiny task checkpoints over one tiny base per dtype, each artifact kind computed when first needed."""

    def __init__(self, root: Path, base: Path, data: Path) -> None:
        self.root, self.base, self.data = root, base, data

    def checkpoints(self, needs: frozenset[str], dtype: torch.dtype = torch.float32) -> list[Path]:
        from fmn_pl.fisher_cli import main as fisher

        folder = self.root / str(dtype).removeprefix("torch.")
        cks = [folder / t for t in TASKS]
        for seed, ck in enumerate(cks):
            if not ck.is_dir():
                tiny_checkpoint(self.base, ck.name, ck, seed, noise=0.05)
                if dtype != torch.float32:
                    cast(ck, dtype)
            for kind in (k for k in KINDS if k in needs and not artifact_path(ck, k).is_file()):
                args = ["--checkpoint", str(ck), "--kind", KINDS[kind].cli, "--data_dir", str(self.data)]
                fisher([*args, "--num_examples", "8", "--split", "validation", "--trainer.accelerator", "cpu"])
        return cks


def cast(ck: Path, dtype: torch.dtype) -> None:
    """Checkpoint `ck`'s floating-point weights stored as `dtype` (its recorded fingerprint updated)."""
    file = ck / "model.safetensors"
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
    save_file(state, str(file), metadata={"format": "pt"})
    meta = read_metadata(ck)
    CheckpointMeta.from_dict({**meta, "fingerprint": weights_fingerprint(ck)}).write(ck)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_base: Callable[[str], Path], tiny_glue: Path) -> Models:
    return Models(tmp_path_factory.mktemp("conformance"), tiny_base("bert"), tiny_glue)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_memory(method: MergeMethod, cks: list[Path], models: Models, workdir: Path) -> dict[str, dict[str, Any]]:
    """{task: its body} held in memory, with only what the method declares it needs."""
    from fmn_pl.evaluate import EvalData, Evaluator
    from fmn_pl.merge_eval import Selection

    data = EvalData(str(models.data), "validation", 16, 8)
    selection = Selection(Evaluator(cks, data, "cpu", progress=False), [*TASKS])
    base = models.base if "base" in method.needs else None
    ctx = MergeContext.over(
        cks, base, evaluate=selection.scores, selection_inputs=selection.inputs, workdir=workdir, accelerator="cpu"
    )
    merged = dict(method.merge(ctx))
    bodies = {t: dict(method.task_body(i, ctx) or merged) for i, t in enumerate(ctx.tasks)}
    assert {kind for _, kind in ctx._artifacts} <= method.needs, "read an artifact it does not declare"
    return bodies


def streamed(method: MergeMethod, cks: list[Path], models: Models, out: Path) -> dict[str, dict[str, Any]]:
    """{task: its saved body} of `run_merge` (the on-disk path)."""
    from fmn_pl.merge import run_merge

    run_merge(
        MergeConfig(
            checkpoints=[str(c) for c in cks],
            method=method,
            output=str(out),
            evaluate=False,
            data_dir=str(models.data),
            selection=SelectionOptions(split="validation", samples=16, screen=None, precision="32"),
            batch_size=8,
            accelerator="cpu",
            progress=False,
        )
    )
    return {t: load_file(str(out / t / "model-body.safetensors")) for t in TASKS}


def assert_same(saved: dict[str, dict[str, Any]], memory: dict[str, dict[str, Any]], dtype: torch.dtype) -> None:
    for task, body in memory.items():
        for key, tensor in body.items():
            assert saved[task][key].dtype == dtype, key
            assert torch.equal(saved[task][key], tensor.to(dtype)), f"{task} {key}"


def test_schema_is_the_signature(name: str) -> None:
    """The options declared as data are `__init__`'s arguments: names in order, types as written, defaults."""
    cls = method_class(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [o.name for o in cls.schema] == [p.name for p in params]
    for option, p in zip(cls.schema, params):
        written = p.annotation if isinstance(p.annotation, str) else p.annotation.__name__
        assert option.type == written.replace('"', "'"), option.name
        assert option.default == (MISSING if p.default is inspect.Parameter.empty else p.default), option.name
        assert option.help and "\n" not in option.help, option.name
    assert set(make(name).options()) == {o.name for o in cls.schema}


def test_streaming_equals_memory_and_is_deterministic(name: str, models: Models, tmp_path: Path) -> None:
    method = make(name)
    cks = models.checkpoints(method.needs)
    first = in_memory(method, cks, models, tmp_path / "a")
    again = in_memory(make(name), cks, models, tmp_path / "b")
    assert_same(again, first, torch.float32)
    assert_same(streamed(make(name), cks, models, tmp_path / "out"), first, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_checkpoints(name: str, dtype: torch.dtype, models: Models, tmp_path: Path) -> None:
    """Half-precision checkpoints merge, and the saved body keeps their dtype (the merge itself runs in float32)."""
    method = make(name)
    cks = models.checkpoints(method.needs, dtype)
    saved = streamed(method, cks, models, tmp_path / "out")
    assert_same(saved, in_memory(make(name), cks, models, tmp_path / "w"), dtype)
    assert all(torch.isfinite(t.float()).all() for body in saved.values() for t in body.values())


def test_needs_are_honoured(name: str, models: Models, tmp_path: Path) -> None:
    """Each declared input, when missing, is refused before any work, in one line that names it."""
    from fmn_pl.merge import run_merge

    method = make(name)
    for need in sorted(method.needs):
        cks = [Path(shutil.copytree(c, tmp_path / need / c.name)) for c in models.checkpoints(method.needs)]
        if need == "base":
            for ck in cks:
                CheckpointMeta.from_dict({**read_metadata(ck), "base_model": str(tmp_path / "gone")}).write(ck)
        else:
            artifact_path(cks[1], need).unlink()
        with pytest.raises((FileNotFoundError, ValueError)) as e:
            run_merge(MergeConfig([str(c) for c in cks], method, str(tmp_path / need / "out"), evaluate=False))
        assert "\n" not in str(e.value) and ("base" in str(e.value) if need == "base" else need in str(e.value))


def test_options_round_trip(name: str, tmp_path: Path, models: Models) -> None:
    """Every option, written out, comes back the same through CLI argv, a YAML config and a pipeline MethodSpec."""
    import yaml

    from fmn_pl.merge_cli import build_parser
    from fmn_pl.pipeline_config import parse_config
    from fmn_pl.stages import plan

    options = make(name).options()
    common = ["--checkpoints", "a", "b", "--output", str(tmp_path / "o")]
    argv = [
        "--method",
        name,
        *(a for k, v in options.items() for a in (f"--method.{k}", v if isinstance(v, str) else json.dumps(v))),
        *common,
    ]
    parser = build_parser()
    assert parser.instantiate(parser.parse_args(argv)).method.options() == options
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"method": {"class_path": name, "init_args": options}}))
    from_yaml = parser.instantiate(parser.parse_args(["--config", str(config), *common]))
    assert from_yaml.method.options() == options
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "model": str(models.base),
                "tasks": list(TASKS),
                "data_dir": str(models.data),
                "output": str(tmp_path / "run"),
                "merge": {"methods": [{"name": name, "options": options}]},
            }
        )
    )
    stage = next(s for s in plan(parse_config(["--config", str(pipeline)])[0]) if s.kind == "merge")
    assert stage.config.method.options() == options
