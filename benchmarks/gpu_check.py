"""The GPU check of `benchmarks/gpu_check.sh` (at most 8 minutes on one GPU): what CI, which has no GPU, cannot
test. Prints one JSON object (also written to `<out>/gpu_check.json`) and exits 1 when a check fails.

    python benchmarks/gpu_check.py --out /tmp/gpu-check          # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry_run                     # the commands it would run (any machine)

1. fit: a few hundred fine-tuning steps of MiniLM on SST-2 in `bf16-mixed` on one GPU; the exported model must
   beat the constant prediction clearly. A second, shorter fit (RTE) gives the merge its second task.
2. fisher: the mask Fisher of that checkpoint on the GPU and on the CPU, on the same rows, equal within 1e-4
   (relative to the largest entry); with more than one GPU also under DDP on all of them.
3. ddp fit (more than one GPU only): the SST-2 fit on every GPU with `--trainer.strategy ddp`.
4. merge: task arithmetic with `scaling: null` (lambda chosen by scoring candidates) in this process with
   `--accelerator gpu`: its scoring must allocate GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOLERANCE = 1e-4


def fit_command(args: argparse.Namespace, task: str, rows: int, export: Path, devices: int = 1) -> list[str]:
    """`fmn-pl fit` of `task` on `rows` training rows (one epoch, batch 32) in bf16-mixed on `devices` GPUs."""
    command = [
        sys.executable,
        "-m",
        "fmn_pl.cli",
        "fit",
        f"--model.model_name_or_path={args.model}",
        f"--data.task={task}",
        f"--data.data_dir={args.data}",
        f"--data.max_train_samples={rows}",
        "--data.max_eval_samples=872",
        "--data.holdout_samples=256",
        "--data.batch_size=32",
        "--model.learning_rate=5e-5",
        "--trainer.max_epochs=1",
        "--trainer.precision=bf16-mixed",
        "--trainer.accelerator=gpu",
        f"--trainer.devices={devices}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={export.parent / 'logs'}",
        f"--export.dirpath={export}",
    ]
    return command + (["--trainer.strategy=ddp"] if devices > 1 else [])


def fisher_command(checkpoint: Path, args: argparse.Namespace, accelerator: str, devices: int = 1) -> list[str]:
    """`fmn-pl fisher` (mask kind) of `checkpoint` on `args.fisher_rows` training rows, float32."""
    command = [
        sys.executable,
        "-m",
        "fmn_pl.cli",
        "fisher",
        f"--checkpoint={checkpoint}",
        f"--data_dir={args.data}",
        f"--num_examples={args.fisher_rows}",
        f"--trainer.accelerator={accelerator}",
        f"--trainer.devices={devices}",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
    ]
    return command + (["--trainer.strategy=ddp"] if devices > 1 else [])


def merge_args(checkpoints: list[Path], output: Path, args: argparse.Namespace) -> list[str]:
    """`fmn-pl merge` arguments: task arithmetic, lambda chosen by scoring on held-out rows, on the GPU."""
    return [
        "--method=task_arithmetic",
        "--method.scaling=null",
        "--checkpoints",
        *map(str, checkpoints),
        f"--output={output}",
        f"--data_dir={args.data}",
        "--eval.max_samples=500",
        "--accelerator=gpu",
        "--progress=false",
    ]


def run(command: list[str], log: Path) -> dict[str, Any]:
    """Run `command`, its output to `log`: exit status and wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=ENV).returncode
    return {"status": status, "wall_s": round(time.perf_counter() - start, 1), "log": str(log)}


