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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fmn_pl import records
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


@dataclass(kw_only=True)
class MetaRecord(records.Record):
    """A record of `fmn_pl.json` (`fmn_pl.records.Record`): built here, every field is written."""

    source_name = METADATA_FILE
    write_unset = True


@dataclass(kw_only=True)
class DataSettings(MetaRecord):
    """The `GLUEDataModule` options fine-tuning ran with (its `__init__` arguments): later stages read the same
    rows (tokenizer, `max_length`, held-out rows). None: not recorded."""

    task: str | None = None
    data_dir: str | None = None
    tokenizer: str | None = None
    max_length: int | None = None
    """None: the task's default (64 single-sentence, 128 pairs)."""
    batch_size: int = 32
    eval_batch_size: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    sample_seed: int = 0
    group_by_length: bool = False
    eval_splits: list[str] | None = None
    unpadded_shards: bool = False
    holdout_samples: int = 0
    """Training rows held out of fine-tuning (selection data for merges; never read by the Fisher)."""
    num_workers: int = 0


@dataclass(kw_only=True)
class ModelSettings(MetaRecord):
    """The `GLUETransformer` options fine-tuning ran with (its `__init__` arguments). None: not recorded."""

    model_name_or_path: str | None = None
    task: str | None = None
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    adam_epsilon: float = 1e-8
    num_labels: int | None = None
    attn_implementation: str | None = None


@dataclass(kw_only=True)
class CheckpointMeta(MetaRecord):
    """`fmn_pl.json`: what fine-tuning records about a task checkpoint, read, written and checked here only."""

    format_version: int = FORMAT_VERSION
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
    data: DataSettings = field(default_factory=lambda: DataSettings(source_keys=()))
    """The data module's options: later stages read the same rows. Default: none recorded (written `{}`)."""
    model_hparams: ModelSettings = field(default_factory=lambda: ModelSettings(source_keys=()))
    fingerprint: str | None = None
    """`weights_fingerprint` of the exported weights: artifacts and merges check they read these weights."""

    @classmethod
    def from_dict(cls: type[records.R], data: Any, source: str | Path | None = None, prefix: str = "") -> records.R:
        """Checked: a format version this fmn-pl reads, then the keys and their types (`Record.from_dict`)."""
        source = METADATA_FILE if source is None else source
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version {version!r}; this fmn-pl reads up to {FORMAT_VERSION}: upgrade fmn-pl"
            )
        return super().from_dict(data, source, prefix)

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
        return cls.from_dict(data, meta_file)

    def write(self, folder: str | Path) -> Path:
        """`fmn_pl.json` in `folder`, written atomically."""
        return write_json(Path(folder) / METADATA_FILE, self.to_dict())


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
    meta: CheckpointMeta,
    config_file: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` and `tokenizer` as a task checkpoint at `target` (atomically), with `meta` (its fingerprint
    filled in here), and return its path. An existing export of the same task is replaced; one of another task is
    refused unless `overwrite`."""
    target = Path(target)
    meta = CheckpointMeta.from_dict(meta.to_dict(), target / METADATA_FILE)  # checked as a later read checks it
    check_export_target(target, meta.task, overwrite)
    with atomic_dir(target, overwrite=True, wait=True) as tmp:  # another export of it: seconds
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        command = None
        if config_file is not None and Path(config_file).is_file():
            shutil.copy(config_file, tmp / "config.yaml")
            command = f"fmn-pl fit --config {target / 'config.yaml'}"
        meta = replace(meta, fingerprint=weights_fingerprint(tmp))
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
