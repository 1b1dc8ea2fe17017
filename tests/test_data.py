"""GLUE data: parquet and TSV layouts read the same rows, bad data fails with one line naming the file,
tokenization of single and paired tasks, dynamic padding, seeded caps and length-grouped batches."""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmn_pl.data import GLUEDataModule, LengthGroupedSampler, collator, subsample
from fmn_pl.options import is_local_path
from fmn_pl.sources import read_split, split_file
from fmn_pl.tasks import TASKS, get_task
from tests.conftest import GLUE, GLUE_TSV, make_sentence, requires_shared

# Sentences with the characters that break a quoting TSV reader: leading quotes, unbalanced quotes.
QUIRKY = ['"Hello," she said.', "it's a 'quote", 'a lone " mark', '""', "tab-free, comma, text", "x"]


def glue_rows(task: str, n: int, seed: int) -> dict[str, list]:
    """Rows of `task` in nyu-mll/glue form (text columns, int or float label), with quirky quotes."""
    spec, rng = get_task(task), random.Random(seed)
    rows = {k: [QUIRKY[i] if i < len(QUIRKY) else make_sentence(rng) for i in range(n)] for k in spec.text_keys}
    if spec.is_regression:
        rows["label"] = [round(rng.uniform(0, 5), 3) for _ in range(n)]
    else:
        rows["label"] = [rng.randrange(spec.num_labels) for _ in range(n)]
    return rows


def write_parquet(root: Path, task: str, split: str, rows: dict[str, list]) -> Path:
    (root / task).mkdir(parents=True, exist_ok=True)
    cols = dict(rows)
    if get_task(task).is_regression:
        cols["label"] = pa.array(rows["label"], pa.float32())
    cols["idx"] = list(range(len(rows["label"])))
    pq.write_table(pa.table(cols), root / task / f"{split}.parquet")
    return root / task / f"{split}.parquet"