def compare_fisher(a: Path, b: Path) -> dict[str, Any]:
    """Largest difference of two mask-Fisher artifacts, absolute and relative to the largest entry."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    out: dict[str, Any] = {}
    for key in sorted(x):
        scale = float(x[key].abs().max())
        diff = float((x[key].double() - y[key].double()).abs().max())
        out[key] = {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else diff}
    out["equal_within_1e-4"] = all(v["max_rel_diff"] <= TOLERANCE for v in out.values() if isinstance(v, dict))
    return out


def check(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count()
    result: dict[str, Any] = {"gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else None}
    if not gpus:
        result["ok"] = False
        result["error"] = "no CUDA GPU visible"
        return result
    sst2, rte = work / "sst2", work / "rte"
    result["fit"] = run(fit_command(args, "sst2", args.steps * 32, sst2), work / "fit-sst2.log")
    result["fit"]["steps"] = args.steps
    if result["fit"]["status"] == 0:
        meta = json.loads((sst2 / "fmn_pl.json").read_text())
        result["fit"]["val_score"] = meta["metrics"].get("val/score")
        result["fit"]["learned"] = (result["fit"]["val_score"] or 0) > 0.7  # the constant scores 0.51
    result["fit_rte"] = run(fit_command(args, "rte", 1600, rte), work / "fit-rte.log")
    copies = {name: work / f"sst2-{name}" for name in ("cpu", "gpu", *(["ddp"] if gpus > 1 else []))}
    if result["fit"]["status"] == 0:
        for name, folder in copies.items():
            shutil.copytree(sst2, folder)
            devices = gpus if name == "ddp" else 1
            accelerator = "cpu" if name == "cpu" else "gpu"
            result[f"fisher_{name}"] = run(
                fisher_command(folder, args, accelerator, devices), work / f"fisher-{name}.log"
            )
        for name in copies.keys() - {"cpu"}:
            if result[f"fisher_{name}"]["status"] == 0 and result["fisher_cpu"]["status"] == 0:
                pair = (copies["cpu"] / "mask_fisher.safetensors", copies[name] / "mask_fisher.safetensors")
                result[f"fisher_{name}"]["vs_cpu"] = compare_fisher(*pair)
    if gpus > 1:
        result["fit_ddp"] = run(fit_command(args, "sst2", args.steps * 32, work / "sst2-ddp-fit", gpus), work / "d.log")
    if result["fit"]["status"] == 0 and result["fit_rte"]["status"] == 0:
        result["merge"] = merge_on_gpu([sst2, rte], work / "merged", args)
    result["ok"] = passed(result)
    return result


def merge_on_gpu(checkpoints: list[Path], output: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The merge in this process, so that its GPU memory can be read: scoring on the GPU allocates some."""
    import torch

    from fmn_pl.merge_cli import main as merge

    start = time.perf_counter()
    try:
        report = merge(merge_args(checkpoints, output, args))
    except Exception as e:  # noqa: BLE001 - the check reports it in its JSON
        return {"status": 1, "error": f"{type(e).__name__}: {e}"}
    peak = torch.cuda.max_memory_allocated()
    return {
        "status": 0,
        "wall_s": round(time.perf_counter() - start, 1),
        "gpu_peak_mb": round(peak / 2**20, 1),
        "scored_on_gpu": peak > 0,
        "choices": report.choices if report else None,
    }


def passed(result: dict[str, Any]) -> bool:
    """Every check that ran passed."""
    checks = [result["fit"]["status"] == 0 and result["fit"].get("learned", False)]
    for name in ("fisher_gpu", "fisher_ddp"):
        if name in result:
            checks.append(result[name].get("vs_cpu", {}).get("equal_within_1e-4", False))
    if "fit_ddp" in result:
        checks.append(result["fit_ddp"]["status"] == 0)
    checks.append(result.get("merge", {}).get("scored_on_gpu", False))
    return all(checks)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--data", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--steps", type=int, default=300, help="SST-2 fine-tuning steps (batch 32, one epoch)")
    parser.add_argument("--fisher_rows", type=int, default=512, help="rows of the GPU/CPU mask Fisher comparison")
    parser.add_argument("--out", default=None, help="folder for the logs, checkpoints and gpu_check.json")
    parser.add_argument("--dry_run", action="store_true", help="print the commands it would run, run nothing")
    args = parser.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    if args.dry_run:
        plan = {
            "fit": fit_command(args, "sst2", args.steps * 32, work / "sst2"),
            "fisher_gpu": fisher_command(work / "sst2-gpu", args, "gpu"),
            "fisher_cpu": fisher_command(work / "sst2-cpu", args, "cpu"),
            "merge": ["fmn-pl", "merge", *merge_args([work / "sst2", work / "rte"], work / "merged", args)],
        }
        print(json.dumps(plan, indent=2))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = check(args, work)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2, default=str)
    (work / "gpu_check.json").write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
