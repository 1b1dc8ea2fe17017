"""GLUE data: hub, parquet and TSV layouts read by `datasets`, tokenized by a cached `map`, and the
LightningDataModule."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fmn_pl.options import check_count, is_local_path
from fmn_pl.sources import load_split, quiet_datasets, split_file
from fmn_pl.tasks import GlueTask, get_task

if TYPE_CHECKING:
    from fmn_pl.checkpoint import CheckpointMeta

HOLDOUT_SEED = 20_241_124  # fixed: the held-out rows must not move when other seeds change


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
    with quiet_datasets():
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
) -> GLUEDataModule:
    """The `GLUEDataModule` of a task checkpoint's own data, as fine-tuning read it (its tokenizer, `max_length` and
    held-out rows), for one evaluation split: validation (MNLI: both), holdout (the rows fine-tuning held out) or
    train (the rest). `data_dir`: default the one it was trained on. `options`: more `GLUEDataModule` options."""
    data_dir = data_dir or meta.data.data_dir
    if not data_dir:
        raise ValueError(f"{checkpoint} does not record its data folder: pass --data_dir")
    if split == "holdout" and meta.data.holdout_samples <= 0:
        raise ValueError(
            f"{checkpoint} held out no training rows (data.holdout_samples is 0): "
            "choose split validation or train instead, or fine-tune with holdout_samples"
        )
    return GLUEDataModule(
        task=meta.task,
        data_dir=data_dir,
        tokenizer=str(checkpoint),
        max_length=max_length or meta.data.max_length,
        eval_batch_size=batch_size,
        max_eval_samples=max_samples,
        sample_seed=sample_seed,
        eval_splits=None if split == "validation" else [split],
        holdout_samples=meta.data.holdout_samples,
        **options,
    )
