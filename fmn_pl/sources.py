"""GLUE sources: where a task's split lives (a local folder in the `nyu-mll/glue` parquet layout or the original
GLUE TSV layout, or a hub dataset) and reading it with `datasets.load_dataset` as checked columns."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any, Iterator

from fmn_pl.options import is_local_path
from fmn_pl.tasks import GlueTask, get_task

# Original GLUE TSV release: (has header row, {field: column name or index}); split file names below.
_TSV_COLUMNS: dict[str, tuple[bool, dict[str, str | int]]] = {
    "cola": (False, {"sentence": 3, "label": 1}),
    "sst2": (True, {"sentence": "sentence", "label": "label"}),
    "mrpc": (True, {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "stsb": (True, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
    "qqp": (True, {"question1": "question1", "question2": "question2", "label": "is_duplicate"}),
    "mnli": (True, {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}),
    "qnli": (True, {"question": "question", "sentence": "sentence", "label": "label"}),
    "rte": (True, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
}
_TSV_SPLITS = {"validation": "dev", "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}

Columns = dict[str, list]


def split_file(data_dir: str | Path, task: GlueTask, split: str) -> Path:
    """The local file holding `split` of `task` under `data_dir`, in whichever layout the folder uses."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    if (root / task.name).is_dir():
        path = root / task.name / f"{split}.parquet"
    elif (root / task.tsv_dir).is_dir():
        path = root / task.tsv_dir / f"{_TSV_SPLITS.get(split, split)}.tsv"
    else:
        raise FileNotFoundError(
            f"data directory {root} has neither {task.name}/ (nyu-mll/glue parquet layout) "
            f"nor {task.tsv_dir}/ (GLUE TSV layout) for task {task.name!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"split {split!r} of task {task.name!r} is missing: {path} does not exist")
    return path


def read_split(source: str | Path, task: GlueTask | str, split: str) -> Columns:
    """One split as columns (the task's text keys and `label`), validated.

    `source` is a local folder in the `nyu-mll/glue` parquet layout (`<dir>/<task>/<split>.parquet`),
    a folder in the original GLUE TSV layout (`<dir>/RTE/dev.tsv`), or a hub dataset name.
    """
    return load_split(source, task, split)[1]


def load_split(source: str | Path, task: GlueTask | str, split: str) -> tuple[Any, Columns]:
    """One split by `datasets.load_dataset` (hub name, local parquet or GLUE TSV; Arrow, cached by fingerprint)
    with the task's text columns and `label`, and the same as validated columns (labels as ids or scores)."""
    task = get_task(task) if isinstance(task, str) else task
    source = str(source)
    with quiet_datasets():
        if is_local_path(source):
            path = split_file(source, task, split)
            ds = _load_parquet(path, task) if path.suffix == ".parquet" else _load_tsv(path, task)
            where = str(path)
        else:
            ds, where = _load_hub(source, task, split), f"{source}:{task.name}/{split}"
    columns = {k: _column(ds, k) for k in (*task.text_keys, "label")}
    columns["label"] = _check_labels(columns["label"], task, where)
    for key in task.text_keys:
        if (bad := next((n for n, x in enumerate(columns[key]) if not isinstance(x, str)), None)) is not None:
            raise ValueError(f"{where}: row {bad}: column {key!r} holds {columns[key][bad]!r}, not text")
    return ds, columns


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars in a stage's output while we load or map (the caller's setting is restored)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _column(ds: Any, key: str) -> list:
    """A column as a list: from a `datasets.Dataset`'s Arrow data, or any mapping of sequences."""
    if hasattr(ds, "with_format"):
        return ds.with_format("arrow")[key].to_pylist()
    return list(ds[key])


def _load_parquet(path: Path, task: GlueTask) -> Any:
    import datasets
    import pyarrow.parquet as pq

    if pq.ParquetFile(path).metadata.num_rows == 0:  # the parquet builder fails on a file without rows
        ds = datasets.Dataset(datasets.table.InMemoryTable(pq.read_table(path)))
    else:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    missing = [k for k in (*task.text_keys, "label") if k not in ds.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing} needed by task {task.name!r} (has {ds.column_names})")
    return ds.select_columns([*task.text_keys, "label"])


