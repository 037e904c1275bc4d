from __future__ import annotations

import pytest
from torch import nn

from llmquant.errors import CheckpointError
from llmquant.host.arch import find_blocks


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def test_longest_list_of_blocks_with_linears_wins() -> None:
    model = nn.Module()
    model.heads = nn.ModuleList([nn.Linear(8, 8)])
    model.layers = nn.ModuleList([_Block() for _ in range(3)])
    layout = find_blocks(model)
    assert (layout.prefix, layout.count) == ("layers", 3)
    assert layout.linears[0] == ("attn", "mlp.0", "mlp.2")


def test_model_without_blocks_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(CheckpointError, match=r"Sequential has no recognizable decoder blocks"):
        find_blocks(model)
