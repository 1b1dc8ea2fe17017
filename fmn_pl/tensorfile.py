"""One safetensors file read with plain file reads (no memory map): tensors the caller owns, and no mapped pages
that stay resident while the file is open. Used for checkpoints during a merge and for artifacts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

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


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """(the JSON header without `__metadata__`, byte offset where the data starts) of one safetensors file."""
    with open(path, "rb") as fh:
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file: `keys()`, `shape(key)`, `dtype(key)` from the header, `get(key)` by a file read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header, self.start = read_header(self.path)

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