def _load_tsv(path: Path, task: GlueTask) -> Any:
    """The GLUE TSV release as strings, quotes verbatim (QUOTE_NONE), columns by header name or (CoLA) by index;
    STS-B's score is the header's last column. A row short of the needed columns fails naming its line."""
    import datasets

    has_header, fields = _TSV_COLUMNS[task.name]
    header: list[str] = []
    if has_header:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = f.readline().rstrip("\r\n")
        header = first.split("\t") if first else []
    index = {}
    for field, col in fields.items():
        if isinstance(col, str) and col == "score":  # STS-B: the score is the last column
            index[field] = len(header) - 1
        elif isinstance(col, str):
            if col not in header:
                raise ValueError(f"{path} lacks column {col!r} needed by task {task.name!r} (header: {header})")
            index[field] = header.index(col)
        else:
            index[field] = col
    width = max(index.values()) + 1
    names = [f"column{i}" for i in range(width)]  # the first `width` columns of every row; more are ignored
    ds = datasets.load_dataset(
        "csv",
        data_files=str(path),
        split="train",
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        header=None,
        skiprows=1 if has_header else None,
        column_names=names,
        usecols=list(range(width)),
        features=datasets.Features({n: datasets.Value("string") for n in names}),
        na_filter=False,  # text as written: "NA", "null", "" stay strings
        skip_blank_lines=False,
        encoding="utf-8-sig",
    )
    _check_row_widths(path, ds.with_format("arrow")[names[-1]].to_pylist(), width, 2 if has_header else 1)
    ds = ds.rename_columns({names[i]: field for field, i in index.items()})
    return ds.select_columns([*task.text_keys, "label"])


def _check_row_widths(path: Path, last: list[str | None], width: int, first_line: int) -> None:
    """A row whose last needed column came back empty may be short: count its fields in the file itself."""
    suspects = {n + first_line for n, x in enumerate(last) if not x}
    if not suspects:
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        for line_number, line in enumerate(f, start=1):
            if line_number in suspects:
                text = line.rstrip("\r\n")
                found = len(text.split("\t")) if text else 0
                if found < width:
                    raise ValueError(
                        f"{path}:{line_number}: expected at least {width} tab-separated columns, found {found}"
                    )


def _load_hub(name: str, task: GlueTask, split: str) -> Any:
    import datasets

    return datasets.load_dataset(name, task.name, split=split)


def _check_labels(labels: list, task: GlueTask, where: str) -> list:
    """Class ids (from ids or label names) or scores, each checked against the task's range."""
    if task.is_regression:
        lo, hi = task.score_range
        scores = []
        for n, x in enumerate(labels):
            try:
                value = float(x)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: row {n}: label {x!r} is not a number (task {task.name!r})") from None
            if not lo <= value <= hi:  # also refuses NaN
                raise ValueError(f"{where}: row {n}: score {value} is outside {lo:g}..{hi:g} for task {task.name!r}")
            scores.append(value)
        return scores
    out = []
    for n, x in enumerate(labels):
        if isinstance(x, str) and not x.lstrip("-").isdigit():
            if x not in task.label_names:
                raise ValueError(f"{where}: row {n}: label {x!r} is not one of {list(task.label_names)}")
            x = task.label_names.index(x)
        if isinstance(x, bool) or not isinstance(x, (int, str)) and not (isinstance(x, float) and x.is_integer()):
            raise ValueError(f"{where}: row {n}: label {x!r} is not a class id of task {task.name!r}")
        x = int(x)
        if not 0 <= x < task.num_labels:
            raise ValueError(f"{where}: row {n}: label {x} is outside 0..{task.num_labels - 1} for task {task.name!r}")
        out.append(x)
    return out
