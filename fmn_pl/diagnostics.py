"""Why a merge fails, in numbers for every merge report: per task and layer the task-vector norm
||theta_t - theta_0||, the cosine between each pair of task vectors, the mean node Fisher (when a mask_fisher
artifact is present), and each model's predicted-class shares (mean and spread of a regressor's predictions).

Layers are the body's groups of tensors: embeddings, layer<i> for each encoder layer, pooler, other (any tensor
outside them), and all (the whole body). Tensors are read one at a time; nothing holds a whole model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:
    from fmn_pl.merge_inputs import Inputs

LAYER = re.compile(r"\.layers?\.(\d+)\.")


def layer_group(key: str) -> str:
    """The group of body tensor `key`: embeddings, layer<i>, pooler or other."""
    if m := LAYER.search(key):
        return f"layer{int(m.group(1))}"
    if "embeddings" in key:
        return "embeddings"
    return "pooler" if ".pooler." in key else "other"


def group_order(keys: Iterable[str]) -> list[str]:
    """The groups of `keys` in body order (embeddings, layer0, layer1, ..., pooler, other), then all."""
    found = {layer_group(k) for k in keys}
    layers = sorted((g for g in found if g.startswith("layer")), key=lambda g: int(g[5:]))
    return [g for g in ("embeddings", *layers, "pooler", "other") if g in found] + ["all"]


def pair_name(a: str, b: str) -> str:
    """The key of a pair of tasks in `cosine` (no `|`: it would split a Markdown table cell)."""
    return f"{a} vs {b}"


def task_vectors(inputs: Inputs, base: Path) -> dict[str, Any]:
    """Per group: each task's ||theta_t - theta_0|| and each pair's cosine, streamed over the merged tensors."""
    from fmn_pl.tensorfile import CheckpointReader

    base_reader = CheckpointReader(base, prefix=inputs.body_prefix)
    readers = [CheckpointReader(p) for p in inputs.checkpoints]
    tasks, n = inputs.tasks, len(inputs.tasks)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    sq: dict[str, list[float]] = {}  # group -> per task sum of squares
    dot: dict[str, list[float]] = {}  # group -> per pair dot product
    for key in inputs.keys:
        theta0 = base_reader.get(key).double()
        deltas = [r.get(key).double() - theta0 for r in readers]
        for g in (layer_group(key), "all"):
            s, d = sq.setdefault(g, [0.0] * n), dot.setdefault(g, [0.0] * len(pairs))
            for i, v in enumerate(deltas):
                s[i] += float(v.pow(2).sum())
            for j, (a, b) in enumerate(pairs):
                d[j] += float((deltas[a] * deltas[b]).sum())
    groups = group_order(inputs.keys)

    def cosine(g: str, j: int) -> float | None:
        a, b = pairs[j]
        denom = math.sqrt(sq[g][a] * sq[g][b])
        return dot[g][j] / denom if denom > 0 else None

    return {
        "groups": groups,
        "norm": {t: {g: math.sqrt(sq[g][i]) for g in groups} for i, t in enumerate(tasks)},
        "cosine": {pair_name(tasks[a], tasks[b]): {g: cosine(g, j) for g in groups} for j, (a, b) in enumerate(pairs)},
    }


def fisher_scale(inputs: Inputs) -> dict[str, dict[str, list[float]]]:
    """Per task with a mask_fisher artifact: the mean node Fisher of each layer's heads and of its neurons."""
    from fmn_pl.artifacts import Artifact, artifact_path

    out = {}
    for i, (task, path) in enumerate(zip(inputs.tasks, inputs.checkpoints)):
        artifact = (inputs.artifacts or {}).get((i, "mask_fisher"))
        if artifact is None and artifact_path(path, "mask_fisher").is_file():
            fingerprint = inputs.fingerprints[i] if inputs.fingerprints else None
            artifact = Artifact(artifact_path(path, "mask_fisher"), "mask_fisher", path, fingerprint)
        if artifact is not None:
            out[task] = {kind: artifact.get(kind).double().mean(1).tolist() for kind in ("head", "neuron")}
    return out


def prediction_shares(predictions: list[Any], label_names: list[str]) -> dict[str, float]:
    """Share of each class among class predictions; {mean, std} of a regressor's (no `label_names`)."""
    if not label_names:
        values = torch.tensor(predictions, dtype=torch.float64)
        return {"mean": float(values.mean()), "std": float(values.std(correction=0))} if len(values) else {}
    counts = Counter(int(p) for p in predictions)
    return {name: counts[c] / max(len(predictions), 1) for c, name in enumerate(label_names)}


def shares(inputs: Inputs, results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {model (merged, individual, average): prediction_shares}} from the report's scored rows."""
    out = {}
    for task, meta in zip(inputs.tasks, inputs.metadata):
        rows = results.get(task, {}).get("rows", {})
        out[task] = {m: prediction_shares(r["prediction"], meta.label_names) for m, r in rows.items() if r}
    return out


def find_base(inputs: Inputs) -> Path | None:
    """The pretrained model: the merge's own, else the checkpoints' recorded one when it is here; None if not."""
    from fmn_pl.merge_inputs import check_base

    if inputs.base is not None:
        return inputs.base
    try:
        shapes = {k: inputs.specs[k][1] for k in inputs.keys}
        return check_base(None, inputs.metadata, inputs.body_prefix, shapes, "diagnostics")
    except (FileNotFoundError, ValueError):
        return None


def diagnostics(inputs: Inputs, report: dict[str, Any]) -> dict[str, Any]:
    """The report's `diagnostics`: task vectors (when the base model is at hand), Fisher scale, prediction shares."""
    base = find_base(inputs)
    out: dict[str, Any] = {"task_vectors": None if base is None else task_vectors(inputs, base)}
    out["fisher"] = fisher_scale(inputs)
    out["predictions"] = shares(inputs, report.get("results", {}))
    return out


def markdown_lines(diag: dict[str, Any]) -> list[str]:
    """The report.md section: one table (a row per layer group) and one line per task of prediction shares."""
    lines = ["", "## Diagnostics", ""]
    tv, fisher = diag.get("task_vectors"), diag.get("fisher") or {}
    if tv is None:
        lines.append("Task vectors: not computed (the pretrained model is not at hand).")
    else:
        heads = [f"norm {t}" for t in tv["norm"]] + [f"cos {p}" for p in tv["cosine"]]
        heads += [f"Fisher {t} head/neuron" for t in fisher]
        lines += [f"| layer | {' | '.join(heads)} |", "|---|" + "---:|" * len(heads)]
        for g in tv["groups"]:
            cells = [f"{tv['norm'][t][g]:.3f}" for t in tv["norm"]]
            cells += ["–" if c[g] is None else f"{c[g]:.3f}" for c in tv["cosine"].values()]
            i = int(g[5:]) if g.startswith("layer") else None
            cells += ["–" if i is None else f"{f['head'][i]:.2e} / {f['neuron'][i]:.2e}" for f in fisher.values()]
            lines.append(f"| {g} | {' | '.join(cells)} |")
        lines += ["", "Norm: ||theta_task - theta_pretrained|| over the group's tensors; cos: between task vectors."]
    for task, models in (diag.get("predictions") or {}).items():
        if not models:
            continue
        parts = [f"{m} " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()) for m, s in models.items()]
        lines.append(f"- {task} predictions: " + "; ".join(parts))
    return lines
