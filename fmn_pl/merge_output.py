"""What a merge writes: the merged body streamed tensor by tensor into one safetensors file, and one Hugging Face
folder per task (its head beside a hard link to the body) that `from_pretrained` loads as a task checkpoint."""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from fmn_pl.checkpoint import CheckpointMeta, weights_fingerprint
from fmn_pl.files import write_json
from fmn_pl.merge_inputs import Inputs, body_prefix
from fmn_pl.progress import clear, show
from fmn_pl.tensorfile import DTYPES, SIZES, CheckpointReader, SafetensorsWriter, save_tensors

BODY_FILE = "model.safetensors"
TASK_BODY_FILE = "model-body.safetensors"
TASK_HEAD_FILE = "model-head.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- writing


def body_tensors(inputs: Inputs, merged: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole body: the method's (key, tensor) pairs, refused if not finite and cast to each tensor's original
    dtype, then the non-merged tensors from the first checkpoint. Holds no tensor once the caller asks for the next
    (the method computes it)."""
    for key, tensor in merged:
        if not torch.isfinite(tensor).all():
            raise ValueError(f"the merged tensor {key!r} has NaN or Inf entries")
        out = tensor.to(DTYPES[inputs.specs[key][0]])
        del tensor
        yield key, out
        del out
    first = CheckpointReader(inputs.checkpoints[0])
    for key in inputs.fixed:
        yield key, first.get(key)


def write_body(
    folder: Path,
    inputs: Inputs,
    merged: Iterable[tuple[str, torch.Tensor]],
    progress: bool = True,
    name: str = BODY_FILE,
) -> Path:
    """Stream the method's (key, tensor) pairs into folder/`name` (in each tensor's original dtype), plus the
    body's non-merged tensors from the first checkpoint."""
    path = folder / name
    total, desc = len(inputs.keys) + len(inputs.fixed), f"{'merge' if name == BODY_FILE else folder.name} tensors"
    with SafetensorsWriter(path, {k: inputs.specs[k] for k in inputs.keys + inputs.fixed}) as writer:
        try:
            for n, (key, tensor) in enumerate(
                tqdm(body_tensors(inputs, merged), total=total, desc=desc, disable=not progress), 1
            ):
                writer.write(key, tensor)
                del tensor  # not held while the method computes the next one
                show(f"{desc} {n}/{total}")
        finally:
            clear()
    return path


def link_or_copy(src: Path, dst: Path, log: Callable[[str], None] = print) -> str:
    """Hard-link `src` to `dst` (no extra disk); copy where the file system has no hard links."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError as e:
        log(f"could not hard-link {src.name} into {dst.parent} ({e}); copying it")
        shutil.copyfile(src, dst)
        return "copy"


def write_task_folder(
    folder: Path,
    i: int,
    inputs: Inputs,
    merge_info: dict[str, Any],
    log: Callable[[str], None],
    body: Iterable[tuple[str, torch.Tensor]] | None = None,
    progress: bool = False,
) -> str:
    """folder/<task>: the merged body (linked) or the task's own `body` (methods such as TALL), the task's own
    head, an index over both, config and tokenizer."""
    from transformers import AutoTokenizer

    task, src = inputs.tasks[i], inputs.checkpoints[i]
    d = folder / task
    d.mkdir()
    reader = CheckpointReader(src)
    head = {k: reader.get(k).contiguous() for k in inputs.heads[i]}
    save_tensors(d / TASK_HEAD_FILE, head, metadata={"format": "pt"})
    if body is None:
        how = link_or_copy(folder / BODY_FILE, d / TASK_BODY_FILE, log)
    else:
        write_body(d, inputs, body, progress, name=TASK_BODY_FILE)
        how = "own"
    sizes = sum(t.numel() * t.element_size() for t in head.values())
    sizes += sum(SIZES[dt] * math.prod(s) for dt, s in (inputs.specs[k] for k in inputs.keys + inputs.fixed))
    weight_map = {**{k: TASK_BODY_FILE for k in inputs.keys + inputs.fixed}, **{k: TASK_HEAD_FILE for k in head}}
    write_json(d / INDEX_FILE, {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))})
    shutil.copyfile(src / "config.json", d / "config.json")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(d))
    meta = inputs.metadata[i]
    merged = CheckpointMeta(
        task=task,
        base_model=meta.base_model,
        label_names=meta.label_names,
        num_labels=meta.num_labels,
        data=meta.data,
        fingerprint=weights_fingerprint(d),
        extra={"merged": merge_info},
    )
    merged.write(d)
    return how


def write_body_folder(folder: Path, inputs: Inputs) -> None:
    """Config and tokenizer beside model.safetensors, so AutoModel.from_pretrained(folder) loads the body."""
    from transformers import AutoTokenizer

    _, base_class = body_prefix(inputs.config, inputs.headers[0])
    config = copy.deepcopy(inputs.config)
    config.architectures = [base_class]
    config.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(inputs.checkpoints[0])).save_pretrained(str(folder))