def write_tsv(root: Path, task: str, split: str, rows: dict[str, list]) -> Path:
    """The original GLUE release's layout and quirks, written by hand (not by the reader's own tables)."""
    spec = get_task(task)
    n = len(rows["label"])
    name = {"label": lambda i: rows["label"][i]}
    text = lambda k: lambda i: rows[k][i]  # noqa: E731
    label_name = lambda i: spec.label_names[rows["label"][i]]  # noqa: E731
    bom = ""
    if task == "cola":  # no header: source, label, original mark, sentence
        header, cols = (
            None,
            [lambda i: "gj04", name["label"], lambda i: "" if rows["label"][i] else "*", text("sentence")],
        )
    elif task == "sst2":
        header, cols = ["sentence", "label"], [text("sentence"), name["label"]]
    elif task == "mrpc":  # header starts with a byte-order mark
        bom = "\ufeff"
        header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        cols = [name["label"], lambda i: str(1000 + i), lambda i: str(2000 + i), text("sentence1"), text("sentence2")]
    elif task == "stsb":  # ten columns, the score last
        header = [
            "index",
            "genre",
            "filename",
            "year",
            "old_index",
            "source1",
            "source2",
            "sentence1",
            "sentence2",
            "score",
        ]
        cols = [
            lambda i: str(i),
            lambda i: "main-captions",
            lambda i: "MSRvid",
            lambda i: "2012test",
            lambda i: f"{i:04d}",
            lambda i: "none",
            lambda i: "none",
            text("sentence1"),
            text("sentence2"),
            lambda i: f"{rows['label'][i]:.3f}",
        ]
    elif task == "qqp":
        header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        cols = [
            lambda i: str(i),
            lambda i: str(2 * i),
            lambda i: str(2 * i + 1),
            text("question1"),
            text("question2"),
            name["label"],
        ]
    elif task == "mnli":  # string labels in gold_label, after other label columns
        header = ["index", "promptID", "genre", "sentence1", "sentence2", "label1", "gold_label"]
        cols = [
            lambda i: str(i),
            lambda i: str(i),
            lambda i: "fiction",
            text("premise"),
            text("hypothesis"),
            label_name,
            label_name,
        ]
    elif task == "qnli":
        header, cols = (
            ["index", "question", "sentence", "label"],
            [lambda i: str(i), text("question"), text("sentence"), label_name],
        )
    elif task == "rte":  # string labels
        header = ["index", "sentence1", "sentence2", "label"]
        cols = [lambda i: str(i), text("sentence1"), text("sentence2"), label_name]
    else:  # pragma: no cover
        raise AssertionError(task)
    lines = ([bom + "\t".join(header)] if header else []) + ["\t".join(str(c(i)) for c in cols) for i in range(n)]
    folder = root / spec.tsv_dir
    folder.mkdir(parents=True, exist_ok=True)
    fname = {"validation": "dev", "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}
    path = folder / f"{fname.get(split, split)}.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_same_columns(a: dict[str, list], b: dict[str, list], regression: bool) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "label" and regression:
            assert a[k] == pytest.approx(b[k], abs=1e-5)
        else:
            assert a[k] == b[k], k


# -- layouts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_tsv_layout_reads_like_parquet(tmp_path, task):
    spec = get_task(task)
    for n, split in enumerate(("train", *spec.eval_splits)):
        rows = glue_rows(task, 23, seed=n)
        pq_path = write_parquet(tmp_path / "parquet", task, split, rows)
        tsv_path = write_tsv(tmp_path / "tsv", task, split, rows)
        assert split_file(tmp_path / "parquet", spec, split) == pq_path
        assert split_file(tmp_path / "tsv", spec, split) == tsv_path
        from_parquet = read_split(tmp_path / "parquet", task, split)
        from_tsv = read_split(tmp_path / "tsv", task, split)
        assert set(from_tsv) == {*spec.text_keys, "label"}
        assert_same_columns(from_tsv, from_parquet, spec.is_regression)
        assert from_tsv[spec.text_keys[0]][:4] == QUIRKY[:4]  # quote characters kept verbatim
        expected = rows["label"]
        assert from_tsv["label"] == (pytest.approx(expected, abs=1e-5) if spec.is_regression else expected)


def test_tiny_glue_fixture_reads_for_every_task(tiny_glue):
    for task, spec in TASKS.items():
        cols = read_split(tiny_glue, task, "train")
        assert len(cols["label"]) == 64 and set(cols) == {*spec.text_keys, "label"}
        assert all(isinstance(x, float if spec.is_regression else int) for x in cols["label"])


@requires_shared
@pytest.mark.parametrize("task", ["rte", "mrpc", "cola", "stsb", "sst2"])
def test_real_glue_tsv_dev_equals_parquet(task):
    """The real GLUE TSV release (BOM, no header, string labels, ten columns) reads as the hub parquet."""
    from_tsv = read_split(GLUE_TSV, task, "validation")
    from_parquet = read_split(GLUE, task, "validation")
    assert len(from_tsv["label"]) == len(from_parquet["label"]) > 200
    assert_same_columns(from_tsv, from_parquet, get_task(task).is_regression)


def test_hub_name_goes_to_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [1, 0], "idx": [0, 1]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert not is_local_path("nyu-mll/glue")
    cols = read_split("nyu-mll/glue", "rte", "validation")
    assert calls == [("nyu-mll/glue", "rte", "validation")] and cols["label"] == [1, 0]
    with pytest.raises(ValueError, match=r"nyu-mll/glue:rte/train: row 0: label 5 is outside 0\.\.1"):
        monkeypatch.setitem(
            sys.modules,
            "datasets",
            types.SimpleNamespace(load_dataset=lambda *a, **k: {"sentence1": ["a"], "sentence2": ["b"], "label": [5]}),
        )
        read_split("nyu-mll/glue", "rte", "train")


def test_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glue_data").mkdir()
    assert is_local_path("glue_data") and is_local_path("./nowhere") and is_local_path(str(tmp_path / "x"))
    assert not is_local_path("nyu-mll/glue") and not is_local_path("glue")


# -- bad data: one line, naming the file ----------------------------------------------------------------
def one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_split(tmp_path / "absent", "rte", "train")
    assert f"data directory {tmp_path / 'absent'} does not exist" in one_line(e)


def test_data_dir_without_the_task(tmp_path, tiny_glue):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        read_split(tmp_path, "rte", "train")
    assert "neither rte/" in one_line(e) and "RTE/" in one_line(e) and str(tmp_path) in one_line(e)


@pytest.mark.parametrize("layout", ["parquet", "tsv"])
def test_missing_split_names_the_file(tmp_path, layout):
    write = write_parquet if layout == "parquet" else write_tsv
    write(tmp_path, "mnli", "train", glue_rows("mnli", 5, 0))
    write(tmp_path, "mnli", "validation_matched", glue_rows("mnli", 5, 0))
    with pytest.raises(FileNotFoundError) as e:
        read_split(tmp_path, "mnli", "validation_mismatched")
    missing = (
        tmp_path / "mnli" / "validation_mismatched.parquet"
        if layout == "parquet"
        else tmp_path / "MNLI" / "dev_mismatched.tsv"
    )
    assert f"{missing} does not exist" in one_line(e) and "validation_mismatched" in one_line(e)


def test_parquet_missing_column(tmp_path):
    rows = glue_rows("rte", 4, 0)
    del rows["sentence2"]
    path = write_parquet(tmp_path, "rte", "train", rows)
    with pytest.raises(ValueError) as e:
        read_split(tmp_path, "rte", "train")
    assert str(path) in one_line(e) and "'sentence2'" in one_line(e)


def test_tsv_missing_column(tmp_path):
    path = write_tsv(tmp_path, "mrpc", "train", glue_rows("mrpc", 4, 0))
    path.write_text(path.read_text(encoding="utf-8").replace("#2 String", "String 2"), encoding="utf-8")
    with pytest.raises(ValueError) as e:
        read_split(tmp_path, "mrpc", "train")
    assert str(path) in one_line(e) and "'#2 String'" in one_line(e)


def test_tsv_short_row(tmp_path):
    path = write_tsv(tmp_path, "cola", "train", glue_rows("cola", 4, 0))
    lines = path.read_text().splitlines()
    lines[2] = "gj04\t1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        read_split(tmp_path, "cola", "train")
    assert f"{path}:3:" in one_line(e) and "found 2" in one_line(e)


@pytest.mark.parametrize(
    "task, label, message",
    [
        ("rte", 2, r"row 3: label 2 is outside 0..1 for task 'rte'"),
        ("rte", -1, r"row 3: label -1 is outside 0..1"),
        ("mnli", 3, r"row 3: label 3 is outside 0..2"),
        ("stsb", 5.5, r"row 3: score 5.5 is outside 0..5 for task 'stsb'"),
        ("stsb", -0.5, r"row 3: score -0.5 is outside 0..5"),
    ],
)
def test_parquet_labels_out_of_range(tmp_path, task, label, message):
    rows = glue_rows(task, 6, 0)
    rows["label"][3] = label
    path = write_parquet(tmp_path, task, "validation_matched" if task == "mnli" else "validation", rows)
    with pytest.raises(ValueError) as e:
        read_split(tmp_path, task, path.stem)
    assert str(path) in one_line(e) and message in one_line(e)


def test_parquet_null_label(tmp_path):
    rows = glue_rows("sst2", 4, 0)
    rows["label"][1] = None
    path = write_parquet(tmp_path, "sst2", "train", rows)
    with pytest.raises(ValueError) as e:
        read_split(tmp_path, "sst2", "train")
    assert str(path) in one_line(e) and "row 1: label None is not a class id" in one_line(e)


def test_tsv_unknown_label_name(tmp_path):
    path = write_tsv(tmp_path, "rte", "validation", glue_rows("rte", 4, 0))
    path.write_text(path.read_text().replace("not_entailment", "contradiction", 1))
    with pytest.raises(ValueError) as e:
        read_split(tmp_path, "rte", "validation")
    assert str(path) in one_line(e) and "'contradiction' is not one of ['entailment', 'not_entailment']" in one_line(e)


def test_unknown_task(tiny_glue):
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'; expected one of: cola, sst2"):
        read_split(tiny_glue, "wnli", "train")
    with pytest.raises(ValueError, match="unknown GLUE task"):
        GLUEDataModule(task="glue")
    assert get_task("SST-2").name == "sst2"


# -- tokenization, padding, caps, batching ---------------------------------------------------------------
def data_module(tiny_glue, tokenizer_dir, task="rte", **kw) -> GLUEDataModule:
    dm = GLUEDataModule(task=task, data_dir=str(tiny_glue), tokenizer=str(tokenizer_dir), **kw)
    dm.setup("fit")
    return dm


def test_tokenize_single_sentence(tiny_glue, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dm = data_module(tiny_glue, tokenizer_dir, "sst2")
    cols = read_split(tiny_glue, "sst2", "train")
    assert dm.max_length == 64 and len(dm.train_dataset) == 64
    for i in (0, 17, 63):
        item = dm.train_dataset[i]
        words = cols["sentence"][item["idx"]].split()
        assert item["input_ids"] == [tok.cls_token_id, *tok.convert_tokens_to_ids(words), tok.sep_token_id]
        assert tok.unk_token_id not in item["input_ids"] and len(set(item["input_ids"])) > 3
        assert set(item["token_type_ids"]) == {0} and item["attention_mask"] == [1] * len(item["input_ids"])
        assert item["labels"] == cols["label"][item["idx"]]


def test_tokenize_sentence_pair(tiny_glue, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dm = data_module(tiny_glue, tokenizer_dir, "stsb")
    cols = read_split(tiny_glue, "stsb", "validation")
    ds = dm.eval_datasets["validation"]
    item = ds[5]
    a, b = (tok.convert_tokens_to_ids(cols[k][item["idx"]].split()) for k in ("sentence1", "sentence2"))
    assert item["input_ids"] == [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
    assert item["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok.unk_token_id not in item["input_ids"]
    assert item["labels"] == pytest.approx(cols["label"][item["idx"]])


def test_truncation_to_max_length(tiny_glue, tokenizer_dir):
    dm = data_module(tiny_glue, tokenizer_dir, "rte", max_length=9)
    assert max(dm.train_dataset.lengths) == 9 and min(dm.train_dataset.lengths) >= 5


def test_collator_pads_each_batch_to_its_longest(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.pad_token = tok.convert_ids_to_tokens(7)
    items = [
        {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 1, "idx": 4},
        {"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 0], "labels": 0, "idx": 9},
    ]
    batch = collator(tok, regression=False)(items)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["idx"].tolist() == [4, 9]
    reg = collator(tok, regression=True)([{"input_ids": [1], "labels": 2, "idx": 0}])
    assert reg["labels"].dtype == torch.float32 and reg["labels"].tolist() == [2.0]


def test_dynamic_padding_in_the_loaders(tiny_glue, tokenizer_dir):
    dm = data_module(tiny_glue, tokenizer_dir, "rte", batch_size=8)
    lengths = dm.train_dataset.lengths
    seen = []
    for batch in dm.train_dataloader():
        rows = [dm.train_dataset.rows.index(i) for i in batch["idx"].tolist()]
        assert batch["input_ids"].shape[1] == max(lengths[r] for r in rows) < dm.max_length
        assert batch["attention_mask"].sum(1).tolist() == [lengths[r] for r in rows]
        seen += batch["idx"].tolist()
    assert sorted(seen) == sorted(dm.train_dataset.rows)  # every example once per epoch
    val = list(dm.val_dataloader())
    assert sum(len(b["labels"]) for b in val) == 32 and len(val[0]["labels"]) == 16  # eval batch: 2x
    widths = [b["input_ids"].shape[1] for b in val]
    assert widths == sorted(widths, reverse=True)  # evaluation sorted by length


@pytest.mark.parametrize("split_cap", ["train", "eval"])
def test_caps_are_seeded_samples_without_replacement(tiny_glue, tokenizer_dir, split_cap):
    def rows(seed, cap=10):
        kw = {"max_train_samples": cap} if split_cap == "train" else {"max_eval_samples": cap}
        dm = data_module(tiny_glue, tokenizer_dir, "mrpc", sample_seed=seed, **kw)
        return dm.train_dataset.rows if split_cap == "train" else dm.eval_datasets["validation"].rows

    a, b, c = rows(0), rows(0), rows(1)
    assert a == b and a != c and len(a) == len(set(a)) == 10
    assert set(a) <= set(range(64 if split_cap == "train" else 32))
    assert rows(0, cap=1000) == list(range(64 if split_cap == "train" else 32))
    assert subsample(5, None, 0) == [0, 1, 2, 3, 4]


def test_num_train_examples_and_mnli_loaders(tiny_glue, tokenizer_dir):
    dm = data_module(tiny_glue, tokenizer_dir, "mnli", max_train_samples=20, max_eval_samples=7)
    assert dm.num_train_examples == 20
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert [sum(len(b["labels"]) for b in dl) for dl in loaders] == [7, 7]


def test_holdout_is_never_trained_on(tiny_glue, tokenizer_dir):
    dm = data_module(tiny_glue, tokenizer_dir, "rte", holdout_samples=16, eval_splits=["holdout"])
    held, train = set(dm.eval_datasets["holdout"].rows), set(dm.train_dataset.rows)
    assert len(held) == 16 and len(train) == 48 and not held & train
    with pytest.raises(ValueError, match=r"holdout_samples=64 holds out all 64 training rows of rte"):
        data_module(tiny_glue, tokenizer_dir, "rte", holdout_samples=64)


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    return pad / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouped_sampler():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(500)]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3, mega=10)
    order = list(sampler)
    assert sorted(order) == list(range(500)) and len(sampler) == 500
    assert list(LengthGroupedSampler(lengths, 16, seed=3, mega=10)) == order  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled each epoch
    grouped = [order[i : i + 16] for i in range(0, 500, 16)]
    shuffled = torch.randperm(500, generator=torch.Generator().manual_seed(0)).tolist()
    unsorted = [shuffled[i : i + 16] for i in range(0, 500, 16)]
    assert padding_fraction(grouped, lengths) < 0.5 * padding_fraction(unsorted, lengths)
    # batches still come in random order (not longest-first throughout)
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_group_by_length_in_the_train_loader(tiny_glue, tokenizer_dir):
    def batches(group):
        dm = data_module(tiny_glue, tokenizer_dir, "rte", batch_size=8, group_by_length=group)
        ids = [[dm.train_dataset.rows.index(i) for i in b["idx"].tolist()] for b in dm.train_dataloader()]
        return ids, dm.train_dataset.lengths

    (grouped, lengths), (plain, _) = batches(True), batches(False)
    assert padding_fraction(grouped, lengths) < padding_fraction(plain, lengths)


def test_missing_tokenizer_is_a_clear_error(tiny_glue):
    dm = GLUEDataModule(task="rte", data_dir=str(tiny_glue))
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        dm.setup("fit")
