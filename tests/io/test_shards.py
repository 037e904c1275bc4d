from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmquant.host.checkpoint import Checkpoint
from llmquant.io.shards import ShardWriter, parse_size

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
