"""Score models on GLUE with each task's own head: a task checkpoint, a merged folder, or a body swapped in.

Scoring uses the task's `GLUEDataModule` and the fine-tuning metrics (`fmn_pl.metrics`), so metrics, padding
and truncation are exactly those of fine-tuning. Each checkpoint's model is loaded once; a body ({parameter
name: tensor}, e.g. a merge held in memory) is swapped into it for one scoring and the checkpoint's own tensors
put back, so a method that scores 20 candidates loads nothing from disk again. The head stays the task's own.
Results of individual checkpoints can be cached beside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from fmn_pl.checkpoint import CheckpointMeta
from fmn_pl.files import sha256_json, write_json
from fmn_pl.options import is_local_path

if TYPE_CHECKING:
    from fmn_pl.data import GLUEDataModule

CACHE_FILE = "fmn_pl_eval.json"
CACHE_VERSION = 2  # 2: entries keep each scored row's prediction (the results bundle reads them)
Split = Literal["validation", "holdout", "train"]


@dataclass(frozen=True)
class EvalData:
    """Which examples a task is scored on."""

    data_dir: str = "../shared/data/glue"
    """Local GLUE folder (parquet or TSV layout) or a hub dataset name."""
    split: Split = "validation"
    """validation: the task's GLUE validation split(s) (MNLI: matched and mismatched, score = their mean);
    holdout: the training rows the checkpoint held out (its `data.holdout_samples`); train: training rows."""
    max_samples: int | None = None
    """Cap on the examples per split (a seeded sample without replacement); None: all."""
    batch_size: int = 64
    """Evaluation batch size."""
    sample_seed: int = 0
    """Seed of the capped sample."""

    def identity(self) -> dict[str, Any]:
        """What the scores depend on (for caches): the options, with a local data folder made absolute."""
        d = asdict(self)
        d.pop("batch_size")
        if is_local_path(self.data_dir):
            d["data_dir"] = str(Path(self.data_dir).expanduser().resolve())
        return d


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's per-Trainer info lines and transformers' weight-loading bars while evaluating repeatedly."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def combine_splits(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """One split's metrics as they are; several (MNLI matched and mismatched) keyed `matched/accuracy`, ... as the
    fine-tuning module logs them, with `score` the mean of the splits' scores."""
    if len(per_split) == 1:
        return next(iter(per_split.values()))
    out = {f"{split.removeprefix('validation_')}/{k}": v for split, m in per_split.items() for k, v in m.items()}
    out["score"] = sum(m["score"] for m in per_split.values()) / len(per_split)
    return out


