"""safetensors, the one reader and writer of tensor files: checkpoints, artifacts, merged bodies.

Reads are plain file reads, not a memory map (`safe_open`): a map's touched pages stay resident, and counted in
the process's memory, until the handle closes, so streaming through M checkpoints would hold M checkpoints of
pages; a plain read keeps only the tensor, which the caller owns and may modify in place. Writes stream tensor
by tensor into a file laid out from the specs first, so a merged body never has to be in memory at once.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from fmn_pl.files import atomic_path, check_space, naming_disk_full

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
NAMES = {v: k for k, v in DTYPES.items()}
SIZES = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(the JSON header, `__metadata__` included, byte offset where the data starts) of one safetensors file."""
    with open(path, "rb") as fh:
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a readable safetensors file: its header is not a JSON object")
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `metadata` from the header, `get(key)` by a
    file read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header, self.start = read_header(self.path)
        self.metadata: dict[str, str] = self.header.pop("__metadata__", None) or {}

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key: str) -> bool:
        return key in self.header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> str:
        return self.header[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        info = self.header[key]
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(self.start + begin)
            if fh.readinto(buf) != len(buf):
                raise ValueError(f"{self.path} is truncated: tensor {key!r} is incomplete")
        dtype = DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


class CheckpointReader:
    """The tensors of one Hugging Face model folder (single or sharded model*.safetensors), read on demand.

    Every `get` returns a new tensor the caller owns, so a method may modify it in place."""

    def __init__(self, path: str | Path, prefix: str = "") -> None:
        """`prefix` (e.g. `bert.`) is tried when a requested key is absent: a bare `BertModel` checkpoint stores
        `embeddings...` where a task model stores `bert.embeddings...`."""
        self.path, self.prefix = Path(path), prefix
        files = sorted(self.path.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no model*.safetensors weights")
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            handle = SafetensorsFile(f)
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def keys(self) -> list[str]:
        return list(self._where)

    def _resolve(self, key: str) -> str:
        if key in self._where:
            return key
        if self.prefix and key.startswith(self.prefix) and key[len(self.prefix) :] in self._where:
            return key[len(self.prefix) :]
        raise KeyError(f"{self.path} has no tensor {key!r}")

    def __contains__(self, key: str) -> bool:
        try:
            return bool(self._resolve(key))
        except KeyError:
            return False

    def get(self, key: str) -> torch.Tensor:
        real = self._resolve(key)
        return self._where[real].get(real)

    def shape(self, key: str) -> tuple[int, ...]:
        real = self._resolve(key)
        return self._where[real].shape(real)

    def dtype(self, key: str) -> str:
        """safetensors dtype name (F32, I64, ...) of a tensor."""
        real = self._resolve(key)
        return self._where[real].dtype(real)


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor (any order): the header is laid out from the specs first,
    so the merged body never has to be in memory at once."""

    def __init__(
        self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ) -> None:
        self.path, self.specs = Path(path), specs
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        self.offsets, pos = {}, 0
        for key, (dtype, shape) in specs.items():
            n = SIZES[dtype] * math.prod(shape)
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[key], pos = (pos, pos + n), pos + n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.start, self.size = 8 + len(raw), pos
        check_space(self.path, self.start + pos)  # a full disk refused now, not after the merge
        self._file = open(self.path, "wb")
        with self._space():
            self._file.write(struct.pack("<Q", len(raw)) + raw)
            self._file.truncate(self.start + pos)
        self.written: set[str] = set()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.specs:
            raise ValueError(f"{self.path.name}: unexpected tensor {key!r}")
        dtype, shape = self.specs[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if NAMES.get(tensor.dtype) != dtype:
            raise ValueError(f"{self.path.name}: tensor {key!r} has dtype {tensor.dtype}, expected {dtype}")
        self._file.seek(self.start + self.offsets[key][0])
        with self._space():
            self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.written.add(key)

    def _space(self) -> Any:
        """A full disk while writing: one line naming the file and its size."""
        return naming_disk_full(self.path, self.start + self.size)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        """Close; checked complete unless the block failed (the caller is failing anyway; its temporary goes)."""
        with self._space():
            self._file.close()
        missing = [k for k in self.specs if k not in self.written]
        if kind is None and missing:
            raise ValueError(
                f"{self.path.name}: no tensor was produced for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            )


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (any device; contiguous copies on CPU) with string `metadata`, whole or not at all."""
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        specs = {k: (NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
        with SafetensorsWriter(tmp, specs, metadata) as writer:
            for k, v in tensors.items():
                writer.write(k, v)
    return Path(path)
