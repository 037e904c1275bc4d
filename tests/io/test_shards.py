from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmquant.host.checkpoint import Checkpoint
from llmquant.io.shards import ShardWriter, header_bound, parse_size

TENSORS = {
    "a.weight": torch.randn(7, 5),
    "b.bf16": torch.randn(3, 4).to(torch.bfloat16),
    "c.int32": torch.arange(12, dtype=torch.int32).view(3, 4),
    "d.scalar": torch.tensor(3.5),
    "e.uint8": torch.arange(10, dtype=torch.uint8),
}


def test_single_shard_reads_back_with_safetensors(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_shard_size=10**9)
    for name, tensor in TENSORS.items():
        writer.add(name, tensor)
    assert writer.close() == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor)
    assert not list(tmp_path.glob("*.partial*"))


def test_shards_split_at_the_cap_and_have_an_index(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_shard_size=200)
    for i in range(5):
        writer.add(f"t{i}", torch.full((30,), float(i)))  # 120 bytes each: one per shard
    names = writer.close()
    assert names == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 600
    assert index["weight_map"]["t3"] == "model-00004-of-00005.safetensors"
    checkpoint = Checkpoint(tmp_path)
    assert torch.equal(checkpoint["t3"], torch.full((30,), 3.0))


def test_reader_matches_safetensors_own_writer(tmp_path: Path) -> None:
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    checkpoint = Checkpoint(tmp_path)
    assert set(checkpoint) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert torch.equal(checkpoint[name], tensor) and checkpoint[name].dtype == tensor.dtype


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500), (123, 123)],
                         ids=["GB", "MiB", "kb", "int"])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="2GB"):
        parse_size("lots")


def _names(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    return [(name, t.dim()) for name, t in tensors.items()]


def test_reserved_header_writes_each_byte_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for the header reserved up front, shards are finished in place: no data copy,
    and the padded header is one that safetensors, our reader and transformers' loader all accept."""
    import shutil

    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was copied")

    monkeypatch.setattr(shutil, "copyfileobj", no_copy)
    writer = ShardWriter(tmp_path, max_shard_size=10**9, header_reserve=header_bound(_names(TENSORS)))
    for name, tensor in TENSORS.items():
        writer.add(name, tensor)
    assert writer.close() == ["model.safetensors"]
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert header_length % 8 == 0 and raw[8 + header_length - 1:8 + header_length] == b" "
    assert len(raw) == 8 + header_length + sum(t.numel() * t.element_size() for t in TENSORS.values())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor)
    checkpoint = Checkpoint(tmp_path)
    assert all(torch.equal(checkpoint[name], tensor) for name, tensor in TENSORS.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_header_past_the_reserve_falls_back_to_copying(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_shard_size=200, header_reserve=16)
    for i in range(3):
        writer.add(f"t{i}", torch.full((30,), float(i)))
    writer.close()
    checkpoint = Checkpoint(tmp_path)
    assert [float(checkpoint[f"t{i}"][0]) for i in range(3)] == [0.0, 1.0, 2.0]
    assert not list(tmp_path.glob("*.partial"))


def test_header_bound_holds_for_long_names_and_huge_shapes() -> None:
    import json as json_

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        count = int(torch.randint(1, 40, (1,), generator=g))
        header = {"__metadata__": {"format": "pt", "quantizer": "llmquant"}}
        names = []
        offset = 0
        for i in range(count):
            name = "model.layers." + "x" * int(torch.randint(0, 200, (1,), generator=g)) + f".{i}\u00e9\"q"
            ndim = int(torch.randint(0, 5, (1,), generator=g))
            shape = [2**62 + i] * ndim
            header[name] = {"dtype": "BOOL", "shape": shape, "data_offsets": [offset, offset + 2**63 - 1]}
            offset += 2**40
            names.append((name, ndim))
        size = len(json_.dumps(header, separators=(",", ":")).encode())
        assert size <= header_bound(names, {"quantizer": "llmquant"})


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copying_a_tensors_bytes_from_a_file_writes_what_adding_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          kernel_copy: bool) -> None:
    """`copy` (the kernel's copy_file_range, or a buffer where the file system has none) and `add` give the same file."""
    import os

    save_file(TENSORS, str(tmp_path / "source.safetensors"))
    source = Checkpoint(tmp_path)
    if not kernel_copy:
        def no_copy_file_range(*args: object) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    for way in ("added", "copied"):
        writer = ShardWriter(tmp_path / way, max_shard_size=100, header_reserve=4096)
        (tmp_path / way).mkdir()
        for name in TENSORS:
            info = source.infos[name]
            if way == "added":
                writer.add(name, source[name])
            else:
                writer.copy(name, info.dtype, info.shape, info.path, info.start, info.nbytes)
        writer.close()
    added, copied = sorted((tmp_path / "added").iterdir()), sorted((tmp_path / "copied").iterdir())
    assert [p.name for p in added] == [p.name for p in copied] and len(added) > 2  # shards split at the cap, and an index
    assert all(a.read_bytes() == c.read_bytes() for a, c in zip(added, copied))


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16])
def test_cast_copy_streams_what_adding_the_cast_tensor_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              target: torch.dtype) -> None:
    """`cast_copy` converts a chunk at a time (chunks smaller than the tensor here, one ending short) and
    writes the bytes `add` writes for the whole tensor cast at once."""
    import llmquant.io.shards as shards

    monkeypatch.setattr(shards, "_CAST_CHUNK_BYTES", 28)  # 7 float32 values: 40 elements end in a short chunk
    source_tensors = {"a": torch.randn(8, 5) * 1000, "b": torch.randn(3), "c": torch.zeros(0, 4)}
    save_file(source_tensors, str(tmp_path / "source.safetensors"))
    source = Checkpoint(tmp_path)
    for way in ("added", "cast"):
        (tmp_path / way).mkdir()
        writer = ShardWriter(tmp_path / way, max_shard_size=10**6, header_reserve=4096)
        for name in source_tensors:
            info = source.infos[name]
            if way == "added":
                writer.add(name, source[name].to(target))
            else:
                writer.cast_copy(name, info.dtype, target, info.shape, info.path, info.start, info.nbytes)
        writer.close()
    assert (tmp_path / "added" / "model.safetensors").read_bytes() == (tmp_path / "cast" / "model.safetensors").read_bytes()


def test_a_resumed_writer_drops_what_came_after_its_state_and_writes_the_same_files(tmp_path: Path) -> None:
    """`state` after some tensors, more written (into a new shard too), then `resume` from the state:
    the later bytes and the stray shard are gone, and finishing gives the files of one unbroken writer."""
    names = list(TENSORS)
    (tmp_path / "whole").mkdir()
    whole = ShardWriter(tmp_path / "whole", max_shard_size=50, header_reserve=4096)
    for name in names:
        whole.add(name, TENSORS[name])
    whole.close()

    folder = tmp_path / "resumed"
    folder.mkdir()
    first = ShardWriter(folder, max_shard_size=50, header_reserve=4096)
    for name in names[:2]:
        first.add(name, TENSORS[name])
    state = json.loads(json.dumps(first.state()))
    for name in names[2:]:  # written after the state was taken, then lost to a kill
        first.add(name, torch.full_like(TENSORS[name], 7))
    for shard in first.shards:
        shard.data.close()
    assert len(list(folder.glob("shard-*.partial"))) > len(state["shards"])
    second = ShardWriter.resume(folder, 50, None, state)
    for name in names[2:]:
        second.add(name, TENSORS[name])
    second.close()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "whole").iterdir())
