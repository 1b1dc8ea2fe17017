"""What a merge writes: the merged body streamed tensor by tensor into one safetensors file, and one Hugging Face
folder per task (its head beside a hard link to the body) that `from_pretrained` loads as a task checkpoint."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from fmn_pl.checkpoint import FORMAT_VERSION, METADATA_FILE, weights_fingerprint, write_json
from fmn_pl.merge_inputs import Inputs, body_prefix
from fmn_pl.merging.reader import DTYPES, FileReader

BODY_FILE = "model.safetensors"
TASK_BODY_FILE = "model-body.safetensors"
TASK_HEAD_FILE = "model-head.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {v: k for k, v in DTYPES.items()}
_ST_SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor (any order): the header is laid out from the specs first,
    so the merged body never has to be in memory at once."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self.path, self.specs = Path(path), specs
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets, pos = {}, 0
        for key, (dtype, shape) in specs.items():
            n = _ST_SIZES[dtype] * math.prod(shape)
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[key], pos = (pos, pos + n), pos + n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.start, self.size = 8 + len(raw), pos
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self.start + pos)
        self.written: set[str] = set()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.specs:
            raise ValueError(f"{self.path.name}: unexpected tensor {key!r}")
        dtype, shape = self.specs[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if _ST_DTYPES.get(tensor.dtype) != dtype:
            raise ValueError(f"{self.path.name}: tensor {key!r} has dtype {tensor.dtype}, expected {dtype}")
        self._file.seek(self.start + self.offsets[key][0])
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written.add(key)

    def abort(self) -> None:
        """Close without the completeness check (the caller is failing anyway; its temp folder goes)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        missing = [k for k in self.specs if k not in self.written]
        if missing:
            raise ValueError(
                f"{self.path.name}: no tensor was produced for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            )


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------- writing


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
    writer = SafetensorsWriter(path, {k: inputs.specs[k] for k in inputs.keys + inputs.fixed})
    try:
        for key, tensor in tqdm(
            merged,
            total=len(inputs.keys),
            desc=f"{'merge' if name == BODY_FILE else folder.name} tensors",
            disable=not progress,
        ):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"the merged tensor {key!r} has NaN or Inf entries")
            writer.write(key, tensor.to(torch_dtype(inputs.specs[key][0])))
            del tensor  # not held while the method computes the next one
        first = FileReader(inputs.checkpoints[0])
        for key in inputs.fixed:
            writer.write(key, first.get(key))
    except BaseException:
        writer.abort()
        raise
    writer.close()
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
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    task, src = inputs.tasks[i], inputs.checkpoints[i]
    d = folder / task
    d.mkdir()
    reader = FileReader(src)
    head = {k: reader.get(k).contiguous() for k in inputs.heads[i]}
    save_file(head, str(d / TASK_HEAD_FILE), metadata={"format": "pt"})
    os.chmod(d / TASK_HEAD_FILE, (folder / BODY_FILE).stat().st_mode & 0o777)  # safetensors writes 0600
    if body is None:
        how = link_or_copy(folder / BODY_FILE, d / TASK_BODY_FILE, log)
    else:
        os.chmod(
            write_body(d, inputs, body, progress, name=TASK_BODY_FILE), (folder / BODY_FILE).stat().st_mode & 0o777
        )
        how = "own"
    sizes = sum(t.numel() * t.element_size() for t in head.values())
    sizes += sum(_ST_SIZES[dt] * math.prod(s) for dt, s in (inputs.specs[k] for k in inputs.keys + inputs.fixed))
    weight_map = {**{k: TASK_BODY_FILE for k in inputs.keys + inputs.fixed}, **{k: TASK_HEAD_FILE for k in head}}
    write_json(d / INDEX_FILE, {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))})
    shutil.copyfile(src / "config.json", d / "config.json")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(d))
    meta = inputs.metadata[i]
    write_json(
        d / METADATA_FILE,
        {
            "format_version": FORMAT_VERSION,
            "task": task,
            **{k: meta[k] for k in ("label_names", "num_labels", "base_model", "data") if k in meta},
            "merged": merge_info,
            "fingerprint": weights_fingerprint(d),
        },
    )
    return how


def write_body_folder(folder: Path, inputs: Inputs) -> None:
    """Config and tokenizer beside model.safetensors, so AutoModel.from_pretrained(folder) loads the body."""
    from transformers import AutoTokenizer

    _, base_class = body_prefix(inputs.config)
    config = copy.deepcopy(inputs.config)
    config.architectures = [base_class]
    config.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(inputs.checkpoints[0])).save_pretrained(str(folder))
