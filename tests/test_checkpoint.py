"""`fmn_pl.json` read into typed records (`CheckpointMeta`, `DataSettings`, `ModelSettings`) and written back
byte-identical; a value of the wrong type fails with one line naming the file and the key."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from fmn_pl.checkpoint import METADATA_FILE, CheckpointMeta, DataSettings, MetaRecord, ModelSettings

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo" / "checkpoints" / "sst2"

# An export by `fmn-pl fit` (runs/demo/checkpoints/sst2): LightningCLI links the tokenizer last, so the data
# options are not in `GLUEDataModule.__init__`'s order; plus keys this version does not know, at every level.
EXPORTED = {
    "format_version": 1,
    "task": "sst2",
    "base_model": "../shared/models/all-MiniLM-L6-v2",
    "label_names": ["negative", "positive"],
    "num_labels": 2,
    "metrics": {"val/accuracy": 0.8500000238418579, "val/score": 0.8500000238418579},
    "epoch": 0,
    "epochs_trained": 2,
    "seed": 42,
    "num_train_examples": 2000,
    "data": {
        "task": "sst2",
        "data_dir": "../shared/data/glue",
        "max_length": 64,
        "batch_size": 16,
        "eval_batch_size": None,
        "max_train_samples": 2000,
        "max_eval_samples": None,
        "sample_seed": 42,
        "group_by_length": False,
        "eval_splits": ["holdout"],
        "unpadded_shards": False,
        "holdout_samples": 200,
        "num_workers": 0,
        "tokenizer": "../shared/models/all-MiniLM-L6-v2",
        "from_the_future": {"a": [1, 2]},
    },
    "model_hparams": {
        "model_name_or_path": "../shared/models/all-MiniLM-L6-v2",
        "learning_rate": 0.0001,
        "weight_decay": 0,
        "warmup_ratio": 0.1,
        "adam_epsilon": 1e-08,
        "num_labels": None,
        "attn_implementation": None,
        "task": "sst2",
        "schedule": "linear",
    },
    "fingerprint": "15c2904b3673bea5",
    "merged": {"method": "fmn"},
}


def _same_bytes(folder: Path, tmp_path: Path) -> None:
    """`CheckpointMeta.read(folder)` written again is the same file, byte for byte."""
    copy = tmp_path / "copy"
    copy.mkdir(parents=True)
    CheckpointMeta.read(folder).write(copy)
    assert (copy / METADATA_FILE).read_bytes() == (folder / METADATA_FILE).read_bytes()


def test_a_real_export_round_trips_byte_identical(tmp_path: Path, make_checkpoint) -> None:
    """The demo's export where this machine has it, and always a fixture checkpoint (data and model: none)."""
    if (DEMO / METADATA_FILE).is_file():
        _same_bytes(DEMO, tmp_path / "demo")
    _same_bytes(make_checkpoint("rte"), tmp_path / "fixture")


def test_typed_attributes_and_the_order_and_unknown_keys_kept(tmp_path: Path) -> None:
    meta = CheckpointMeta.from_dict(json.loads(json.dumps(EXPORTED)))
    assert isinstance(meta.data, DataSettings) and isinstance(meta.model_hparams, ModelSettings)
    assert meta.data.holdout_samples == 200 and meta.data.data_dir == "../shared/data/glue"
    assert meta.data.eval_splits == ["holdout"] and meta.model_hparams.learning_rate == 0.0001
    assert meta.data.extra == {"from_the_future": {"a": [1, 2]}} and meta.extra == {"merged": {"method": "fmn"}}
    assert json.dumps(meta.to_dict()) == json.dumps(EXPORTED)  # key order included
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / METADATA_FILE).write_text(json.dumps(EXPORTED, indent=2) + "\n")
    _same_bytes(folder, tmp_path)


def test_partial_records_stay_partial_and_a_field_set_since_is_written() -> None:
    """A hand-written file with few keys is written back with those keys; a field set after reading is added."""
    partial = {"task": "rte", "base_model": "b", "data": {"holdout_samples": 16}}
    meta = CheckpointMeta.from_dict(partial)
    assert meta.to_dict() == partial and meta.data.batch_size == 32 and meta.model_hparams.learning_rate == 2e-5
    assert replace(meta, fingerprint="abc").to_dict() == {**partial, "fingerprint": "abc"}
    built = CheckpointMeta(task="rte", base_model="b")
    assert built.to_dict()["data"] == {} and list(built.to_dict())[:2] == ["format_version", "task"]
    assert CheckpointMeta.from_dict(built.to_dict()) == built


@pytest.mark.parametrize(
    ("where", "value", "line"),
    [
        (("data", "holdout_samples"), "16", "key 'data.holdout_samples' must be int, got str"),
        (("data", "eval_splits"), ["holdout", 3], "key 'data.eval_splits' must be list[str] | None, got list"),
        (("model_hparams", "learning_rate"), True, "key 'model_hparams.learning_rate' must be float, got bool"),
        (("data",), [1], "key 'data' must be a mapping, got list"),
        (("metrics",), {"val/score": "high"}, "key 'metrics' must be dict[str, float], got dict"),
        (("seed",), 1.5, "key 'seed' must be int | None, got float"),
    ],
)
def test_a_wrong_type_fails_with_one_line_naming_the_file_and_key(tmp_path: Path, where, value, line) -> None:
    data = json.loads(json.dumps(EXPORTED))
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        CheckpointMeta.read(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / METADATA_FILE}: {line}") and "\n" not in str(err.value)


def test_a_missing_required_key_or_a_newer_format_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lacks key 'base_model' \(str\)"):
        CheckpointMeta.from_dict({"task": "rte"})
    with pytest.raises(ValueError, match="format_version 2; this fmn-pl reads up to 1"):
        CheckpointMeta.from_dict({**EXPORTED, "format_version": 2})


@pytest.mark.parametrize(
    ("settings", "init", "unrecorded"),
    [
        (DataSettings, "fmn_pl.data:GLUEDataModule", {"task", "data_dir"}),
        (ModelSettings, "fmn_pl.module:GLUETransformer", {"task", "model_name_or_path"}),
    ],
)
def test_settings_are_the_init_arguments(settings: type[MetaRecord], init: str, unrecorded: set[str]) -> None:
    """Each settings record has the class's `__init__` arguments, with its defaults (None: not recorded, where
    the class's default would claim a value)."""
    import importlib

    module, name = init.split(":")
    params = dict(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)
    params.pop("self")
    assert set(settings.hints()) == set(params)
    for f in fields(settings):
        if f.name in params and f.name not in unrecorded and params[f.name].default is not inspect.Parameter.empty:
            assert f.default == params[f.name].default, f.name


def test_the_contract_module_reads_no_lightning_data_code() -> None:
    """`task_datamodule` lives with the data code; `fmn_pl.checkpoint` loads neither Lightning nor torch."""
    code = "import sys, fmn_pl.checkpoint; print(sorted({'lightning', 'torch', 'fmn_pl.data'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"  # a subprocess: this one has torch loaded already
