"""Peak memory and time of `fmn-pl merge` for 2, 4 and 8 checkpoints, against one checkpoint's size.

Makes task checkpoints from one pretrained model (its body plus seeded noise, a fresh head per GLUE task,
random mask-Fisher and Gram artifacts) in a temporary folder, then runs each merge without evaluation in a
fresh process and prints JSON. Methods that choose options on data get one candidate (no search); AdaMerging
runs a few steps on real GLUE inputs (`--data_dir`). `net_rss` is the peak resident memory minus the process's
resident memory after imports; the goal is net_rss <= 3x one checkpoint whatever the count.

    python benchmarks/merge_memory.py [--model ../shared/models/all-MiniLM-L6-v2] [--counts 2 4 8]
        [--methods average fmn ties regmean tall consensus adamerging]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("rte", "mrpc", "stsb", "cola", "sst2", "qnli", "qqp", "mnli")
METHOD_ARGS = {
    "average": [],
    # the streaming merge: normalization, p and s fixed, nothing chosen on data
    "fmn": ["--method.normalize=none", "--method.power=0.25", "--method.scaling=1.0"],
    "fisher": [],
    "ties": ["--method.scaling=1.0"],
    "task_arithmetic": ["--method.scaling=0.5"],
    "regmean": [],
    "tall": ["--method.lambdas=[0.4]"],
    "consensus": ["--method.lambdas=[0.4]", "--method.scaling=0.5"],
    "adamerging": ["--method.steps=5", "--method.batch_size=8", "--selection.samples=64"],
}


def make_checkpoints(model: str, root: Path, count: int) -> list[Path]:
    """`count` task checkpoints of distinct GLUE tasks: the model's body plus seeded noise, with mask Fisher and
    Grams (random, of the right shapes)."""
    import torch
    from transformers import AutoTokenizer

    from fmn_pl.artifacts import artifact_path, save_artifact
    from fmn_pl.checkpoint import CheckpointMeta, export_checkpoint, weights_fingerprint
    from fmn_pl.grams import gram_keys
    from fmn_pl.module import load_model
    from fmn_pl.nodes import node_shape
    from fmn_pl.tasks import get_task

    out = []
    tokenizer = AutoTokenizer.from_pretrained(model)
    for seed, name in enumerate(TASKS[:count]):
        target = root / name
        if not (target / "fmn_pl.json").is_file():
            task = get_task(name)
            torch.manual_seed(seed)
            net = load_model(model, task)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            meta = CheckpointMeta(
                task=name,
                label_names=list(task.label_names),
                num_labels=task.num_labels,
                base_model=model,
                seed=seed,
            )
            export_checkpoint(net.eval(), tokenizer, target, meta)
            layers, heads, ffn = node_shape(net.config)
            g = torch.Generator().manual_seed(seed)
            save_artifact(
                artifact_path(target, "mask_fisher"),
                {"head": torch.rand(layers, heads, generator=g), "neuron": torch.rand(layers, ffn, generator=g)},
                {"kind": "mask_fisher", "task": name, "fingerprint": weights_fingerprint(target)},
            )
            modules = dict(net.named_modules())
            grams = {}
            for key in dict.fromkeys(gram_keys(net).values()):
                x = torch.randn(2 * modules[key].in_features, modules[key].in_features, generator=g)
                grams[key] = x.T @ x / len(x)
            save_artifact(
                artifact_path(target, "grams"),
                grams,
                {"kind": "grams", "task": name, "fingerprint": weights_fingerprint(target)},
            )
            del net, grams
        out.append(target)
    return out


def vm_hwm() -> int:
    """Peak resident bytes of this process image (VmHWM). Not `ru_maxrss`: a child started by vfork/exec keeps
    the parent's peak there, so a large parent hides the child's own figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(argv: list[str]) -> None:
    """One merge in this process: print {net, peak and baseline RSS, timings} as JSON on the last line."""
    import psutil
    import transformers  # noqa: F401

    import fmn_pl.merge_cli as merge

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    report = merge.main(argv)
    total = time.perf_counter() - start
    peak = vm_hwm()
    print(
        json.dumps(
            {
                "baseline_rss": baseline,
                "peak_rss": peak,
                "net_rss": peak - baseline,
                "merge_s": report.timings["merge_s"] if report else None,
                "total_s": total,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["average", "fmn", "ties"], choices=sorted(METHOD_ARGS))
    parser.add_argument("--data_dir", default="../shared/data/glue", help="GLUE data (AdaMerging adapts on it)")
    parser.add_argument("--workdir", default=None, help="keep the generated checkpoints here (default: a temp dir)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        checkpoints = make_checkpoints(args.model, root / "checkpoints", max(args.counts))
        size = (checkpoints[0] / "model.safetensors").stat().st_size
        results = []
        for method in args.methods:
            for count in args.counts:
                out = root / f"merge-{method}-{count}"
                argv = [
                    "--method",
                    method,
                    *METHOD_ARGS[method],
                    "--checkpoints",
                    *map(str, checkpoints[:count]),
                    "--output",
                    str(out),
                    "--evaluate",
                    "false",
                    "--progress",
                    "false",
                    "--base",
                    args.model,
                    "--data_dir",
                    args.data_dir,
                ]
                proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{method} x{count} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(
                    {"method": method, "checkpoints": count, **r, "net_over_checkpoint": r["net_rss"] / size}
                )
                print(json.dumps(results[-1]), file=sys.stderr)
        print(
            json.dumps(
                {"model": args.model, "checkpoint_bytes": size, "goal": "net_rss <= 3x checkpoint", "results": results},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
