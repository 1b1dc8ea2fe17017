"""Artifact kinds: what `fmn-pl fisher --kind K` computes beside a task checkpoint, one registry line each, and
`FisherConfig`, the options of one such run.

A kind is a pass (an `fmn_pl.passes.ArtifactPass` callback in its own module: it sees every batch of a
validation-style loop and returns the tensors to save) plus the facts below, its own options included (as data:
`KindOption`s). Its name is what artifact headers record, what a merge method lists in `needs`, and the
pipeline's `fisher.<name>` section. A new kind is its module plus one line in `KINDS`; its options become
`fmn-pl fisher --<option>` flags, `FisherConfig` fields and `fisher.<name>.<option>` pipeline options. This
module imports nothing heavy: the pipeline plans from it before torch or Lightning are imported.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Literal, Optional, TypeVar, cast

T = TypeVar("T")


@dataclass(frozen=True)
class KindOption:
    """One option of a kind's pass, declared in its registry line: `fmn-pl fisher --<name>`, a `FisherConfig`
    field, the pipeline's `fisher.<kind>.<name>`."""

    name: str
    """The keyword its pass's `__init__` takes, e.g. "aggregation"."""
    type: Any
    """Its type annotation, None allowed (not set), e.g. `Optional[Literal["per_example", "per_batch"]]`."""
    default: Any = None
    """The value a run of this kind uses when the user sets none (None: the pass's own default)."""
    help: str = ""
    """What it does, for `--help` and the pipeline's docs."""


@dataclass(frozen=True)
class ArtifactKind:
    """One artifact kind: its names, its pass, and the defaults and options of a run of it."""

    name: str
    """Recorded in the artifact's header and named in merge methods' `needs`, e.g. "mask_fisher"."""
    cli: str
    """`fmn-pl fisher --kind <cli>`, e.g. "mask"."""
    callback: str
    """"module:Class" of its pass (an `ArtifactPass`), imported when the pass runs. Its `__init__` takes the
    checkpoint folder, `metadata=`, `seed=` if it wants the run's seed, and the kind's `options` that are set."""
    batch_size: int = 32
    """Default examples per batch."""
    options: tuple[KindOption, ...] = ()
    """Its own options: passed to its pass when set; the pipeline's `fisher.<name>` has them beside
    num_examples, batch_size and seed."""
    forward: bool = False
    """True: the loop runs the model's plain forward on every batch (passes that only read hooks); False: the
    pass runs its own forward and backward."""

    @property
    def file(self) -> str:
        """Its file name in the checkpoint folder (`fmn_pl.artifacts.artifact_path`)."""
        return f"{self.name}.safetensors"

    def pass_class(self) -> Any:
        """Its pass's class, imported now (the registry itself imports nothing heavy)."""
        module, _, name = self.callback.partition(":")
        return getattr(importlib.import_module(module), name)


FISHER = (
    KindOption(
        "aggregation",
        Optional[Literal["per_example", "per_batch"]],
        help="per_example (default; exact) or per_batch (the FMN reference code).",
    ),
    KindOption(
        "labels",
        Optional[Literal["empirical", "sampled", "expected"]],
        help="empirical (default for mask), sampled, or expected (default for full).",
    ),
)
PADDING = KindOption(
    "include_padding", Optional[bool], help="Count padding positions too (the RegMean reference does)."
)
KINDS: dict[str, ArtifactKind] = {
    k.name: k
    for k in (
        ArtifactKind("mask_fisher", "mask", "fmn_pl.fisher:MaskFisherCallback", options=FISHER),  # FMN's input
        ArtifactKind("full_fisher", "full", "fmn_pl.fisher:FullFisherCallback", 16, FISHER),  # Fisher merging's
        ArtifactKind("grams", "grams", "fmn_pl.grams:GramCallback", forward=True, options=(PADDING,)),  # RegMean's
    )
}


def get_kind(name: str) -> ArtifactKind:
    """A kind by its name ("mask_fisher") or its `--kind` ("mask"); an error lists the known ones."""
    for kind in KINDS.values():
        if name in (kind.name, kind.cli):
            return kind
    known = ", ".join(f"{k.cli} ({k.name})" for k in KINDS.values())
    raise ValueError(f"unknown artifact kind {name!r}; expected one of {known}")


def fisher_command(checkpoint: Any, kind: str) -> str:
    """The command that computes `kind` for `checkpoint` (for error messages that say how to get it)."""
    return f"fmn-pl fisher --checkpoint {checkpoint} --kind {get_kind(kind).cli}"


# ---------------------------------------------------------------------------------------------- options as fields


def kind_options(kinds: Iterable[ArtifactKind]) -> dict[str, tuple[KindOption, list[str]]]:
    """Every option the kinds declare, once by name, with the `--kind`s that declare it. One name is one flag and
    one field for all of them, so two kinds declaring it with different types raise."""
    out: dict[str, tuple[KindOption, list[str]]] = {}
    for kind in kinds:
        for option in kind.options:
            first, clis = out.setdefault(option.name, (option, []))
            if first.type != option.type:
                raise TypeError(
                    f"artifact kinds {clis} and {kind.cli!r} declare option {option.name!r} with two types: "
                    f"{first.type} and {option.type}; rename one of them"
                )
            clis.append(kind.cli)
    return out


