"""`datasets` as the data path: every real GLUE file reads exactly as the former pyarrow/csv reader read it, and
a row set is tokenized once (a second data module, or a checkpoint's copy of the tokenizer, hits the cache)."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fmn_pl import data, sources
from fmn_pl.data import GLUEDataModule
from fmn_pl.sources import read_split, split_file
from fmn_pl.tasks import TASKS, GlueTask, get_task
from tests.conftest import GLUE, GLUE_TSV, requires_shared


def reference_columns(path: Path, task: GlueTask) -> dict[str, list]:
    """The former reader (pyarrow for parquet, `csv` with QUOTE_NONE for TSV), raw: before label validation."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return {k: table.column(k).to_pylist() for k in (*task.text_keys, "label")}
    has_header, fields = sources._TSV_COLUMNS[task.name]
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows.pop(0) if has_header else []
    index = {
        f: len(header) - 1 if c == "score" else header.index(c) if isinstance(c, str) else c for f, c in fields.items()
    }
    return {k: [row[index[k]] for row in rows] for k in (*task.text_keys, "label")}


@pytest.mark.real
@requires_shared
@pytest.mark.parametrize("root", [GLUE, GLUE_TSV], ids=["parquet", "tsv"])
def test_real_files_read_as_the_former_reader(root):
    """Every split of every task present: the same rows in the same order, the same text, the same labels."""
    seen = 0
    for task in TASKS.values():
        for split in ("train", *task.eval_splits):
            try:
                path = split_file(root, task, split)
            except FileNotFoundError:
                continue
            ds, cols = sources.load_split(root, task, split)
            raw = reference_columns(path, task)
            for key in task.text_keys:
                assert cols[key] == raw[key], (path, key)
            assert cols["label"] == sources._check_labels(raw["label"], task, str(path)), path
            assert all(type(x) is (float if task.is_regression else int) for x in cols["label"])
            assert ds.column_names == [*task.text_keys, "label"] and len(ds) == len(raw["label"])
            seen += 1
    assert seen >= (11 if root == GLUE else 9)  # parquet: 5 tasks x 2 splits + qnli validation; TSV: 9 files


@pytest.fixture
def fresh_cache(tmp_path: Path, tiny_glue: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty datasets cache and a copy of the tiny data (so no earlier test's cache entries count)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    shutil.copytree(tiny_glue / "rte", tmp_path / "glue" / "rte")
    return tmp_path / "glue"


@pytest.fixture
def tokenizations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows each tokenizer call of the map received."""
    calls: list[int] = []
    original = data._tokenize_batch

    def counting(batch, **kwargs):
        calls.append(len(batch[kwargs["keys"][0]]))
        return original(batch, **kwargs)

    monkeypatch.setattr(data, "_tokenize_batch", counting)
    return calls


def setup(glue: Path, tokenizer: Path, **kw) -> GLUEDataModule:
    dm = GLUEDataModule(task="rte", data_dir=str(glue), tokenizer=str(tokenizer), holdout_samples=16, **kw)
    dm.setup("fit")
    return dm


def test_second_data_module_reads_the_cache(fresh_cache, tokenizer_dir, tokenizations, tmp_path):
    first = setup(fresh_cache, tokenizer_dir, eval_splits=["holdout", "validation"])
    assert sum(tokenizations) == 48 + 16 + 32  # train, holdout and validation rows, once each
    tokenizations.clear()
    second = setup(fresh_cache, tokenizer_dir, eval_splits=["holdout", "validation"])
    assert tokenizations == []  # the cache hit: no row tokenized again
    for split in ("holdout", "validation"):
        a, b = first.eval_datasets[split], second.eval_datasets[split]
        assert (a.features, a.labels, a.rows) == (b.features, b.labels, b.rows)
    assert (first.train_dataset.features, first.train_dataset.rows) == (
        second.train_dataset.features,
        second.train_dataset.rows,
    )
    cached = list((tmp_path / "hf-datasets").rglob("cache-*.arrow"))
    assert len(cached) == 3, cached

    copy = tmp_path / "checkpoint-tokenizer"  # an exported checkpoint's copy of the tokenizer: same content
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(copy)
    setup(fresh_cache, copy, eval_splits=["validation"])
    assert tokenizations == []

    setup(fresh_cache, tokenizer_dir, eval_splits=["validation"], max_length=9)  # other options: tokenized anew
    assert sum(tokenizations) == 48 + 32
    tokenizations.clear()
    setup(fresh_cache, tokenizer_dir, eval_splits=["validation"], max_train_samples=20)  # other rows: anew
    assert sum(tokenizations) == 20


def test_hub_dataset_is_tokenized_by_map(monkeypatch, tokenizer_dir, tiny_glue):
    """A hub name: `load_dataset(name, task, split=...)`, then the same validation and tokenization."""
    import datasets

    def load_dataset(name, config, split):
        table = pq.read_table(tiny_glue / config / f"{split}.parquet")
        return datasets.Dataset.from_dict(table.to_pydict())

    local = GLUEDataModule(task="rte", data_dir=str(tiny_glue), tokenizer=str(tokenizer_dir), max_train_samples=10)
    local.setup("fit")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = GLUEDataModule(task="rte", data_dir="nyu-mll/glue", tokenizer=str(tokenizer_dir), max_train_samples=10)
    hub.setup("fit")
    assert (
        hub.train_dataset.features == local.train_dataset.features
        and hub.train_dataset.rows == local.train_dataset.rows
    )
    assert hub.eval_datasets["validation"].labels == local.eval_datasets["validation"].labels


def test_tsv_text_stays_text(tmp_path):
    """Cells that a CSV reader would take for missing values or numbers ("NA", "null", "", "1.5") stay strings."""
    (tmp_path / "SST-2").mkdir()
    lines = ["sentence\tlabel", "NA\t1", "null\t0", "\t1", "1.5\t0", "nan\t1", '"quoted\t0']
    (tmp_path / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cols = read_split(tmp_path, get_task("sst2"), "train")
    assert cols == {"sentence": ["NA", "null", "", "1.5", "nan", '"quoted'], "label": [1, 0, 1, 0, 1, 0]}


def test_tsv_blank_line_is_a_short_row(tmp_path):
    (tmp_path / "RTE").mkdir()
    path = tmp_path / "RTE" / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n\n2\tc\td\tentailment\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: expected at least 4 tab-separated columns, found 0$"):
        read_split(tmp_path, "rte", "validation")
