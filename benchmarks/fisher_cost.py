"""Cost of the Fisher kinds against an evaluation pass, on the same examples: time and artifact size, JSON.

    python benchmarks/fisher_cost.py --model ../shared/models/all-MiniLM-L6-v2 --task rte --num_examples 128

Runs on the model with a fresh classifier head (speed does not depend on the head's training). Each
variant runs `--reps` times, interleaved, and reports the median seconds; `ratio_to_eval` divides by the
plain forward pass over the same batches, and `ratio_full_to_mask` compares full Fisher with the default
mask Fisher. Published FMN speed-ups (57x-322x) compare each method at its own settings; pass
`--full_examples 4096 --num_examples 128` style options to reproduce that comparison as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fmn_pl.data import GLUEDataModule
from fmn_pl.fisher import FullFisher, MaskFisher
from fmn_pl.module import load_model, model_inputs
from fmn_pl.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def batches(model_dir: str, data_dir: str, task: str, n: int, batch_size: int) -> list[dict]:
    dm = GLUEDataModule(
        task=task,
        data_dir=data_dir,
        tokenizer=model_dir,
        eval_splits=["train"],
        max_eval_samples=n,
        eval_batch_size=batch_size,
    )
    dm.setup("validate")
    return list(dm.val_dataloader())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/all-MiniLM-L6-v2"))
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared/data/glue"))
    p.add_argument("--task", default="rte")
    p.add_argument("--num_examples", type=int, default=128)
    p.add_argument("--full_examples", type=int, default=None, help="examples of the full Fisher (default: the same)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no_full", action="store_true", help="skip the (slow) full-Fisher variants")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    model = load_model(args.model, task).eval()
    data = batches(args.model, args.data_dir, args.task, args.num_examples, args.batch_size)
    full_data = (
        data
        if args.full_examples in (None, args.num_examples)
        else batches(args.model, args.data_dir, args.task, args.full_examples, args.batch_size)
    )

    def evaluate() -> None:
        with torch.inference_mode():
            for b in data:
                model(**model_inputs(b))

    def fisher(cls: type, agg: str, labels: str, rows: list[dict]):
        def run() -> None:
            acc = cls(model, agg, labels)
            with acc.active():
                for b in rows:
                    acc.step(b)
            run.size = sum(t.numel() * 4 for t in acc.result().values())  # float32 bytes on disk

        return run

    variants = {
        "eval": evaluate,
        "mask/per_example/empirical": fisher(MaskFisher, "per_example", "empirical", data),
        "mask/per_batch/empirical": fisher(MaskFisher, "per_batch", "empirical", data),
        "mask/per_example/expected": fisher(MaskFisher, "per_example", "expected", data),
        "full/per_example/expected": fisher(FullFisher, "per_example", "expected", full_data),
        "full/per_example/empirical": fisher(FullFisher, "per_example", "empirical", full_data),
    }
    if args.no_full:
        variants = {k: v for k, v in variants.items() if not k.startswith("full/")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):  # interleaved, so a busy machine slows every variant alike
        for name, fn in variants.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": Path(args.model).name,
        "task": args.task,
        "num_examples": args.num_examples,
        "full_examples": args.full_examples or args.num_examples,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "ratio_to_eval": {k: round(v / med["eval"], 2) for k, v in med.items()},
        "ratio_full_to_mask": None
        if args.no_full
        else round(med["full/per_example/expected"] / med["mask/per_example/empirical"], 1),
        "artifact_bytes": {k: getattr(fn, "size", 0) for k, fn in variants.items() if k != "eval"},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
