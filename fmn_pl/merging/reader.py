"""safetensors read with plain file reads, so a streaming merge's memory does not grow with the model count.

`safe_open` memory-maps a file and the pages a merge touches stay mapped, and so counted in the process's
resident memory, until the handle closes: streaming through M checkpoints then holds M checkpoints of
pages. Reading each tensor with `readinto` keeps only the tensor itself (and gives the caller a tensor it
owns: safe_open's tensors alias the map, so writing to one changes what later reads return).
`FileReader` is a drop-in `CheckpointReader` for a model folder, over `fmn_pl.tensorfile.SafetensorsFile`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fmn_pl.merging.base import CheckpointReader
from fmn_pl.tensorfile import DTYPES, FLOAT_DTYPES, SafetensorsFile, read_header  # noqa: F401 - re-exported


class FileReader(CheckpointReader):
    """`CheckpointReader` over a model folder's model*.safetensors that reads tensors without memory maps.

    Every `get` returns a new tensor the caller owns (`fresh = True`), so methods may modify it in place;
    the base reader's tensors alias a memory map, and writing to them would change later reads.
    """

    fresh = True

    def __init__(self, path: str | Path, prefix: str = "") -> None:  # noqa: D107 - same contract as the base
        self.path, self.prefix = Path(path), prefix
        files = sorted(self.path.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no model*.safetensors weights")
        self._where: dict[str, SafetensorsFile] = {}  # type: ignore[assignment]
        for f in files:
            handle = SafetensorsFile(f)
            for key in handle.keys():
                self._where[key] = handle

    def get(self, key: str) -> torch.Tensor:
        real = self._resolve(key)
        if real is None:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return self._where[real].get(real)

    def shape(self, key: str) -> tuple[int, ...]:
        real = self._resolve(key)
        if real is None:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return self._where[real].shape(real)

    def dtype(self, key: str) -> str:
        """safetensors dtype name (F32, I64, ...) of a tensor."""
        real = self._resolve(key)
        if real is None:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return self._where[real].dtype(real)
