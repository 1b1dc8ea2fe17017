"""Wall time and peak memory of `fmn-pl merge --method ties` against mergekit's TIES (`mergekit-yaml`, 0.1.5) on
the same N MiniLM task checkpoints, each a fresh process, and how far apart the two merged bodies are. Prints
one JSON object.

    python benchmarks/ties_vs_mergekit.py [--checkpoints DIR ...] [--n 8] [--reps 3]
        [--base ../shared/models/all-MiniLM-L6-v2] [--mergekit /tmp/mk/bin/mergekit-yaml]

Checkpoints: `--checkpoints` (default: the five fine-tuned MiniLM tasks in runs/reference/checkpoints). When
fewer than `--n` are given, the rest are made in a temporary folder from copies of the binary-task ones, with
their task vectors scaled entry-wise by a seeded U(0.5, 1.5) and relabelled as unused GLUE tasks (qnli, qqp,
mnli: `fmn-pl merge` wants distinct tasks; mnli's copy gets a seeded random 3-way head); the JSON lists them
under "synthetic".

Options, as close as the two allow: top 20% (mergekit density 0.2), weight 1, lambda 1, the disjoint mean
(mergekit normalize: true; with weight 1 its divisor is the count of agreeing entries), float32. What still
differs is listed under "differences" in the JSON: mergekit trims each tensor to its own top k% where fmn-pl
(as the TIES reference code) trims over the whole body, mergekit elects + where the sum is 0 where fmn-pl takes
the majority sign, and mergekit keeps exactly k entries by sort order where fmn-pl keeps every |tau| >= the
k-th. mergekit reads Hugging Face folders of one architecture, and 0.1.5 fails on a bare `BertModel` (its
bert.json gives the optional position_ids aliases, and `plan_tensor` adds that tuple to a list: TypeError), so
every input, the base included, is converted once (not timed) to a `BertForSequenceClassification` folder: the
body's float tensors under `bert.` (what fmn-pl merges) and one zero 2-way head, the same in every folder (the
task heads differ in shape: 1, 2 and 3 labels); the merged zero head is ignored.

Times are the median over `--reps` runs (interleaved) of the whole process, start-up and writing included;
`peak_rss_mb` is the process's peak resident memory (GNU time's %M). fmn-pl runs without evaluation
(`--evaluate=false`); its own split of the time is `check_s`/`merge_s` from its report. The goal: fmn-pl at
most 0.5x mergekit's time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rte", "mrpc", "cola", "stsb", "sst2")
SPARE_TASKS = ("qnli", "qqp", "mnli")
PREFIX = "bert."
DIFFERENCES = [
    "trim: mergekit keeps each tensor's own top density fraction; fmn-pl (as the TIES reference code) keeps each "
    "task vector's top k% over the whole body",
    "zero sums: mergekit elects + where the trimmed sum is exactly 0; fmn-pl takes the majority sign there",
    "ties at the threshold: mergekit keeps exactly int(density * n) entries by sort order; fmn-pl keeps every "
    "|tau| >= the k-th largest",
    "scope: mergekit merges the converted folders (the body, as fmn-pl, plus one zero head); fmn-pl also writes each "
    "task's head folder and a report, and hashes every checkpoint's weights before merging",
]


def find_mergekit(given: str | None) -> str | None:
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("mergekit-yaml") or (
        "/tmp/mk/bin/mergekit-yaml" if Path("/tmp/mk/bin/mergekit-yaml").is_file() else None
    )


def make_synthetic(sources: list[Path], base: Path, root: Path, count: int, used: set[str]) -> list[Path]:
    """`count` more checkpoints: copies of binary-task `sources` with task vectors scaled by U(0.5, 1.5) per entry
    (a random head where the new task's label count differs)."""
    import torch

    from fmn_pl.checkpoint import METADATA_FILE, weights_fingerprint
    from fmn_pl.tasks import get_task
    from fmn_pl.tensorfile import CheckpointReader, save_tensors

    base_reader = CheckpointReader(base, prefix=PREFIX)
    binary = [s for s in sources if json.loads((s / METADATA_FILE).read_text())["num_labels"] == 2]
    names = [t for t in SPARE_TASKS if t not in used]
    if len(names) < count or not binary:
        raise SystemExit(f"cannot make {count} more checkpoints of distinct GLUE tasks from {sources}")
    out = []
    for j in range(count):
        src, name, target = binary[j % len(binary)], names[j], root / names[j]
        target.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".json", ".txt") and f.name != METADATA_FILE:
                shutil.copy(f, target / f.name)
        reader, g, task = CheckpointReader(src), torch.Generator().manual_seed(j), get_task(name)
        tensors = {}
        for key in reader.keys():
            t = reader.get(key)
            if key.startswith(PREFIX) and t.is_floating_point() and key in base_reader:
                b = base_reader.get(key).to(t.dtype)
                t = b + (t - b) * (0.5 + torch.rand(t.shape, generator=g))
            elif not key.startswith(PREFIX) and t.shape[0] == 2 and task.num_labels != 2:  # classifier rows
                t = 0.02 * torch.randn((task.num_labels, *t.shape[1:]), generator=g)
            tensors[key] = t
        save_tensors(target / "model.safetensors", tensors)
        config = json.loads((src / "config.json").read_text())
        labels = list(task.label_names) or ["LABEL_0"]
        config.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        (target / "config.json").write_text(json.dumps(config, indent=2))
        meta = json.loads((src / METADATA_FILE).read_text())
        meta.update(task=name, label_names=list(task.label_names), num_labels=task.num_labels)
        meta["fingerprint"] = weights_fingerprint(target)
        (target / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        out.append(target)
    return out


def classifier_folder(src: Path, config: Path, target: Path, prefix: str = "") -> Path:
    """A `BertForSequenceClassification` folder of `src`'s body (its float tensors under `bert.`; `prefix` is
    prepended where the source lacks it, as in a bare `BertModel`) with one zero 2-way head, the same in every
    folder, and the config `config`."""
    from fmn_pl.tensorfile import CheckpointReader, save_tensors

    reader = CheckpointReader(src)
    target.mkdir(parents=True)
    tensors = {prefix + k: reader.get(k) for k in reader.keys() if (prefix + k).startswith(PREFIX)}
    tensors = {k: v for k, v in tensors.items() if v.is_floating_point()}
    hidden = tensors[PREFIX + "pooler.dense.bias"].shape[0]
    tensors |= {"classifier.weight": torch_zeros(2, hidden), "classifier.bias": torch_zeros(2)}
    save_tensors(target / "model.safetensors", tensors)
    shutil.copy(config, target / "config.json")
    return target


def torch_zeros(*shape: int):
    import torch

    return torch.zeros(shape)


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process, by GNU time."""
    stats = log.with_suffix(".time")
    with open(log, "w") as fh:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd], check=True, stdout=fh, stderr=fh)
    wall, kb = stats.read_text().split()[-2:]
    return float(wall), int(kb) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=[str(ROOT / "runs/reference/checkpoints" / t) for t in TASKS])
    p.add_argument("--n", type=int, default=8, help="checkpoints merged (extra ones are made, see above)")
    p.add_argument("--base", default=str(ROOT.parent / "shared/models/all-MiniLM-L6-v2"))
    p.add_argument("--mergekit", default=None, help="mergekit-yaml (default: on PATH, else /tmp/mk/bin)")
    p.add_argument("--top_k", type=float, default=20.0, help="percent kept (mergekit density = top_k / 100)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temporary folder)")
    args = p.parse_args()

    result: dict = {"n": args.n, "top_k": args.top_k, "reps": args.reps, "differences": DIFFERENCES}
    mergekit = find_mergekit(args.mergekit)
    if mergekit is None:
        result["error"] = f"mergekit-yaml not found ({args.mergekit or 'PATH, /tmp/mk/bin/mergekit-yaml'})"
        print(json.dumps(result, indent=2))
        sys.exit(1)
    result["mergekit"] = mergekit
    base = Path(args.base).resolve()
    given = [Path(c).resolve() for c in args.checkpoints][: args.n]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ties_vs_mergekit_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        used = {json.loads((c / "fmn_pl.json").read_text())["task"] for c in given}
        synthetic = (
            make_synthetic(given, base, work / "synthetic", args.n - len(given), used) if args.n > len(given) else []
        )
        checkpoints = given + synthetic
        result["checkpoints"] = [str(c) for c in checkpoints]
        result["synthetic"] = [str(c) for c in synthetic]
        head_config = next(
            c / "config.json" for c in checkpoints if len(json.loads((c / "config.json").read_text())["id2label"]) == 2
        )
        mk_base = classifier_folder(base, head_config, work / "mergekit_in" / "base", prefix=PREFIX)
        bare = [classifier_folder(c, head_config, work / "mergekit_in" / c.name) for c in checkpoints]
        config = {
            "merge_method": "ties",
            "base_model": str(mk_base),
            "models": [{"model": str(b), "parameters": {"density": args.top_k / 100, "weight": 1.0}} for b in bare],
            "parameters": {"normalize": True, "lambda": 1.0, "int8_mask": False},
            "dtype": "float32",
        }
        (work / "mergekit.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        fmn_cmd = [
            sys.executable,
            "-m",
            "fmn_pl.cli",
            "merge",
            "--method=ties",
            f"--method.top_k={args.top_k}",
            "--method.scaling=1.0",
            "--checkpoints",
            *map(str, checkpoints),
            f"--base={base}",
            f"--output={work / 'fmn_out'}",
            "--overwrite=true",
            "--evaluate=false",
            "--progress=false",
            "--eval.cache=false",
        ]
        mk_cmd = [mergekit, str(work / "mergekit.yml"), str(work / "mk_out"), "--quiet", "--no-copy-tokenizer"]
        result["commands"] = {"fmn_pl": " ".join(fmn_cmd), "mergekit": " ".join(mk_cmd)}
        runs: dict[str, list[tuple[float, float]]] = {"fmn_pl": [], "mergekit": []}
        splits: list[dict] = []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(env)
        for _ in range(args.reps):
            shutil.rmtree(work / "mk_out", ignore_errors=True)
            runs["mergekit"].append(timed(mk_cmd, work / "mergekit.log"))
            runs["fmn_pl"].append(timed(fmn_cmd, work / "fmn_pl.log"))
            report = json.loads((work / "fmn_out" / "report.json").read_text())
            splits.append({k: v for k, v in report.get("timings", {}).items() if isinstance(v, (int, float))})
        for name, rs in runs.items():
            result[name] = {
                "wall_s": statistics.median(r[0] for r in rs),
                "peak_rss_mb": statistics.median(r[1] for r in rs),
                "runs": [{"wall_s": w, "peak_rss_mb": round(m, 1)} for w, m in rs],
            }
        result["fmn_pl"]["report_timings"] = splits
        result["time_ratio"] = round(result["fmn_pl"]["wall_s"] / result["mergekit"]["wall_s"], 3)
        result["memory_ratio"] = round(result["fmn_pl"]["peak_rss_mb"] / result["mergekit"]["peak_rss_mb"], 3)
        result["goal_time_ratio"] = 0.5
        result["goal_met"] = result["time_ratio"] <= 0.5
        result["comparison"] = compare(work / "fmn_out" / "model.safetensors", work / "mk_out", base)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


def compare(fmn_body: Path, mk_dir: Path, base: Path) -> dict:
    """Max |fmn-pl - mergekit| over the body, next to the merged task vector's own size (max |fmn-pl - base|)."""
    from fmn_pl.tensorfile import CheckpointReader

    try:
        ours, theirs = CheckpointReader(fmn_body.parent, prefix=PREFIX), CheckpointReader(mk_dir)
        b = CheckpointReader(base, prefix=PREFIX)
    except FileNotFoundError as e:
        return {"error": str(e)}
    diff = moved = 0.0
    disagree = total = 0
    keys = [k for k in theirs.keys() if k.startswith(PREFIX) and k in ours and k in b]
    for k in keys:
        o, t, z = ours.get(k).float(), theirs.get(k).float(), b.get(k).float()
        diff = max(diff, float((o - t).abs().max()))
        moved = max(moved, float((o - z).abs().max()))
        disagree += int((o != t).sum())
        total += o.numel()
    return {
        "tensors": len(keys),
        "max_abs_diff": diff,
        "max_abs_task_vector": moved,
        "fraction_entries_differing": disagree / max(total, 1),
    }


if __name__ == "__main__":
    main()
