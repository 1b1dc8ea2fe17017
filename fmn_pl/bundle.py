"""The results bundle of a pipeline run: every scored row of every model (individual, plain average, each
merge) with its label and prediction, plus what each merge chose and on how many candidates, the configs and
the weight fingerprints. Small enough to commit (zstd parquet + JSON); `fmn_pl.evidence` reads nothing else.

    <run>/bundle/rows.parquet   seed, combination, model, task, split, row, label, prediction
    <run>/bundle/bundle.json    config, checkpoints (epoch, held-out metrics, fingerprint), merges (choices)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmn_pl.files import atomic_path, write_json
from fmn_pl.merge_report import Choice, MergeReport

BUNDLE = "bundle"
ROWS = "rows.parquet"
META = "bundle.json"
VERSION = 1
INDIVIDUAL = "individual"
AVERAGE = "average"
COLUMNS = ("seed", "combination", "model", "task", "split", "row", "label", "prediction")
SELECTION_KEYS = ("split", "max_samples", "sample_seed", "bf16")  # what a bundle keeps of a merge's selection


@dataclass
class Bundle:
    """One run's bundle in memory: `rows` as columns (lists), `meta` as written."""

    rows: dict[str, list]
    meta: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])


def collect(run: Path, seed: int) -> Bundle:
    """The bundle of the pipeline run in `run`: read from its merges' reports and its checkpoints' metadata.
    The individual model's rows are kept once per task (every merge scores the same rows), the plain
    average's once per combination."""
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    merges: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, str, str]] = set()
    for report_file in sorted((run / "merges").glob("*/*/report.json")):
        report = MergeReport.read(report_file)
        combo, label = report_file.parent.parent.name, report_file.parent.name
        merges[f"{combo}/{label}"] = _merge_meta(report)
        for task, result in report.results.items():
            for model, scored in result.rows.items():
                name = label if model == "merged" else model
                where = "" if model == INDIVIDUAL else combo
                if (where, name, task) in seen:
                    continue
                seen.add((where, name, task))
                n = len(scored.get("row", []))
                for column, value in (("seed", seed), ("combination", where), ("model", name), ("task", task)):
                    rows[column] += [value] * n
                for column in ("split", "row", "label", "prediction"):
                    rows[column] += scored[column]
    if not merges:
        raise FileNotFoundError(f"{run}/merges holds no merge report: nothing to bundle")
    return Bundle(rows, {"version": VERSION, "seed": seed, **_run_meta(run), "merges": merges})


def _merge_meta(report: MergeReport) -> dict[str, Any]:
    """What the bundle keeps of one merge report: method, options, each chosen option with its grid, the
    distinct candidates scored on held-out rows (its budget) and the scorings that took, storage and time."""
    chosen = {k.removeprefix(f"{report.method}_"): c for k, c in report.chosen().items()}
    selection = report.selection.to_dict() if report.selection else {}
    return {
        "method": report.method,
        "options": report.options,
        "choices": {option: {"chosen": c.chosen, "grid": c.grid} for option, c in chosen.items()},
        "candidates": max((_candidates(c) for c in chosen.values()), default=0),
        "evaluations": report.selection.evaluations if report.selection else 0,
        "selection": {k: selection[k] for k in SELECTION_KEYS if k in selection},
        "fingerprints": {c.task: c.fingerprint for c in report.checkpoints},
        "storage": report.storage.to_dict() if report.storage else None,
        "timings": report.timings,
    }


def _candidates(choice: Choice) -> int:
    """Distinct candidates a search scored: every one screened, or every one scored when nothing was screened."""
    return len((choice.screened.mean_scores if choice.screened else None) or choice.scores)


def _run_meta(run: Path) -> dict[str, Any]:
    """The run's resolved config and each checkpoint's exported epoch, held-out metrics and fingerprint."""
    import yaml

    from fmn_pl.checkpoint import METADATA_FILE, CheckpointMeta

    checkpoints = {}
    for meta_file in sorted((run / "checkpoints").glob(f"*/{METADATA_FILE}")):
        meta = CheckpointMeta.read(meta_file.parent)  # checked, one line naming the file where it is not
        checkpoints[meta_file.parent.name] = {
            k: getattr(meta, k) for k in ("epoch", "epochs_trained", "metrics", "num_train_examples", "fingerprint")
        } | {"artifacts": _artifacts(meta_file.parent)}
    config = run / "pipeline.yaml"
    return {"config": yaml.safe_load(config.read_text()) if config.is_file() else None, "checkpoints": checkpoints}


def _artifacts(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """Each artifact beside a checkpoint: the examples it read and the seconds it took (its header says)."""
    from fmn_pl.tensorfile import read_header

    out = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        meta = read_header(path)[0].get("__metadata__") or {}
        if "kind" in meta:
            out[meta["kind"]] = {k: json.loads(meta[k]) for k in ("num_examples", "seconds") if k in meta}
    return out


def write(bundle: Bundle, folder: Path) -> None:
    """`rows.parquet` (zstd) and `bundle.json` in `folder`, each written whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: bundle.rows[c] for c in COLUMNS})
    with atomic_path(folder / ROWS) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=19)
    write_json(folder / META, bundle.meta)


def read(folder: Path) -> Bundle:
    """A bundle written by `write`; one line naming the folder when it is not one."""
    import pyarrow.parquet as pq

    if not (folder / ROWS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(f"{folder} is not a results bundle (it needs {ROWS} and {META})")
    meta = json.loads((folder / META).read_text())
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{folder / META} is bundle version {meta['version']}: upgrade fmn-pl to read it")
    return Bundle(pq.read_table(folder / ROWS).to_pydict(), meta)


def read_all(folder: Path) -> list[Bundle]:
    """Every seed's bundle under `folder` (`seed-*/`, or `folder` itself for one run), by seed."""

    def at(run: Path) -> Path:  # a pipeline run keeps its bundle in bundle/, a committed one is the folder
        return run / BUNDLE if (run / BUNDLE).is_dir() else run

    found = [read(at(p)) for p in sorted(folder.glob("seed-*")) if p.is_dir()] or [read(at(folder))]
    return sorted(found, key=lambda b: b.seed)
