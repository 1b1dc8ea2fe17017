"""The typed merge report: what `fmn-pl merge` writes as `report.json`, read by attribute (`MergeReport`).

The writer (merge.py, merge_eval.py, diagnostics.py) builds the report as a dict; `MergeReport.from_dict` reads
it and `to_dict` gives the same dict back, key for key and in the order read (the writer's order moved between
versions), keys this version does not know kept in `extra`. An absent key stays absent: a merge that was not
scored has no `results`, one whose method chose nothing no `selection`. What stays a dict is data, not
structure: a method's `options` and `notes`, metric name -> value, stage -> seconds, package -> version, a
model's scored rows, an artifact's metadata and the diagnostics' tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmn_pl.records import Record, RecordError
from fmn_pl.tasks import SCALE_METRICS

Metrics = dict[str, float]
"""One model's scores on one task: `score` (the mean of the task's metrics, what tables show) and each metric;
a regression task adds its scale figures (`mse`, `pred_mean`, ...), a constant baseline its `majority_class`."""

MODELS = ("baseline", "individual", "average", "merged")
"""The models a task's result scores: the constant prediction, the task's own checkpoint, the plain average and
the merge."""


class ReportError(RecordError):
    """A report.json that is not a merge report (not JSON, not an object, a key missing or mistyped): one line."""


@dataclass(kw_only=True)
class Part(Record):
    """A JSON object of the report (`fmn_pl.records.Record`): read from a dict and written back as the same dict;
    built here, the required keys and the optional ones that are set are written."""

    source_name = "report.json"
    lead = " is not a merge report"
    error = ReportError


# ---------------------------------------------------------------------------------------------- the parts


@dataclass(kw_only=True)
class CheckpointEntry(Part):
    """One merged checkpoint: its task, folder and weight fingerprint, and the artifacts the method read (each one's
    metadata as it records it: kind, examples, seconds, ...)."""

    task: str
    path: str
    fingerprint: str
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(kw_only=True)
class BaseModel(Part):
    """The pretrained model the task vectors were taken from: its folder or hub name and weight fingerprint."""

    path: str
    fingerprint: str | None = None


@dataclass(kw_only=True)
class OwnTensors(Part):
    """The body tensors left unmerged (each task keeps its own): the patterns asked for and what they matched."""

    patterns: list[str]
    tensors: list[str]
    parameters: int


@dataclass(kw_only=True)
class Storage(Part):
    """How the merge was stored: the merged body's size and how each task's folder holds it (hardlink, copy, ...)."""

    body_bytes: int
    task_body: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Evaluation(Part):
    """The rows a merge was scored on: the data, the split and the seeded sample (`EvalData.identity`)."""

    data_dir: str | None = None
    split: str
    max_samples: int | None = None
    """Rows per task at most; None: all of them."""
    sample_seed: int | None = None


@dataclass(kw_only=True)
class SelectionRecord(Evaluation):
    """The rows a method chose its options on (or adapted on), and how: candidates scored, inputs read, precision."""

    evaluations: int = 0
    """Scorings of candidate bodies."""
    adapted: bool = False
    """Whether the method read the split's unlabeled inputs (AdaMerging's entropy, ...)."""
    bf16: bool | None = None
    transductive: bool = False
    """Whether the selection rows are the scored ones (the validation split)."""


@dataclass(kw_only=True)
class Screening(Part):
    """How a search screened its candidates before scoring the finalists on every selection row."""

    rows: int | None = None
    """Selection rows per task each candidate was screened on."""
    mean_scores: dict[str, float] = field(default_factory=dict)
    finalists: list[Any] = field(default_factory=list)


@dataclass(kw_only=True)
class Choice(Part):
    """An option a method chose on the selection rows (`MergeContext.choose`), as its note records it: the value
    chosen, the grid it was chosen from and what the search measured (by candidate, as the search names them)."""

    chosen: Any
    grid: list[Any]
    objective: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_scores: dict[str, float] = field(default_factory=dict)
    tied: list[Any] = field(default_factory=list)
    screened: Screening | None = None
    average_scores: dict[str, float] | None = None


@dataclass(kw_only=True)
class TaskResult(Part):
    """One task's scores: the merge, the task's own model and the plain average (None where not scored), their
    ratios to the own model, and beside them the constant-prediction baseline and the flags it raises."""

    merged: Metrics | None
    individual: Metrics | None
    average: Metrics | None
    normalized: float | None
    """merged / individual score (None when the individual's is not positive)."""
    normalized_average: float | None
    baseline: Metrics | None = None
    examples: int | None = None
    above_baseline: float | None = None
    """(merged - constant) / (individual - constant): the share of what the model learned that the merge keeps."""
    flags: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    """Per model (merged, individual, average): its scored rows as columns (split, row, label, prediction)."""

    def scores(self, model: str) -> Metrics | None:
        """The metrics of one of `MODELS` (None where it was not scored)."""
        if model not in MODELS:
            raise KeyError(f"no model {model!r} in a task result; one of {MODELS}")
        value: Metrics | None = getattr(self, model)
        return value

    def score(self, model: str) -> float | None:
        """The score of one of `MODELS` (None where it was not scored)."""
        return (self.scores(model) or {}).get("score")

    def mse(self, model: str) -> float | None:
        """The mean squared error of one of `MODELS` (regression tasks only; else None)."""
        return (self.scores(model) or {}).get("mse")

    def metric_names(self) -> list[str]:
        """The task's metrics (accuracy, f1, ...): the merged model's keys (else the individual's), without the
        score and the scale figures."""
        names = self.merged or self.individual or {}
        return [k for k in names if not k.endswith("score") and k.rpartition("/")[2] not in SCALE_METRICS]


@dataclass(kw_only=True)
class Summary(Part):
    """The means over the tasks of the scores and of the normalized scores (`fmn_pl.report.summary`)."""

    merged_score: float | None = None
    individual_score: float | None = None
    average_score: float | None = None
    normalized: float | None = None
    normalized_average: float | None = None
    baseline_score: float | None = None
    above_baseline: float | None = None


@dataclass(kw_only=True)
class Diagnostics(Part):
    """What explains a merge's scores (`fmn_pl.diagnostics`): its tables, keyed by task, layer group and model."""

    task_vectors: dict[str, Any] | None = None
    """Norms and cosines of the task vectors per layer group; None: the pretrained model was not at hand."""
    fisher: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Per task: the mean head and neuron Fisher per layer."""
    predictions: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Per task and model: the share of each predicted label."""


@dataclass(kw_only=True)
class MergeReport(Part):
    """A merge's `report.json`: what was merged and how, what the method chose, the scores per task against the
    individual models, the plain average and the constant baseline, and what it cost."""

    method: str
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """The method's options as it reports them (`MergeMethod.options`)."""
    tasks: list[str]
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    base: BaseModel | None = None
    own_tensors: OwnTensors | None = None
    peak_rss_merge_mb: float | None = None
    storage: Storage | None = None
    selection: SelectionRecord | None = None
    """None: the method chose nothing on held-out rows and adapted on none."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the method noted, by its own keys (`MergeContext.notes`): each choice's grid and scores, ..."""
    choices: list[str] | None = None
    """The `notes` keys of the options the method chose (`MergeContext.choose`); None: a report from before them."""
    remarks: list[str] = field(default_factory=list)
    evaluation: Evaluation | None = None
    results: dict[str, TaskResult] = field(default_factory=dict)
    """Per task; empty when the merge was not scored."""
    summary: Summary | None = None
    diagnostics: Diagnostics | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of the merge (check_s, merge_s, write_s, eval_s, total_s)."""
    peak_rss_mb: float | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The merge's name in tables and titles: its label, else its method."""
        return self.label or self.method

    def chosen(self) -> dict[str, Choice]:
        """The options the method chose, by their `notes` key (`fmn_power`, ...), read from the notes (reports
        from before `choices`: every note shaped as a choice)."""
        keys = self.choices
        if keys is None:
            keys = [k for k, v in self.notes.items() if isinstance(v, dict) and "grid" in v]
        return {k: Choice.from_dict(self.notes[k], prefix=f"notes.{k}.") for k in keys}

    @classmethod
    def read(cls, path: str | Path) -> MergeReport:
        """The report in `path` (a report.json, or the merge's folder); one line naming the file when it is
        missing, not JSON or not a merge report."""
        path = Path(path)
        path = path / "report.json" if path.is_dir() else path
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no merge report there (a merge writes report.json)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data, path)


def as_report(report: MergeReport | dict[str, Any]) -> MergeReport:
    """A `MergeReport` as it is, a report dict (as the writer builds it) read into one."""
    return report if isinstance(report, MergeReport) else MergeReport.from_dict(report)
