"""Training throughput of `fmn-pl fit` against a plain PyTorch loop, and of length-grouped against unsorted
batches, on the same model, data and batches. Prints one JSON object.

    python benchmarks/fit_throughput.py                      # real MiniLM, 256 real RTE examples, CPU
    python benchmarks/fit_throughput.py --reps 5 --epochs 3  # longer, less noisy

Both loops train the same freshly loaded model (same seed) with AdamW and the same linear warm-up/decay
schedule on the batches of the same `GLUEDataModule` loader (same sampler seed and epochs). The Lightning
side is the real CLI path (`lightning_cli`), with its defaults (CSV logger, progress bar), and without the
validation loop, which the plain loop does not have. Throughput is examples per second after the first
step (warm-up), everything between steps included; runs are interleaved and repeated and the median is
reported, so that load from other processes on the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmn_pl.data import GLUEDataModule  # noqa: E402
from fmn_pl.fit import lightning_cli  # noqa: E402
from fmn_pl.module import load_model, model_inputs  # noqa: E402
from fmn_pl.tasks import get_task  # noqa: E402

SHARED = REPO.parent / "shared"


Step = tuple[float, float, int]  # wall clock, process CPU time, examples: at the end of a training step


def mark(n: int) -> Step:
    return time.perf_counter(), time.process_time(), n


class StepTimer(L.Callback):
    """The clocks at the end of every training step and its batch size (Lightning side)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(mark(len(batch["labels"])))


def steady_rate(steps: list[Step], warmup: int, clock: int = 0) -> float:
    """Examples per second from the end of step `warmup` to the end of the last step: everything between
    steps (loading the next batch, logging, progress bar, epoch ends) is inside the timed span.
    `clock` 0 is wall time, 1 the process's CPU time (less sensitive to other processes on the machine)."""
    if len(steps) <= warmup:
        raise ValueError(f"need more than {warmup} steps, got {len(steps)}: raise --examples or --epochs")
    return sum(s[2] for s in steps[warmup:]) / (steps[-1][clock] - steps[warmup - 1][clock])


def data_module(args: argparse.Namespace, group_by_length: bool) -> GLUEDataModule:
    dm = GLUEDataModule(
        task=args.task,
        data_dir=args.data_dir,
        tokenizer=args.model,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_train_samples=args.examples,
        sample_seed=args.seed,
        group_by_length=group_by_length,
    )
    dm.setup("fit")
    return dm


def padding_fraction(dm: GLUEDataModule, epochs: int) -> float:
    """Share of the token positions in the training batches that are padding."""
    pad = total = 0
    loader = dm.train_dataloader()
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            total += batch["attention_mask"].numel()
            pad += int((batch["attention_mask"] == 0).sum())
    return pad / total


def plain_loop(args: argparse.Namespace, group_by_length: bool) -> list[Step]:
    """The reference: the same model, loader, optimizer and schedule in a bare PyTorch loop."""
    from transformers import get_linear_schedule_with_warmup

    task = get_task(args.task)
    dm = data_module(args, group_by_length)
    torch.manual_seed(args.seed)
    model = load_model(args.model, task)
    model.train()
    no_decay = ("bias", "LayerNorm.weight")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": 0.01},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=2e-5,
        eps=1e-8,
    )
    loader = dm.train_dataloader()
    total = len(loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total), total)
    steps = []
    for epoch in range(args.epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append(mark(len(batch["labels"])))
    return steps


def lightning_fit(args: argparse.Namespace, group_by_length: bool, workdir: Path) -> list[Step]:
    """`fmn-pl fit` as a user runs it (default logger and progress bar), validation switched off."""
    cli = lightning_cli(
        [
            f"--model.model_name_or_path={args.model}",
            f"--data.task={args.task}",
            f"--data.data_dir={args.data_dir}",
            f"--data.max_length={args.max_length}",
            f"--data.batch_size={args.batch_size}",
            f"--data.max_train_samples={args.examples}",
            f"--data.sample_seed={args.seed}",
            f"--data.group_by_length={group_by_length}",
            f"--seed_everything={args.seed}",
            f"--trainer.max_epochs={args.epochs}",
            "--trainer.accelerator=cpu",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={workdir}",
            *args.fit_arg,
        ],
        run=False,
    )
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return timer.steps


def summary(runs: list[list[Step]], warmup: int) -> dict[str, Any]:
    wall = [steady_rate(r, warmup, 0) for r in runs]
    cpu = [steady_rate(r, warmup, 1) for r in runs]
    return {
        "examples_per_s": round(statistics.median(wall), 2),
        "examples_per_cpu_s": round(statistics.median(cpu), 2),
        "runs_examples_per_s": [round(r, 2) for r in wall],
    }


def ratio(result: dict[str, Any], a: str, b: str) -> dict[str, float]:
    return {
        clock: round(result[a][key] / result[b][key], 3)
        for clock, key in (("wall", "examples_per_s"), ("cpu", "examples_per_cpu_s"))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--data_dir", default=str(SHARED / "data" / "glue"))
    p.add_argument("--task", default="rte")
    p.add_argument("--examples", type=int, default=256, help="training examples (seeded sample)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1, help="epochs per run")
    p.add_argument("--warmup_steps", type=int, default=1, help="first steps of a run left out of the timing")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_unsorted", action="store_true", help="only Lightning against plain")
    p.add_argument(
        "--fit_arg",
        action="append",
        default=[],
        help="extra `fmn-pl fit` option for the Lightning side, e.g. --fit_arg=--trainer.enable_progress_bar=false",
    )
    args = p.parse_args()

    variants = {"plain": ("plain", True), "fmn_pl_fit": ("lightning", True)}
    if not args.skip_unsorted:
        variants.update({"plain_unsorted": ("plain", False), "fmn_pl_fit_unsorted": ("lightning", False)})
    runs: dict[str, list] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for rep in range(args.reps):
            order = list(variants) if rep % 2 == 0 else list(variants)[::-1]  # alternate who goes first
            for name in order:
                kind, grouped = variants[name]
                if kind == "plain":
                    runs[name].append(plain_loop(args, grouped))
                else:
                    runs[name].append(lightning_fit(args, grouped, Path(tmp) / f"{name}-{rep}"))
                print(
                    f"rep {rep} {name}: {steady_rate(runs[name][-1], args.warmup_steps):.2f} examples/s",
                    file=sys.stderr,
                )
        padding = {g: padding_fraction(data_module(args, g), args.epochs) for g in (True, False)}

    result: dict[str, Any] = {
        "setup": {
            "model": Path(args.model).name,
            "task": args.task,
            "examples": args.examples,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "epochs": args.epochs,
            "warmup_steps": args.warmup_steps,
            "reps": args.reps,
            "fit_args": args.fit_arg,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        **{name: summary(r, args.warmup_steps) for name, r in runs.items()},
    }
    result["fit_vs_plain"] = ratio(result, "fmn_pl_fit", "plain")
    if not args.skip_unsorted:
        result["fit_vs_plain_unsorted"] = ratio(result, "fmn_pl_fit_unsorted", "plain_unsorted")
        result["length_grouped"] = {
            "padding_fraction": round(padding[True], 4),
            "unsorted_padding_fraction": round(padding[False], 4),
            "speedup_plain": ratio(result, "plain", "plain_unsorted"),
            "speedup_fit": ratio(result, "fmn_pl_fit", "fmn_pl_fit_unsorted"),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
