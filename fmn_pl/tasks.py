"""GLUE task registry: text columns, labels, metrics and file names of every supported task."""

from __future__ import annotations

from dataclasses import dataclass

# What a regression task reports beside its correlations, so that an off-scale regressor shows (the names
# `fmn_pl.metrics` logs them under).
SCALE_METRICS = ("mse", "pred_mean", "pred_std", "label_mean", "label_std")


@dataclass(frozen=True)
class GlueTask:
    """Everything the pipeline needs to know about one GLUE task."""

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...]  # empty for regression (STS-B)
    metrics: tuple[str, ...]  # names understood by `fmn_pl.metrics.glue_metrics`
    main_metric: str  # GLUE's headline metric; merges are scored by `score`, the mean of `metrics`
    tsv_dir: str  # folder name in the original GLUE TSV release
    eval_splits: tuple[str, ...] = ("validation",)
    max_length: int = 128
    score_range: tuple[float, float] = (0.0, 5.0)  # regression labels must lie here (STS-B: 0 to 5)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            "cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews",), "matthews", "CoLA", max_length=64
        ),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", "SST-2", max_length=64),
        GlueTask(
            "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1", "MRPC"
        ),
        GlueTask("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "pearson", "STS-B"),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1", "QQP"),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            "MNLI",
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy", "QNLI"),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "accuracy", "RTE"),
    )
}


def get_task(name: str) -> GlueTask:
    """Look a task up by its `nyu-mll/glue` name, with an error that lists the known ones."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; expected one of: {', '.join(TASKS)}")
    return TASKS[key]
