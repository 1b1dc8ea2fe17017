"""Task checkpoints: a Hugging Face folder plus `fmn_pl.json`, written atomically, and their fingerprints.

A task checkpoint is the contract between fine-tuning, the Fisher pass and merging:

    <dir>/config.json, model.safetensors     AutoModelForSequenceClassification.from_pretrained(<dir>)
    <dir>/tokenizer.json, ...                AutoTokenizer.from_pretrained(<dir>)
    <dir>/fmn_pl.json                        task, label names, base model, metrics, seed, examples, fingerprint
    <dir>/config.yaml                        the resolved LightningCLI config that produced it (when run by the CLI)
    <dir>/README.md                          model card: the Hub's metadata (base model, scores, fmn-pl's record)
    <dir>/mask_fisher.safetensors, ...       artifacts of later stages, each tied to the fingerprint
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fmn_pl.files import atomic_dir, sha256_file, write_json
from fmn_pl.model_card import checkpoint_card, write_card

METADATA_FILE = "fmn_pl.json"
FORMAT_VERSION = 1


def weights_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of the checkpoint's safetensors weight files, in name order."""
    path = Path(path)
    files = [f for f in sorted(path.glob("*.safetensors")) if f.name.startswith("model")]
    if not files:
        raise FileNotFoundError(f"{path} holds no model*.safetensors weights")
    return sha256_file(*files)


@dataclass
class CheckpointMeta:
    """`fmn_pl.json`: what fine-tuning records about a task checkpoint, read, written and checked here only."""

    task: str
    base_model: str
    label_names: list[str] = field(default_factory=list)
    num_labels: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the exported epoch (`val/score`, ...)."""
    epoch: int | None = None
    epochs_trained: int | None = None
    seed: int | None = None
    num_train_examples: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    """The data module's options (data_dir, max_length, holdout_samples, ...): later stages read the same rows."""
    model_hparams: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    """`weights_fingerprint` of the exported weights: artifacts and merges check they read these weights."""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (written by a newer fmn-pl, or by hand): kept on a rewrite."""

    @property
    def data_dir(self) -> str | None:
        return self.data.get("data_dir")

    @property
    def max_length(self) -> int | None:
        return self.data.get("max_length")

    @property
    def holdout_samples(self) -> int:
        """Training rows held out of fine-tuning (selection data for merges; never read by the Fisher)."""
        return int(self.data.get("holdout_samples") or 0)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {"format_version": out.pop("format_version"), **out, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = METADATA_FILE) -> "CheckpointMeta":
        """Checked: the required keys, a known format version, and the types of the keys later stages read."""
        for key in ("task", "base_model"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{source} lacks key {key!r} (a string)")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version {version!r}; this fmn-pl reads up to {FORMAT_VERSION}: upgrade fmn-pl"
            )
        for key in ("metrics", "data", "model_hparams"):
            if not isinstance(data.get(key) or {}, dict):
                raise ValueError(f"{source}: {key!r} must be a mapping, got {type(data[key]).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, path: str | Path) -> "CheckpointMeta":
        """The `fmn_pl.json` of a task checkpoint, with an error that says what the folder is missing."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"task checkpoint {path} does not exist")
        meta_file = path / METADATA_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not an fmn-pl task checkpoint: {METADATA_FILE} is missing")
        try:
            data = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{meta_file} holds a {type(data).__name__}, not a JSON object")
        return cls.from_dict(data, meta_file)

    def write(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / METADATA_FILE, self.to_dict())


def task_datamodule(
    checkpoint: str | Path,
    meta: CheckpointMeta,
    split: str = "validation",
    data_dir: str | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    sample_seed: int = 0,
    max_length: int | None = None,
    **options: Any,
) -> Any:
    """The `GLUEDataModule` of a task checkpoint's own data, as fine-tuning read it (its tokenizer, `max_length` and
    held-out rows), for one evaluation split: validation (MNLI: both), holdout (the rows fine-tuning held out) or
    train (the rest). `data_dir`: default the one it was trained on. `options`: more `GLUEDataModule` options."""
    from fmn_pl.data import GLUEDataModule  # Lightning: imported when data is read, not before

    data_dir = data_dir or meta.data_dir
    if not data_dir:
        raise ValueError(f"{checkpoint} does not record its data folder: pass --data_dir")
    if split == "holdout" and meta.holdout_samples <= 0:
        raise ValueError(
            f"{checkpoint} held out no training rows (data.holdout_samples is 0): "
            "choose split validation or train instead, or fine-tune with holdout_samples"
        )
    return GLUEDataModule(
        task=meta.task,
        data_dir=data_dir,
        tokenizer=str(checkpoint),
        max_length=max_length or meta.max_length,
        eval_batch_size=batch_size,
        max_eval_samples=max_samples,
        sample_seed=sample_seed,
        eval_splits=None if split == "validation" else [split],
        holdout_samples=meta.holdout_samples,
        **options,
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checked `fmn_pl.json` of a task checkpoint as a plain dict (for reports that copy it)."""
    return CheckpointMeta.read(path).to_dict()


def check_export_target(target: str | Path, task: str, overwrite: bool = False) -> None:
    """Refuse a non-empty `target` unless it holds an export of the same `task` (or `overwrite`)."""
    target = Path(target)
    if overwrite or not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; refusing to export task {task!r} there")
    if not any(target.iterdir()):
        return
    try:
        other = CheckpointMeta.read(target).task
    except (FileNotFoundError, ValueError):
        other = None
    if other != task:
        what = f"an export of task {other!r}" if other else "files that are not an fmn-pl export"
        raise FileExistsError(f"{target} already holds {what}; refusing to write task {task!r} there without overwrite")


def export_checkpoint(
    model: Any,
    tokenizer: Any,
    target: str | Path,
    metadata: dict[str, Any],
    config_file: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` and `tokenizer` as a task checkpoint at `target` (atomically) and return its path.

    An existing export of the same task is replaced; one of another task is refused unless `overwrite`.
    """
    target = Path(target)
    check_export_target(target, metadata["task"], overwrite)
    with atomic_dir(target, overwrite=True, wait=True) as tmp:  # another export of it: seconds
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        command = None
        if config_file is not None and Path(config_file).is_file():
            shutil.copy(config_file, tmp / "config.yaml")
            command = f"fmn-pl fit --config {target / 'config.yaml'}"
        meta = CheckpointMeta.from_dict({**metadata, "fingerprint": weights_fingerprint(tmp)})
        meta.write(tmp)
        write_card(tmp, checkpoint_card(meta, target.name, command, _base_fingerprint(meta.base_model)))
    return target


def _base_fingerprint(model: str) -> str | None:
    """The weight fingerprint of a local pretrained model folder (None for a hub name or a folder without
    safetensors weights)."""
    try:
        return weights_fingerprint(model) if Path(model).expanduser().is_dir() else None
    except FileNotFoundError:
        return None
