"""Casting the tensors outside the blocks ahead, while the model is set up: the same bytes, nothing left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import pytest
import torch

from llmquant.api import quantize
from llmquant.errors import ShapeError
from llmquant.host import precast
from llmquant.host.checkpoint import Checkpoint
from llmquant.plugins import Plugins


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != "llmquant.json"}


def test_cast_ahead_gives_the_bytes_of_casting_at_the_end(tiny_model_factory: Callable[..., Path], tmp_path: Path, pm: Plugins,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    source = tiny_model_factory(max_shard_size="200KB")
    settings = {"dtype": "bfloat16", "group_size": 64, "max_shard_size": "150KB"}
    monkeypatch.setattr(precast, "MIN_BYTES", 10**12)  # nothing is large enough: cast at the end
    quantize(source, tmp_path / "at-end", settings, plugins=pm)
    taken: list[dict[str, tuple[int, int]]] = []
    real_take = precast.OutsideCast.take

    def take(self: precast.OutsideCast) -> dict[str, tuple[int, int]]:
        taken.append(real_take(self))
        return taken[-1]

    monkeypatch.setattr(precast, "MIN_BYTES", 0)
    monkeypatch.setattr(precast.OutsideCast, "take", take)
    quantize(source, tmp_path / "ahead", settings, plugins=pm)
    outside = [k for k in Checkpoint(source).infos if ".layers." not in k]
    assert sorted(taken[0]) == sorted(outside)  # embeddings, final norm and head were cast ahead, and used
    assert hashes(tmp_path / "ahead") == hashes(tmp_path / "at-end")
    assert Checkpoint(tmp_path / "ahead").infos["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the scratch folder is gone


def test_a_failed_check_stops_the_cast_and_leaves_nothing(tiny_llama: Path, tmp_path: Path, pm: Plugins,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precast, "MIN_BYTES", 0)
    started: list[precast.OutsideCast] = []
    real_init = precast.OutsideCast.__init__

    def init(self: precast.OutsideCast, *args: object) -> None:
        real_init(self, *args)  # type: ignore[arg-type]
        started.append(self)

    monkeypatch.setattr(precast.OutsideCast, "__init__", init)
    with pytest.raises(ShapeError, match="not a multiple of group_size 96"):
        quantize(tiny_llama, tmp_path / "out", {"group_size": 96, "dtype": "bfloat16"}, plugins=pm)
    assert started and started[0].keys  # it did start
    assert list(tmp_path.iterdir()) == []
