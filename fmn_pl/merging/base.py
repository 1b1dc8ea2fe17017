"""The one protocol every merge method implements, and the context that streams tensors to it.

A method is a class whose `__init__` arguments are its options (jsonargparse parses them by their types), each
declared once more as data in its `schema` (name, type, default, help: what `--method NAME --help` lists; the
conformance harness, tests/test_conformance.py, checks the two agree). Most methods are tensor-wise: they
implement `merge_tensor`, which sees one body tensor at a time through a lazy sequence over the models, so memory
does not grow with the number of models when the method accumulates. Methods that need the whole model at once
(AdaMerging, TIES thresholds, hyper-parameter searches) override `setup` or `merge`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from fmn_pl.artifacts import Artifact, load_artifact
from fmn_pl.checkpoint import METADATA_FILE, CheckpointMeta
from fmn_pl.tensorfile import FLOAT_DTYPES, CheckpointReader


class LazyTensors(Sequence[torch.Tensor]):
    """`models[i]` loads model i's copy of one tensor (float32) only when asked."""

    def __init__(self, readers: Sequence[CheckpointReader], key: str) -> None:
        self.readers, self.key = readers, key

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.readers[i].get(self.key).float()


@dataclass
class MergeContext:
    """What a method may read: the checkpoints' body tensors, the base model, artifacts, an evaluator."""

    checkpoints: list[Path]
    tasks: list[str]
    config: Any  # the Hugging Face config shared by all checkpoints
    body_prefix: str  # e.g. "bert." : parameter names under `model.base_model`
    keys: list[str]  # floating-point body tensors to merge (integer buffers are never merged)
    readers: list[CheckpointReader]
    base_reader: CheckpointReader | None = None
    evaluate: Callable[..., dict[str, float]] | None = None
    """`evaluate(body, tasks=None, limit=None)`: scores a merged body ({key: tensor}) on the selection data of
    every task (or of `tasks` only; on `limit` rows per task, spread evenly): {task: score}."""
    screen: int | None = None
    """Candidate searches score every candidate on this many selection rows per task first, then only the
    `finalists` best on all of them (successive halving); None: every candidate on every row."""
    finalists: int = 4
    selection_inputs: Callable[[int], Any] | None = None
    """Task i's selection data (a set-up `GLUEDataModule`), for methods that adapt on unlabeled inputs."""
    workdir: Path | None = None
    """A folder inside the output where a method may keep files (AdaMerging's logs, TALL's masks)."""
    accelerator: str = "cpu"
    progress: bool = True
    log: Callable[[str], None] = print
    notes: dict[str, Any] = field(default_factory=dict)
    """Anything a method wants in the report (chosen lambda, ridge fallbacks, ...)."""
    remarks: list[str] = field(default_factory=list)
    """Lines for the report's text (warnings, storage figures): add them with `remark`."""
    choices: list[str] = field(default_factory=list)
    """The `notes` keys that are options chosen on selection data (the report's text lists them): add with `choose`."""
    _artifacts: dict[tuple[int, str], Artifact] = field(default_factory=dict, repr=False)
    _base: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def over(
        cls,
        checkpoints: Sequence[str | Path],
        base: str | Path | None = None,
        *,
        tasks: Sequence[str] | None = None,
        body_prefix: str | None = None,
        artifacts: dict[tuple[int, str], Any] | None = None,
        **kw: Any,
    ) -> MergeContext:
        """A quiet context over model folders as they are, without `run_merge`'s checks: the one in-memory merge
        of tests and research (`dict(method.merge(MergeContext.over(folders)))`).

        Tasks default to each folder's recorded task (else its name); the body is the floating-point tensors under
        `body_prefix` (default: the tensors' most common first part where the folder has a config.json, else every
        tensor), and `base` is read with that prefix. `artifacts` ({(model, kind): artifact}) are used as given,
        others loaded when asked; `kw` sets any other field (evaluate, selection_inputs, workdir, log, ...)."""
        paths = [Path(c) for c in checkpoints]
        readers = [CheckpointReader(p) for p in paths]
        config = None
        if (paths[0] / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(paths[0])
        if body_prefix is None:
            firsts = Counter(k.split(".", 1)[0] for k in readers[0].keys() if "." in k)
            body_prefix = f"{firsts.most_common(1)[0][0]}." if config is not None and firsts else ""
        if tasks is None:
            tasks = [CheckpointMeta.read(p).task if (p / METADATA_FILE).is_file() else p.name for p in paths]
        keys = [k for k in readers[0].keys() if k.startswith(body_prefix) and readers[0].dtype(k) in FLOAT_DTYPES]
        quiet: dict[str, Any] = {"log": lambda line: None, "progress": False}
        return cls(
            checkpoints=paths,
            tasks=list(tasks),
            config=config,
            body_prefix=body_prefix,
            keys=keys,
            readers=readers,
            base_reader=CheckpointReader(base, prefix=body_prefix) if base is not None else None,
            _artifacts=dict(artifacts or {}),
            **{**quiet, **kw},
        )

    @property
    def num_models(self) -> int:
        return len(self.readers)

    def models(self, key: str) -> LazyTensors:
        return LazyTensors(self.readers, key)

    def base(self, key: str, keep: bool = False) -> torch.Tensor:
        """The pretrained model's tensor (methods on task vectors declare `needs = {"base"}`). `keep`: hold it in
        memory for later calls (candidate searches rebuild many bodies from it); treat a kept tensor as read-only."""
        if self.base_reader is None:
            raise ValueError("this method needs the pretrained model: pass --base <hub name or folder>")
        if key in self._base:
            return self._base[key]
        tensor = self.base_reader.get(key).float()
        if keep:
            self._base[key] = tensor
        return tensor

    def task_vectors(self, key: str) -> list[torch.Tensor]:
        """tau_i = theta_i - theta_0 for one tensor, all models (holds M tensors: use when needed)."""
        base = self.base(key)
        return [t - base for t in self.models(key)]

    def choose(self, method: str, option: str, chosen: Any, grid: Sequence[Any], **measured: Any) -> None:
        """Record an option a method chose on selection data, with the grid it chose from and what it measured:
        in the report's notes as `<method>_<option>`, and in its text."""
        key = f"{method}_{option}"
        self.notes[key] = {"chosen": chosen, "grid": list(grid), **measured}
        self.choices.append(key)

    def remark(self, line: str) -> None:
        """Log `line` and repeat it in report.md (e.g. a task a method had to leave out)."""
        self.log(line)
        self.remarks.append(line)

    def artifact(self, i: int, kind: str) -> Artifact:
        """Model i's artifact of `kind`, checked against its checkpoint once and cached."""
        if (i, kind) not in self._artifacts:
            self._artifacts[(i, kind)] = load_artifact(self.checkpoints[i], kind)
        return self._artifacts[(i, kind)]


def check_coefficients(coefficients: Sequence[float] | None, num_models: int, method: str) -> list[float]:
    """Per-model coefficients (default all 1), checked: one per model, >= 0, not all zero."""
    if coefficients is None:
        return [1.0] * num_models
    c = [float(x) for x in coefficients]
    if len(c) != num_models:
        raise ValueError(f"{method}: {len(c)} coefficients given for {num_models} checkpoints; give one per checkpoint")
    if any(x < 0 for x in c) or sum(c) <= 0:
        raise ValueError(f"{method}: coefficients must be >= 0 with a positive sum, got {c}")
    return c


@dataclass(frozen=True)
class Option:
    """One option of a merge method, as data (in the spirit of mergekit's `ConfigParameterDef`): its `__init__`
    argument's name, annotation as written, default (`MISSING`: required) and help, for `--method NAME --help`."""

    name: str
    type: str
    default: Any = MISSING
    help: str = ""

    def line(self) -> str:
        """`  --method.NAME  TYPE = DEFAULT  help`: the option's line in `--method NAME --help`."""
        default = "" if self.default is MISSING else f" = {self.default!r}"
        return f"  --method.{self.name:<14} {self.type}{default}  {self.help}"


class MergeMethod:
    """Base of all methods. Subclasses set `needs` and `schema` and implement `merge_tensor` (or override `merge`)."""

    schema: ClassVar[tuple[Option, ...]] = ()
    """The options (the `__init__` arguments, in order) as data: what `--method NAME --help` lists."""

    needs: frozenset[str] = frozenset()
    """Inputs beyond the checkpoints: "base", an artifact kind ("mask_fisher", "full_fisher", "grams", ... see
    `fmn_pl.kinds`). The class declares what every instance needs; an instance whose options need more sets its
    own in `__init__` (FMN with a scaling needs "base"), so read it from an instance."""

    def setup(self, ctx: MergeContext) -> None:
        """Optional global pass before the tensor loop (e.g. TIES' top-k thresholds)."""

    def merge_tensor(self, key: str, models: LazyTensors, ctx: MergeContext) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, merged tensor) for every key in `ctx.keys`."""
        self.setup(ctx)
        for key in ctx.keys:
            yield key, self.merge_tensor(key, ctx.models(key), ctx)

    def task_body(self, i: int, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Task i's own body, for methods that serve each task with a different one (TALL masks); called after
        `merge`. None (the default): every task uses the merged body."""
        return None

    def options(self) -> dict[str, Any]:
        """The method's options as given (for reports); subclasses' __init__ args by default."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "needs"}
