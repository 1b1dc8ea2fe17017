"""The typed combined report of a pipeline: what `<output>/report.json` holds, read by attribute (`PipelineReport`).

`fmn_pl.pipeline_report` builds it from the merges' reports, the checkpoints' records and the stages' stamps,
renders it by attribute as Markdown and plots, and writes `to_dict()` as report.json. Built here, every key is
written (None where nothing is known), in field order; read back (`PipelineReport.read`), the keys keep their
order and unknown keys are kept (`fmn_pl.records.Record`). What stays a dict is data: a method's options, a
checkpoint's metrics, the seconds per stage kind. Standard library only, like the merge report's module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from fmn_pl.records import Record, RecordError
from fmn_pl.report import mean

P = TypeVar("P", bound="PipelinePart")

COST_KINDS = ("fit", "fisher", "merge")
"""The stage kinds whose costs are summed (the report stage's own is not recorded)."""


class PipelineReportError(RecordError):
    """A pipeline report (or a stamp or record it copies) that does not fit its record: one line."""


@dataclass(kw_only=True)
class PipelinePart(Record):
    """A JSON object of the combined report: built here, every field is written (None where unknown)."""

    source_name = "report.json"
    error = PipelineReportError
    write_unset = True

    @classmethod
    def of(cls: type[P], data: Mapping[str, Any] | None, source: str | Path, **given: Any) -> P:
        """The part from what `data` (a stamp, a checkpoint's record) says of its known keys, None where it says
        nothing, and the `given` keys (JSON values), checked as read: what the report keeps of a record it copies."""
        return cls.from_dict({**known_keys(cls, data), **given}, source)


def known_keys(cls: type[Record], data: Mapping[str, Any] | None) -> dict[str, Any]:
    """`data`'s values of the known keys of `cls`, in field order (None where it has none)."""
    return {k: (data or {}).get(k) for k in cls.hints()}


# ---------------------------------------------------------------------------------------------- what was asked


@dataclass(kw_only=True)
class MethodColumn(PipelinePart):
    """A merge method's column: its label in tables, the method and its options as the config gives them."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class FitCaps(PipelinePart):
    """How much of a task's data fine-tuning read (None: all of it)."""

    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_epochs: int | None = None
    holdout_samples: int | None = None


@dataclass(kw_only=True)
class ArtifactCaps(PipelinePart):
    """Training examples an artifact kind is computed on per task (None: its default)."""

    num_examples: int | None = None


@dataclass(kw_only=True)
class EvalCaps(PipelinePart):
    """Validation examples per task the merges are scored on (None: all of them)."""

    max_eval_samples: int | None = None


@dataclass(kw_only=True)
class Caps(PipelinePart):
    """How much data each stage read: fine-tuning per task, each artifact kind, the merges' scoring."""

    fit: dict[str, FitCaps] = field(default_factory=dict)
    fisher: dict[str, ArtifactCaps] = field(default_factory=dict)
    eval: EvalCaps = field(default_factory=EvalCaps)


@dataclass(kw_only=True)
class ReportOptions(PipelinePart):
    """What the report shows besides the results (`fmn_pl.stages.report_options`, the report stage's options)."""

    model: str
    data_dir: str | None = None
    tasks: list[str] = field(default_factory=list)
    combinations: list[str] = field(default_factory=list)
    """The merged task sets, as `task+task`."""
    columns: list[MethodColumn] = field(default_factory=list)
    caps: Caps = field(default_factory=Caps)


# ---------------------------------------------------------------------------------------------- what was found


def score_columns(labels: Sequence[str]) -> list[str]:
    """The columns of the score tables: the constant baseline, the individual model, then the merges' `labels`."""
    return ["constant", "individual", *labels]


@dataclass(kw_only=True)
class ArtifactFacts(PipelinePart):
    """What an artifact was computed from, as its metadata records it."""

    num_examples: int | None = None
    aggregation: str | None = None
    labels: str | None = None
    batch_size: int | None = None
    seconds: float | None = None


@dataclass(kw_only=True)
class CheckpointFacts(PipelinePart):
    """A task checkpoint's training record (`fmn_pl.json`) and what each of its artifacts was computed from."""

    num_train_examples: int | None = None
    epoch: int | None = None
    epochs_trained: int | None = None
    metrics: dict[str, float] | None = None
    fingerprint: str | None = None
    artifacts: dict[str, ArtifactFacts] = field(default_factory=dict)


@dataclass(kw_only=True)
class ResultRow(PipelinePart):
    """One model's score on one task of a combination: a method's merge, the constant baseline, the individual
    model or the plain average (`column`)."""

    combination: str
    task: str
    metrics: list[str] = field(default_factory=list)
    column: str
    score: float | None = None
    normalized: float | None = None
    """score / the individual model's (1.0 for the individual, None for the constant)."""
    mse: float | None = None
    """Regression tasks only."""


@dataclass(kw_only=True)
class Means(PipelinePart):
    """Mean score and normalized score (of a column's rows in a combination, or of those over combinations)."""

    score: float | None = None
    normalized: float | None = None

    @classmethod
    def over(cls, items: Sequence[ResultRow | Means]) -> Means:
        """The means of the items' scores and normalized scores (None where none has one)."""
        return cls(score=mean([i.score for i in items]), normalized=mean([i.normalized for i in items]))


@dataclass(kw_only=True)
class StageLaunch(PipelinePart):
    """Where a stage ran, as its stamp records it (`fmn_pl.pipeline_config.Launch`)."""

    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str


@dataclass(kw_only=True)
class StageCost(PipelinePart):
    """What a stage cost, as its stamp records it (None where it has no stamp yet)."""

    stage: str
    kind: str
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    load: float | None = None
    """The 1-minute load average when the stage ended."""
    cpus: int | None = None
    finished: str | None = None
    launch: StageLaunch | None = None
    """None: it ran in the pipeline's process."""


@dataclass(kw_only=True)
class PipelineReport(ReportOptions):
    """The combined report: every merge's per-task scores beside the constant baselines, the individual models and
    the plain average, means per combination and column, flags, what each stage read and cost."""

    labels: list[str] = field(default_factory=list)
    """The merge columns: `average`, then each method's label."""
    checkpoints: dict[str, CheckpointFacts] = field(default_factory=dict)
    results: list[ResultRow] = field(default_factory=list)
    summary: dict[str, dict[str, Means]] = field(default_factory=dict)
    """Per combination and column."""
    flags: list[str] = field(default_factory=list)
    overall: dict[str, Means] = field(default_factory=dict)
    """Per column: the means over combinations."""
    stages: list[StageCost] = field(default_factory=list)
    cost_s: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage kind."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per stage kind."""

    def index(self) -> dict[tuple[str, str, str], ResultRow]:
        """The result rows by (combination, task, column)."""
        return {(r.combination, r.task, r.column): r for r in self.results}

    def tasks_of(self, combination: str) -> list[str]:
        """The tasks of a combination, in the order of its rows."""
        return list(dict.fromkeys(r.task for r in self.results if r.combination == combination))

    def per_column(self, combination: str, task: str, value: Callable[[ResultRow], float | None]) -> list[float | None]:
        """`value` (a row's score, its mse) of a combination's task in each of the `score_columns`, None where a
        column has no row for it."""
        index = self.index()
        rows = [index.get((combination, task, c)) for c in score_columns(self.labels)]
        return [None if r is None else value(r) for r in rows]

    @classmethod
    def read(cls, path: str | Path) -> PipelineReport:
        """The combined report in `path` (a report.json)."""
        return cls.from_dict(json.loads(Path(path).read_text()), path)