def extended(base: type[T], new: list[tuple[str, Any, Any, str]]) -> type[T]:
    """`base` (a dataclass) with more fields, each (name, type, `dataclasses.field(...)`, help), under base's name; the
    helps go in its docstring's Args, which jsonargparse shows in `--help` (generated fields have no source)."""
    taken = [name for name, *_ in new if name in {f.name for f in dataclasses.fields(base)}]  # type: ignore[arg-type]
    if taken:
        raise ValueError(f"{taken} clash with {base.__name__}'s own fields")
    doc = f"{inspect.cleandoc(base.__doc__ or '')}\n\nArgs:\n" + "".join(f"    {n}: {h}\n" for n, _, _, h in new)
    return dataclasses.make_dataclass(
        base.__name__,
        [(name, type_, spec) for name, type_, spec, _ in new],
        bases=(base,),
        namespace={"__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": doc},
    )


def options_class(base: type[T], options: tuple[KindOption, ...]) -> type[T]:
    """`base` with one more field per option (its type and default): e.g. the pipeline's `fisher.<kind>` section.
    Cached, so that one base and options make one class (dataclasses compare equal only within a class)."""
    return _options_class(cast(Any, base), options)  # a class is hashable


@lru_cache(maxsize=None)
def _options_class(base: Any, options: tuple[KindOption, ...]) -> Any:
    return extended(base, [(o.name, o.type, field(default=o.default), o.help) for o in options])


def kind_sections(section: type[Any]) -> Callable[[type[T]], type[T]]:
    """A class decorator: one more field per registered kind, named by it, holding its options: `section` (a
    dataclass of the options every kind has) with the kind's own (`options_class`). The pipeline's `fisher`."""

    def add(cls: type[T]) -> type[T]:
        new = []
        for k in KINDS.values():
            options = options_class(section, k.options)
            names = [f.name for f in dataclasses.fields(options)]
            text = f"Options of {k.name} (`fmn-pl fisher --kind {k.cli}`): {', '.join(names)}."
            new.append((k.name, options, field(default_factory=options), text))
        return extended(cls, new)

    return add


def _kinds_options(base: type[T]) -> type[T]:
    """`base` with one field per option of the registered kinds, each default None (not set), its help naming the
    kinds it applies to: `FisherConfig` (or `base` itself when it has them all already)."""
    have = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    declared = kind_options(KINDS.values())
    new = tuple(
        dataclasses.replace(o, default=None, help=f"{o.help} Kinds: {', '.join(clis)}.")
        for name, (o, clis) in declared.items()
        if name not in have
    )
    return options_class(base, new) if new else base


@_kinds_options
@dataclass
class FisherConfig:
    """Compute one artifact of a task checkpoint and write it beside the weights (`fmn-pl fisher`, `run_fisher`).
    Besides the fields below, one field per option of the registered kinds (`KindOption`), None when not set."""

    checkpoint: str
    """Task checkpoint folder (written by `fmn-pl fit`); the artifact is written there."""
    kind: str = "mask"
    """mask (mask-node Fisher, FMN), full (diagonal Fisher of every body parameter), grams (RegMean), or another
    kind registered in `fmn_pl.kinds.KINDS`."""
    task: Optional[str] = None
    """GLUE task; default the checkpoint's. A different one is an error."""
    data_dir: Optional[str] = None
    """GLUE data (parquet/TSV folder or hub name); default the one the checkpoint was trained on."""
    split: str = "train"
    """Split to read; "train" excludes the rows the checkpoint held out (`holdout_samples`)."""
    num_examples: Optional[int] = 2048
    """Examples drawn without replacement with `seed` (None: the whole split)."""
    batch_size: Optional[int] = None
    """Examples per batch (default: the kind's, 32; 16 for full)."""
    seed: int = 0
    """Seed of the example sample and of sampled labels."""
    max_length: Optional[int] = None
    """Truncation length (default: the checkpoint's fine-tuning setting)."""
    wait: bool = False
    """Wait for another run computing this artifact (it holds `.<kind>.safetensors.lock` beside it) to finish,
    instead of refusing at once."""
    trainer: Optional[dict[str, Any]] = None
    """Lightning Trainer options (devices, strategy, accelerator, precision, ...): `--trainer.devices 2`."""

    def to_data(self) -> dict[str, Any]:
        """The config as plain data, in field order, the kind options and `trainer` left out when None: the YAML
        that `fmn-pl fisher --config` reads back to an equal config (what the pipeline writes for a stage)."""
        unset = {"trainer", *kind_options(KINDS.values())}
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps({k: v for k, v in data.items() if v is not None or k not in unset}))


def fisher_config_class() -> type[FisherConfig]:
    """`FisherConfig` for the kinds registered now: itself, or (a kind registered since import, e.g. by a test,
    declares a new option) its subclass with that field too. What `fmn-pl fisher` parses."""
    return _kinds_options(FisherConfig)
