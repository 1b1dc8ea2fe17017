"""GLUE data: hub, parquet and TSV layouts read by `datasets`, tokenized by a cached `map`, and the
LightningDataModule."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fmn_pl.options import check_count, is_local_path
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
HOLDOUT_SEED = 20_241_124  # fixed: the held-out rows must not move when other seeds change


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
    with _quiet_datasets():
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
def _quiet_datasets() -> Iterator[None]:
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


def subsample(n_rows: int, cap: int | None, seed: int) -> list[int]:
    """Row ids of a seeded sample without replacement (all rows, in order, when `cap` is None or large)."""
    if cap is None or cap >= n_rows:
        return list(range(n_rows))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_rows, generator=g)[:cap].tolist())


class TokenizedDataset(Dataset):
    """Pre-tokenized examples: dicts of int lists plus `labels` (and `idx`, the row id in the split)."""

    def __init__(self, features: dict[str, list], labels: list, rows: list[int]) -> None:
        self.features, self.labels, self.rows = features, labels, rows

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.features.items()}
        item["labels"], item["idx"] = self.labels[i], self.rows[i]
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.features["input_ids"]]


_TOKENIZED = ("input_ids", "attention_mask", "token_type_ids")
_TOKENIZE_VERSION = 1  # part of the cache fingerprint: bump when the same inputs tokenize differently


def tokenize(
    tokenizer: Any, task: GlueTask, dataset: Any, labels: list, rows: list[int], max_length: int
) -> TokenizedDataset:
    """Tokenize the selected rows (single sentence or pair), truncated to `max_length`, unpadded, by
    `Dataset.map(batched=True)` cached by fingerprint: the same rows are tokenized once across stages."""
    from datasets.fingerprint import Hasher

    keys = list(task.text_keys)
    subset = dataset.select_columns(keys).select(rows)
    # the fingerprint is the rows' (datasets' own, private attribute) and the tokenizer's content, not its folder
    fingerprint = Hasher.hash([subset._fingerprint, tokenizer_fingerprint(tokenizer), max_length, _TOKENIZE_VERSION])
    with _quiet_datasets():
        enc = subset.map(
            _tokenize_batch,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "keys": keys, "max_length": max_length},
            remove_columns=keys,
            new_fingerprint=fingerprint,
        )
    table = enc.with_format("arrow")[:]
    features = {k: table.column(k).to_pylist() for k in _TOKENIZED if k in table.column_names}
    return TokenizedDataset(features, [labels[i] for i in rows], rows)


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, keys: list[str], max_length: int) -> dict[str, list]:
    enc = tokenizer(*(batch[k] for k in keys), truncation=True, max_length=max_length, padding=False)
    return {k: enc[k] for k in _TOKENIZED if k in enc}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what the tokenizer's output depends on, from its content, not its folder: a checkpoint's copy
    of the base model's tokenizer hashes the same, so later stages read the fit stage's cached tokens."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: the whole object (its folder included)
        return Hasher.hash(tokenizer)
    state = json.loads(backend.to_str())
    for per_call in ("truncation", "padding"):  # every call sets its own (truncation at max_length, no padding)
        state.pop(per_call, None)
    return Hasher.hash([type(tokenizer).__name__, json.dumps(state, sort_keys=True)])


def collator(tokenizer: Any, regression: bool) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Dynamic padding (every batch to its own longest example, by the tokenizer's rules:
    `DataCollatorWithPadding`), with float labels for a regression task."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return functools.partial(_float_labels, pad) if regression else pad


def _float_labels(pad: Callable, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = pad(items)
    batch["labels"] = batch["labels"].float()
    return batch


class LengthGroupedSampler(Sampler[int]):
    """Shuffled, but batches hold examples of similar length: less padding, same randomness per epoch.

    Shuffle all indices, cut them into mega-batches of `mega * batch_size`, sort each by length and
    shuffle the order of the resulting batches (the scheme of Hugging Face's sampler of that name).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega: int = 50) -> None:
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.mega * self.batch_size
        batches = []
        for start in range(0, len(perm), size):
            chunk = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([i for b in order for i in batches[b]])


class ShardSampler(Sampler[int]):
    """Rank `rank` of `world` takes every world-th index, without padding: no example counted twice."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class GLUEDataModule(L.LightningDataModule):
    """One GLUE task, tokenized once, with dynamic padding and optional length-grouped batches."""

    note_short = True  # say when a cap asks for more rows than there are (off where a default cap is the caller's)

    def __init__(
        self,
        task: str = "rte",
        data_dir: str = "nyu-mll/glue",
        tokenizer: str | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        sample_seed: int = 0,
        group_by_length: bool = False,
        eval_splits: list[str] | None = None,
        unpadded_shards: bool = False,
        holdout_samples: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            task: GLUE task name (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte).
            data_dir: local folder (nyu-mll/glue parquet layout or GLUE TSV layout) or a hub dataset name.
            tokenizer: tokenizer name or folder; the CLI links it to the model's path.
            max_length: truncation length; default 64 for single-sentence tasks, 128 for pairs.
            batch_size: training batch size.
            eval_batch_size: evaluation batch size (default: 2x batch_size).
            max_train_samples: cap on training examples (seeded sample without replacement).
            max_eval_samples: cap on examples per evaluation split (seeded sample without replacement).
            sample_seed: seed of the caps' samples and of the length-grouped shuffling.
            group_by_length: batch training examples of similar length together (less padding). Off by default:
                on STS-B length correlates with the label, and grouped batches left the regression head
                near a constant (benchmarks/fit_parity.py).
            eval_splits: splits the validate/test loops read (default: the task's validation split(s)).
            unpadded_shards: under DDP, shard evaluation data without the padding that Lightning's
                sampler adds (set Trainer(use_distributed_sampler=False)); exact sums for Fisher passes.
            holdout_samples: rows of the train split set aside (seeded, fixed by `sample_seed`) and never
                trained on; readable as the eval split "holdout", a selection set for merge options.
            num_workers: DataLoader workers.
        """
        super().__init__()
        for name in ("batch_size", "eval_batch_size", "max_train_samples", "max_eval_samples", "max_length"):
            check_count(f"data.{name}", locals()[name])
        check_count("data.holdout_samples", holdout_samples, minimum=0)
        check_count("data.num_workers", num_workers, minimum=0)
        if is_local_path(data_dir) and not Path(data_dir).expanduser().is_dir():  # found now, not after set-up
            raise FileNotFoundError(f"data directory {Path(data_dir).expanduser()} does not exist")
        self.save_hyperparameters()
        self.task = get_task(task)
        self.max_length = max_length or self.task.max_length
        self.eval_splits = list(eval_splits or self.task.eval_splits)
        self.train_dataset: TokenizedDataset | None = None
        self.eval_datasets: dict[str, TokenizedDataset] = {}
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not self.hparams.tokenizer:
                raise ValueError("GLUEDataModule needs `tokenizer` (a tokenizer name or folder, usually the model's)")
            self._tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)
        return self._tokenizer

    def load(self, split: str, cap: int | None) -> TokenizedDataset:
        """Read, sample and tokenize one split ("holdout": the held-out rows of train)."""
        dataset, columns = load_split(self.hparams.data_dir, self.task, "train" if split == "holdout" else split)
        rows = list(range(len(columns["label"])))
        if split in ("train", "holdout") and self.hparams.holdout_samples:
            held = set(subsample(len(rows), self.hparams.holdout_samples, HOLDOUT_SEED))
            if split == "train" and len(held) == len(rows):
                raise ValueError(
                    f"data.holdout_samples={self.hparams.holdout_samples} holds out all {len(rows)} training "
                    f"rows of {self.task.name} in {self.hparams.data_dir}: none are left to train on; lower it"
                )
            rows = [r for r in rows if (r in held) == (split == "holdout")]
        if cap is not None and cap > len(rows) and rows and self.note_short:
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank == 0:  # a count that falls short of what was asked is said, once
                print(
                    f"note: {self.task.name} {split}: {cap} examples asked for, {len(rows)} available; using all "
                    f"{len(rows)}",
                    file=sys.stderr,
                )
        rows = [rows[i] for i in subsample(len(rows), cap, self.hparams.sample_seed)]
        if not rows:
            where = self.hparams.data_dir
            if is_local_path(where):
                where = split_file(where, self.task, "train" if split == "holdout" else split)
            raise ValueError(
                f"split {split!r} of task {self.task.name!r} has no rows ({where}): nothing to "
                f"{'train' if split == 'train' else 'score'} on"
            )
        return tokenize(self.tokenizer, self.task, dataset, columns["label"], rows, self.max_length)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.load("train", self.hparams.max_train_samples)
        for split in self.eval_splits:
            if split not in self.eval_datasets:
                self.eval_datasets[split] = self.load(split, self.hparams.max_eval_samples)

    @property
    def num_train_examples(self) -> int:
        return len(self.train_dataset) if self.train_dataset is not None else 0

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return collator(self.tokenizer, self.task.is_regression)

    def train_dataloader(self) -> DataLoader:
        ds, bs = self.train_dataset, self.hparams.batch_size
        if ds is None:
            raise RuntimeError("train_dataloader before setup('fit')")
        sampler = (
            LengthGroupedSampler(ds.lengths, bs, self.hparams.sample_seed) if self.hparams.group_by_length else None
        )
        return DataLoader(
            ds,
            batch_size=bs,
            sampler=sampler,
            shuffle=sampler is None,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
        )

    def eval_dataloader(self, split: str, limit: int | None = None) -> DataLoader:
        """Sorted by length (least padding; order does not change metrics), optionally unpadded shards.
        `limit`: only that many examples, spread evenly over the split's (seeded, shuffled-row) sample."""
        ds = self.eval_datasets[split]
        keep = range(len(ds)) if limit is None or limit >= len(ds) else [k * len(ds) // limit for k in range(limit)]
        order = sorted(keep, key=lambda i: -ds.lengths[i])
        subset = torch.utils.data.Subset(ds, order)
        sampler = None
        if self.hparams.unpadded_shards and torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = ShardSampler(len(subset), torch.distributed.get_rank(), torch.distributed.get_world_size())
        batch_size = self.hparams.eval_batch_size or 2 * self.hparams.batch_size
        if limit is not None:  # a sample spread over the split mixes every length: smaller batches pad less
            batch_size = min(batch_size, 32)
        return DataLoader(
            subset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self.eval_dataloader(s) for s in self.eval_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    test_dataloader = val_dataloader
