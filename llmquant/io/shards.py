"""Write safetensors shards one tensor at a time, so memory holds one tensor, not one shard.

safetensors files are ``u64 header length | JSON header | data``, and the header lists every
tensor's byte offsets, so a file cannot be finished before all its tensors are known. Data
streams into the shard behind a reserved gap (`header_reserve` bytes); when the shard closes,
its header is written into the gap, padded with spaces as the format allows, and the file is
renamed into place: every byte is written once. A header that does not fit the gap (or a
writer with no reserve) falls back to writing the header to a new file and copying the data
behind it. Shards are named as ``save_pretrained`` names them (``model.safetensors``, or
``model-00001-of-00003.safetensors`` with ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import torch
from torch import Tensor

__all__ = ["DTYPE_NAMES", "ShardWriter", "cast_stream", "header_bound", "parse_size"]

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_CAST_CHUNK_BYTES = 16 * 2**20  # read and converted at a time by `cast_copy`
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Return bytes for ``"2GB"``, ``"500MiB"`` or an int."""
    if isinstance(text, int):
        return text
    value = text.strip().upper().replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise ValueError(f"cannot read size {text!r}: write e.g. 2GB, 500MB or 512MiB") from None


class _Shard:
    def __init__(self, path: Path, header_reserve: int) -> None:
        self.path = path
        self.reserve = header_reserve + -header_reserve % 8  # data stays 8-byte aligned
        self.data: BinaryIO = open(path, "wb")
        self.data.seek(8 + self.reserve)
        self.header: dict[str, Any] = {}
        self.size = 0

    @classmethod
    def reopen(cls, path: Path, header_reserve: int, size: int, header: dict[str, Any]) -> _Shard:
        """Continue a shard a killed writer left: its data is cut back to `size` bytes, the rest dropped."""
        shard = cls.__new__(cls)
        shard.path, shard.reserve, shard.header, shard.size = path, header_reserve + -header_reserve % 8, header, size
        shard.data = open(path, "r+b")
        shard.data.truncate(8 + shard.reserve + size)
        shard.data.seek(8 + shard.reserve + size)
        return shard

    def add(self, name: str, tensor: Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        # the tensor's own memory, not a bytes copy of it: a copy doubled the peak at a 933 MB lm_head
        raw = tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else memoryview(b"")
        self.header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + raw.nbytes],
        }
        self.data.write(raw)
        self.size += raw.nbytes

    def copy(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], source: Path, start: int, nbytes: int) -> None:
        """Append a tensor's bytes straight from another safetensors file (the kernel copies them:
        nothing passes through Python or a tensor)."""
        self.header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [self.size, self.size + nbytes]}
        self.data.flush()
        at = 8 + self.reserve + self.size
        with open(source, "rb") as src:
            done = 0
            try:
                while done < nbytes:
                    step = os.copy_file_range(src.fileno(), self.data.fileno(), nbytes - done, start + done, at + done)
                    if step == 0:
                        break
                    done += step
            except OSError:  # a file system or kernel without copy_file_range: copy the rest through a buffer
                pass
            self.data.seek(at + done)
            src.seek(start + done)
            left = nbytes - done
            while left:
                chunk = src.read(min(left, 16 * 2**20))
                if not chunk:
                    raise OSError(f"{source} ended while copying {name!r}")
                self.data.write(chunk)
                left -= len(chunk)
        self.data.seek(at + nbytes)
        self.size += nbytes

    def cast_copy(self, name: str, dtype: torch.dtype, target: torch.dtype, shape: tuple[int, ...], source: Path,
                  start: int, nbytes: int) -> None:
        """Append a float tensor stored in `source` as `dtype`, converted to `target` (see `cast_stream`)."""
        out_bytes = nbytes // dtype.itemsize * target.itemsize
        self.header[name] = {"dtype": DTYPE_NAMES[target], "shape": list(shape), "data_offsets": [self.size, self.size + out_bytes]}
        cast_stream(source, start, nbytes, dtype, target, self.data)
        self.size += out_bytes

    def close(self, final_path: Path, metadata: dict[str, str]) -> None:
        header = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        if len(header) <= self.reserve:
            self.data.seek(0)
            self.data.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve))
            self.data.close()
            os.replace(self.path, final_path)
            return
        self.data.close()
        header += b" " * (-len(header) % 8)
        with open(final_path, "wb") as out, open(self.path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            data.seek(8 + self.reserve)
            shutil.copyfileobj(data, out, 16 * 2**20)
        os.remove(self.path)


def cast_stream(source: Path, start: int, nbytes: int, dtype: torch.dtype, target: torch.dtype, out: BinaryIO,
                stop: Callable[[], bool] | None = None) -> bool:
    """Write the `dtype` values at bytes ``start:start+nbytes`` of `source` to `out` as `target`, a chunk
    at a time through two small reused buffers: no whole-tensor copy is ever allocated. Returns False
    when `stop` said to stop before the end."""
    count = nbytes // dtype.itemsize
    step = max(1, min(count, _CAST_CHUNK_BYTES // dtype.itemsize))
    stored, cast = torch.empty(step, dtype=dtype), torch.empty(step, dtype=target)
    with open(source, "rb") as src:
        src.seek(start)
        for done in range(0, count, step):
            if stop is not None and stop():
                return False
            n = min(step, count - done)
            if src.readinto(stored[:n].view(torch.uint8).numpy().data) != n * dtype.itemsize:
                raise OSError(f"{source} ended at byte {start + done * dtype.itemsize} while casting")
            cast[:n].copy_(stored[:n])
            out.write(cast[:n].view(torch.uint8).numpy().data)
    return True


def header_bound(names: Iterable[tuple[str, int]], metadata: dict[str, str] | None = None) -> int:
    """Bytes that surely hold a safetensors header listing `names` (``(name, ndim)`` pairs):
    for `ShardWriter`'s `header_reserve` when the tensors to write are known in advance."""
    fixed = len(json.dumps({"__metadata__": {"format": "pt", **(metadata or {})}})) + 2
    # "name":{"dtype":"BF16","shape":[...],"data_offsets":[a,b]}, with every number up to 20 digits
    return fixed + sum(len(json.dumps(name)) + 48 + 21 * max(ndim, 1) + 42 for name, ndim in names)


class ShardWriter:
    """Stream tensors into size-capped safetensors shards in `folder`.

    Example:
        >>> writer = ShardWriter(folder, max_shard_size=2 * 10**9)
        >>> writer.add("model.embed_tokens.weight", tensor)
        >>> files = writer.close()
    """

    def __init__(self, folder: Path, max_shard_size: int, metadata: dict[str, str] | None = None,
                 header_reserve: int = 0) -> None:
        self.folder = Path(folder)
        self.header_reserve = header_reserve
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[_Shard] = []
        self.total_size = 0

    def state(self) -> dict[str, Any]:
        """What `resume` needs to continue this writer after a kill (JSON-able); the data written so far
        is flushed to the files first."""
        for shard in self.shards:
            shard.data.flush()
        return {"header_reserve": self.header_reserve, "total_size": self.total_size,
                "shards": [{"file": s.path.name, "size": s.size, "header": s.header} for s in self.shards]}

    @classmethod
    def resume(cls, folder: Path, max_shard_size: int, metadata: dict[str, str] | None, state: dict[str, Any]) -> ShardWriter:
        """Reopen the shards a writer left in `folder` when it returned `state`; what it wrote after that
        is dropped. Raises FileNotFoundError when a shard is gone (the writer had closed)."""
        writer = cls(folder, max_shard_size, metadata, state["header_reserve"])
        kept = {entry["file"] for entry in state["shards"]}
        missing = [name for name in kept if not (writer.folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"{writer.folder / missing[0]} is gone")
        for stray in writer.folder.glob("shard-*.partial"):  # started after the state was taken
            if stray.name not in kept:
                stray.unlink()
        writer.total_size = state["total_size"]
        writer.shards = [_Shard.reopen(writer.folder / e["file"], writer.header_reserve, e["size"], e["header"])
                         for e in state["shards"]]
        return writer

    def add(self, name: str, tensor: Tensor) -> None:
        """Append one tensor, starting a new shard when this one would pass the size cap."""
        nbytes = tensor.numel() * tensor.element_size()
        self._shard_for(nbytes).add(name, tensor)
        self.total_size += nbytes

    def copy(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], source: Path, start: int, nbytes: int) -> None:
        """Append a tensor stored at bytes ``start:start+nbytes`` of `source` (a safetensors file), as `add` would."""
        self._shard_for(nbytes).copy(name, dtype, shape, source, start, nbytes)
        self.total_size += nbytes

    def cast_copy(self, name: str, dtype: torch.dtype, target: torch.dtype, shape: tuple[int, ...], source: Path,
                  start: int, nbytes: int) -> None:
        """Append a float tensor stored at bytes ``start:start+nbytes`` of `source` as `dtype`, converted to `target`."""
        out_bytes = nbytes // dtype.itemsize * target.itemsize
        self._shard_for(out_bytes).cast_copy(name, dtype, target, shape, source, start, nbytes)
        self.total_size += out_bytes

    def _shard_for(self, nbytes: int) -> _Shard:
        current = self.shards[-1] if self.shards else None
        if current is None or (current.size and current.size + nbytes > self.max_shard_size):
            if current is not None:
                current.data.flush()
            current = _Shard(self.folder / f"shard-{len(self.shards) + 1:05d}.partial", self.header_reserve)
            self.shards.append(current)
        return current

    def add_all(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        """Append ``{prefix}.{name}`` for every tensor."""
        for name, tensor in tensors.items():
            self.add(f"{prefix}.{name}" if prefix else name, tensor)

    def close(self) -> list[str]:
        """Finish every shard, write the index when there are several, and return the file names."""
        count = len(self.shards)
        if count <= 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        if not self.shards:
            self.shards.append(_Shard(self.folder / "shard-00001.partial", self.header_reserve))
        weight_map: dict[str, str] = {}
        for shard, name in zip(self.shards, names):
            shard.close(self.folder / name, self.metadata)
            weight_map.update(dict.fromkeys(shard.header, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