class Evaluator:
    """Scores task checkpoints (or bodies in their place) on each checkpoint's own task and data."""

    def __init__(
        self,
        checkpoints: Sequence[str | Path],
        data: EvalData,
        accelerator: str = "auto",
        progress: bool = True,
        precision: Literal["32", "bf16", "auto"] = "32",
    ) -> None:
        """`precision`: "bf16" scores under bfloat16 autocast (2.5-3x faster on CPUs with AMX, same predictions
        to within rounding: for option searches); "auto": bf16 where the device supports it; "32": exact."""
        self.checkpoints = [Path(c) for c in checkpoints]
        self.precision = precision
        self.metadata = [CheckpointMeta.read(c) for c in self.checkpoints]
        self.tasks = [m.task for m in self.metadata]
        self.data, self.accelerator, self.progress = data, accelerator, progress
        self._modules: dict[int, GLUEDataModule] = {}
        self._models: dict[int, torch.nn.Module] = {}

    def datamodule(self, i: int) -> GLUEDataModule:
        """Checkpoint i's task data (tokenized once, kept): its tokenizer and fine-tuning `max_length`."""
        from fmn_pl.data import task_datamodule  # Lightning: imported when data is read, not before

        if i not in self._modules:
            dm = task_datamodule(
                self.checkpoints[i],
                self.metadata[i],
                self.data.split,
                self.data.data_dir,
                self.data.batch_size,
                self.data.max_samples,
                self.data.sample_seed,
            )
            dm.note_short = False  # a merge's caps are defaults more often than requests; its report states n
            dm.setup("validate")
            self._modules[i] = dm
        return self._modules[i]

    def identity(self, i: int) -> dict[str, Any]:
        """Everything checkpoint i's scores depend on besides the weights."""
        meta = self.metadata[i]
        return {
            **self.data.identity(),
            "task": self.tasks[i],
            "max_length": meta.data.max_length,
            "holdout_samples": meta.data.holdout_samples if self.data.split != "validation" else None,
        }

    def device(self) -> torch.device:
        """Where scoring runs: the accelerator asked for (auto: CUDA when present)."""
        want = self.accelerator
        if want in ("gpu", "cuda") or (want == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        if want == "mps" or (want == "auto" and torch.backends.mps.is_available()):
            return torch.device("mps")
        return torch.device("cpu")

    def bf16(self) -> bool:
        """Whether scoring runs under bfloat16 autocast (`precision`)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        if self.device().type == "cuda":
            return torch.cuda.is_bf16_supported()
        return self.device().type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def model(self, i: int) -> torch.nn.Module:
        """Checkpoint i's model, loaded once and kept in eval mode; `evaluate(body=)` swaps bodies into it."""
        if i not in self._models:
            from fmn_pl.module import load_model

            with quiet_lightning():
                self._models[i] = load_model(str(self.checkpoints[i]), self.datamodule(i).task).to(self.device()).eval()
        return self._models[i]

    def evaluate(
        self,
        i: int,
        model_dir: str | Path | None = None,
        body: dict[str, torch.Tensor] | None = None,
        limit: int | None = None,
        rows: Rows | None = None,
    ) -> dict[str, float]:
        """Metrics (and `score`) of checkpoint i's task for the model in `model_dir` (default: the checkpoint),
        with its body replaced by `body` when given, on `limit` examples per split (spread evenly; None: all).
        The checkpoint's model is loaded once: a body is swapped in for the call and its own tensors put back.
        `rows`: filled with every scored row's split, row id, label and prediction (the results bundle)."""
        if model_dir is not None:
            from fmn_pl.module import load_model

            with quiet_lightning():
                model = load_model(str(model_dir), self.datamodule(i).task).to(self.device()).eval()
            return self._score(i, model, limit, rows)
        model = self.model(i)
        if body is None:
            return self._score(i, model, limit, rows)
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        if unexpected := [k for k in body if k not in params]:
            raise ValueError(f"merged body has tensors the {self.tasks[i]} model lacks: {unexpected[:3]}")
        own = {k: params[k].detach().clone() for k in body}
        try:
            with torch.no_grad():
                for k, v in body.items():
                    params[k].copy_(v)
            return self._score(i, model, limit, rows)
        finally:
            with torch.no_grad():
                for k, v in own.items():
                    params[k].copy_(v)

    @torch.no_grad()
    def _score(
        self, i: int, model: torch.nn.Module, limit: int | None = None, rows: Rows | None = None
    ) -> dict[str, float]:
        """The task's GLUE metrics over every eval split of its data module (keys as the fine-tuning module logs
        them: one split `accuracy`, several `matched/accuracy`, with `score` their mean); `rows` as `evaluate`."""
        from fmn_pl.metrics import glue_metrics, predictions, with_score
        from fmn_pl.module import model_inputs

        dm, device = self.datamodule(i), self.device()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16())
        per_split = {}
        for split in dm.eval_splits:
            metrics = glue_metrics(dm.task).to(device)
            for batch in tqdm(
                dm.eval_dataloader(split, limit), desc=f"score {self.tasks[i]}", leave=False, disable=not self.progress
            ):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast:
                    logits = model(**model_inputs(batch)).logits
                predicted = predictions(dm.task, logits.float())
                metrics.update(predicted, batch["labels"])
                if rows is not None:
                    add_rows(rows, split, batch, predicted)
            per_split[split] = with_score(metrics.compute())
        return combine_splits(per_split)

    def baseline(self, i: int) -> tuple[dict[str, float], int]:
        """The constant-prediction baseline of checkpoint i's task on the examples `evaluate` scores (the majority
        class, or the label mean), keyed as `evaluate` keys its metrics, and how many examples there are."""
        from fmn_pl.metrics import majority_baseline

        dm = self.datamodule(i)
        per_split = {name: majority_baseline(dm.task, torch.tensor(ds.labels)) for name, ds in dm.eval_datasets.items()}
        return combine_splits(per_split), sum(len(ds) for ds in dm.eval_datasets.values())

    def scores(
        self, body: dict[str, torch.Tensor], tasks: Sequence[str] | None = None, limit: int | None = None
    ) -> dict[str, float]:
        """{task: score} of `body` with every task's own head (of `tasks` only, on `limit` examples each): the
        selection function merge methods call."""
        return {t: self.evaluate(self.tasks.index(t), body=body, limit=limit)["score"] for t in tasks or self.tasks}


Rows = dict[str, list]
"""Scored rows as columns: split, row (the row id in the split), label, prediction (class id, or the score)."""


def add_rows(rows: Rows, split: str, batch: dict[str, torch.Tensor], predicted: torch.Tensor) -> None:
    """Append one batch's rows to `rows` (the order is the loader's: by length; `row` says which is which)."""
    n = len(batch["labels"])
    rows.setdefault("split", []).extend([split] * n)
    rows.setdefault("row", []).extend(int(r) for r in batch["idx"].tolist())
    rows.setdefault("label", []).extend(batch["labels"].tolist())
    rows.setdefault("prediction", []).extend(predicted.tolist())


class EvalCache:
    """Scores remembered in `<checkpoint>/fmn_pl_eval.json` by key (options, data and weight fingerprints),
    so a study of many merges evaluates each individual model (and each plain average) once."""

    def __init__(self, enabled: bool = True, log: Callable[[str], None] = print) -> None:
        self.enabled, self.log = enabled, log

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return sha256_json({"v": CACHE_VERSION, **key})

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def get(self, checkpoint: str | Path, key: dict[str, Any]) -> tuple[dict[str, float], Rows] | None:
        """(metrics, scored rows) remembered under `key`, or None."""
        if not self.enabled:
            return None
        entry = self._read(Path(checkpoint) / CACHE_FILE).get(self.digest(key))
        return (entry["metrics"], entry["rows"]) if entry else None  # CACHE_VERSION keys: every entry has rows

    def put(self, checkpoint: str | Path, key: dict[str, Any], metrics: dict[str, float], rows: Rows) -> None:
        """Add one entry (re-reading the file first, so concurrent merges lose little); a read-only folder
        only loses the cache."""
        if not self.enabled:
            return
        path = Path(checkpoint) / CACHE_FILE
        entries = self._read(path)
        entries[self.digest(key)] = {"key": key, "metrics": metrics, "rows": rows}
        try:
            write_json(path, entries)
        except OSError as e:
            self.log(f"could not cache evaluation results in {path}: {e}")
