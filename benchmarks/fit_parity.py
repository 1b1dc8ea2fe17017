"""Fine-tuning parity: `fmn-pl fit` against a plain PyTorch loop at equal budget, validation score per epoch.
Prints one JSON object.

    python benchmarks/fit_parity.py --task stsb --train_samples 3000 --epochs 2 --lr 5e-5   # the issue's budget
    python benchmarks/fit_parity.py --task mrpc --seeds 1 2 --grouped                        # + length-grouped

Both sides fine-tune the same pretrained model on the same training rows (the data module's seeded sample,
after the same held-out rows) with the same recipe: AdamW without decay on biases and LayerNorm weights,
linear warm-up then linear decay, the same batch size, epochs and truncation length. The plain side is
independent of fmn-pl's training code: its own tokenization (the tokenizer called directly), padding
(`DataCollatorWithPadding`), shuffling (a seeded `RandomSampler`), loop and metrics (numpy/scipy). The
fmn-pl side is the CLI path a user runs (`lightning_cli`), scored by its own torchmetrics. Both sides score
the same validation rows after every epoch. Dropout and shuffling draw different random numbers, so the
sides agree to noise, not bitwise: run two seeds where the gap is small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmn_pl.data import GLUEDataModule  # noqa: E402
from fmn_pl.fit import lightning_cli  # noqa: E402
from fmn_pl.tasks import GlueTask, get_task  # noqa: E402

SHARED = REPO.parent / "shared"


def reference_metrics(task: GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics computed with numpy/scipy (independent of torchmetrics), plus `score`, their mean."""
    from scipy import stats

    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float((preds == labels).mean())
        elif name == "f1":
            tp, fp, fn = [int(((preds == a) & (labels == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
            out[name] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        elif name == "matthews":
            out[name] = 0.0 if preds.std() == 0 or labels.std() == 0 else float(np.corrcoef(preds, labels)[0, 1])
        elif name == "pearson":
            out[name] = float(stats.pearsonr(preds, labels)[0])
        elif name == "spearman":
            out[name] = float(stats.spearmanr(preds, labels)[0])
    out["score"] = sum(out.values()) / len(out)
    if task.is_regression:
        out["mse"] = float(((preds - labels) ** 2).mean())
    return out


def rows_of(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Row ids (in the train and validation splits) that both sides use: the data module's selection."""
    dm = GLUEDataModule(
        task=args.task,
        data_dir=args.data_dir,
        tokenizer=args.model,
        max_length=args.max_length,
        max_train_samples=args.train_samples,
        max_eval_samples=args.eval_samples,
        sample_seed=args.sample_seed,
        holdout_samples=args.holdout,
    )
    dm.setup("fit")
    return dm.train_dataset.rows, dm.eval_datasets["validation"].rows


def plain_loop(args: argparse.Namespace, seed: int) -> list[dict[str, float]]:
    """The reference: a bare PyTorch/transformers fine-tuning loop, scored after every epoch."""
    import pyarrow.parquet as pq
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    task = get_task(args.task)
    train_rows, val_rows = rows_of(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    collate = DataCollatorWithPadding(tok)

    def encode(split: str, rows: list[int]) -> list[dict[str, Any]]:
        table = pq.read_table(Path(args.data_dir) / task.name / f"{split}.parquet").to_pydict()
        texts = [[table[k][i] for i in rows] for k in task.text_keys]
        enc = tok(*texts, truncation=True, max_length=args.max_length or task.max_length)
        labels = [table["label"][i] for i in rows]
        return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(rows))]

    train, val = encode("train", train_rows), encode("validation", val_rows)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=task.num_labels)
    model.train()
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=args.lr,
        eps=1e-8,
    )
    sampler = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler, collate_fn=collate)
    total = len(loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    scores = []
    for _ in range(args.epochs):
        model.train()
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"]
            if task.is_regression:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        scores.append(evaluate_plain(model, val, collate, task, args.batch_size * 2))
    return scores


@torch.no_grad()
def evaluate_plain(model: torch.nn.Module, data: list[dict], collate: Any, task: GlueTask, bs: int) -> dict[str, float]:
    model.eval()
    preds, labels = [], []
    for start in range(0, len(data), bs):
        batch = collate(data[start : start + bs])
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        preds.append(logits.squeeze(-1) if task.is_regression else logits.argmax(-1))
        labels.append(batch["labels"])
    return reference_metrics(task, torch.cat(preds).float().numpy(), torch.cat(labels).float().numpy())


class EpochScores(L.Callback):
    """The validation metrics Lightning logged after every training epoch (fmn-pl side)."""

    def __init__(self) -> None:
        self.scores: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.scores.append(
                {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            )


def null(x: Any) -> str:
    """A command-line value: None as YAML's null."""
    return "null" if x is None else str(x)


def fmn_pl_fit(args: argparse.Namespace, seed: int, grouped: bool, workdir: Path) -> list[dict[str, float]]:
    """`fmn-pl fit` as a user runs it, through the CLI, with the same recipe and rows."""
    flags = [
        f"--model.model_name_or_path={args.model}",
        f"--model.learning_rate={args.lr}",
        f"--model.weight_decay={args.weight_decay}",
        f"--model.warmup_ratio={args.warmup_ratio}",
        f"--data.task={args.task}",
        f"--data.data_dir={args.data_dir}",
        f"--data.batch_size={args.batch_size}",
        f"--data.max_train_samples={null(args.train_samples)}",
        f"--data.max_eval_samples={null(args.eval_samples)}",
        f"--data.sample_seed={args.sample_seed}",
        f"--data.holdout_samples={args.holdout}",
        f"--data.group_by_length={grouped}",
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={workdir}",
    ]
    if args.max_length:
        flags.append(f"--data.max_length={args.max_length}")
    cli = lightning_cli(flags, run=False)
    recorder = EpochScores()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    return recorder.scores


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every side for every seed, then the per-epoch gaps (fmn-pl minus plain) of the score."""
    sides: dict[str, Any] = {"plain": {}, "fmn_pl": {}}
    if args.grouped:
        sides["fmn_pl_grouped"] = {}
    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for seed in args.seeds:
            for side in sides:
                start = time.perf_counter()
                if side == "plain":
                    scores = plain_loop(args, seed)
                else:
                    scores = fmn_pl_fit(args, seed, side == "fmn_pl_grouped", Path(tmp) / f"{side}-{seed}")
                timing[side] = timing.get(side, 0.0) + time.perf_counter() - start
                sides[side][str(seed)] = [{k: round(v, 4) for k, v in s.items()} for s in scores]
                print(f"seed {seed} {side}: " + " ".join(f"{s['score']:.4f}" for s in scores), file=sys.stderr)
    gaps = {
        side: [
            round(
                float(
                    np.mean([sides[side][str(s)][e]["score"] - sides["plain"][str(s)][e]["score"] for s in args.seeds])
                ),
                4,
            )
            for e in range(args.epochs)
        ]
        for side in sides
        if side != "plain"
    }
    return {
        "setup": {k: v for k, v in vars(args).items() if k not in ("model", "data_dir")}
        | {"model": Path(args.model).name, "threads": torch.get_num_threads()},
        "scores": sides,
        "mean_gap_per_epoch": gaps,
        "wall_s": {k: round(v, 1) for k, v in timing.items()},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data_dir", default=str(SHARED / "data" / "glue"), help="nyu-mll/glue parquet layout")
    p.add_argument("--task", default="stsb")
    p.add_argument("--train_samples", type=int, default=3000, help="training rows (seeded sample)")
    p.add_argument("--eval_samples", type=int, default=None, help="validation rows (None: all)")
    p.add_argument("--holdout", type=int, default=600, help="training rows held out first, as the fit configs do")
    p.add_argument("--sample_seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=None, help="None: the task's (64 single sentence, 128 pairs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--grouped", action="store_true", help="also run fmn-pl fit with length-grouped batches")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(compare(args), indent=2))


if __name__ == "__main__":
    main()
