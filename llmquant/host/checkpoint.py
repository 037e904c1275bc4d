"""A lazy, read-only view of a checkpoint folder's safetensors shards.

Tensors are read with plain positioned reads, not mmap: a mapped file's touched pages stay
in the process's resident set until unmapped, so reading a whole model through one mapping
would make peak RSS grow with the model even though each tensor is freed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmquant.errors import CheckpointError
from llmquant.io.shards import DTYPE_NAMES

__all__ = ["Checkpoint", "TensorInfo", "read_safetensors_header"]

_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_MAX_HEADER = 100 * 2**20


class TensorInfo:
    """Where one tensor lies: file, dtype, shape and byte range."""

    __slots__ = ("path", "dtype", "shape", "start", "end")

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> None:
        self.path, self.dtype, self.shape, self.start, self.end = path, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header without reading its data.

    Raises:
        CheckpointError: the file is truncated, its header is not valid, or an offset lies
            past the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes); re-download or re-export it")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is corrupt or truncated: header length {length} exceeds the file; re-download it")
        try:
            header: dict[str, Any] = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} has an unreadable safetensors header ({exc}); re-download it") from exc
    data_start = 8 + length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _TORCH_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which llmquant cannot read")
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} of a {size}-byte file; re-download it"
            )
        infos[name] = TensorInfo(path, _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]), data_start + begin, data_start + end)
    return infos


class Checkpoint(Mapping[str, Tensor]):
    """Every tensor of a checkpoint folder by name, read from disk on access.

    Args:
        folder: holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.

    Raises:
        CheckpointError: no weights, an index naming a missing shard, or a corrupt shard.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.infos: dict[str, TensorInfo] = {}
        for shard in self._shard_paths():
            self.infos.update(read_safetensors_header(shard))

    def _shard_paths(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid index ({exc}); re-download the checkpoint") from exc
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).exists()]
            if missing:
                raise CheckpointError(
                    f"{index} names shard(s) that are not in {self.folder}: {', '.join(missing)}; "
                    f"download the missing files"
                )
            return [self.folder / n for n in names]
        single = self.folder / "model.safetensors"
        if single.exists():
            return [single]
        found = sorted(self.folder.glob("*.safetensors"))
        if found:
            return found
        raise CheckpointError(
            f"{self.folder} has no safetensors weights (model.safetensors or model.safetensors.index.json); "
            f"convert .bin weights with `save_pretrained(..., safe_serialization=True)`"
        )

    def __getitem__(self, name: str) -> Tensor:
        return self.read_into(name, torch.empty(self.infos[name].nbytes, dtype=torch.uint8))  # not zeroed, as a bytearray is

    def read_into(self, name: str, buffer: Tensor) -> Tensor:
        """Read tensor `name` into the start of `buffer` (uint8, at least as long) and return a view of it.

        For a caller that reads many tensors in turn and keeps none: fresh memory for every read
        costs more than the read itself (page faults; about 3x the time on Qwen2.5-1.5B's weights).
        """
        info = self.infos[name]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        data = buffer[:info.nbytes]
        with open(info.path, "rb") as f:
            f.seek(info.start)
            if f.readinto(data.numpy().data) != info.nbytes:
                raise CheckpointError(f"{info.path} is truncated while reading {name!r}; re-download it")
        return data.view(info.dtype).reshape(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())
