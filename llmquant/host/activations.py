"""Calibration activations between blocks, in memory up to a budget and on disk beyond it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ActivationStore"]

log = logging.getLogger(__name__)


class ActivationStore:
    """A list of per-batch activation tensors that spills to `spill_dir` past `budget` bytes.

    Two stores (a block's inputs and its outputs) share one budget by each taking half.
    """

    def __init__(self, spill_dir: Path, budget: int, name: str) -> None:
        self.spill_dir, self.budget, self.name = spill_dir, budget, name
        self._items: list[Tensor | Path] = []
        self.in_memory = 0
        self.spilled = 0

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Tensor:
        item = self._items[index]
        if isinstance(item, Path):
            loaded: Tensor = torch.load(item, weights_only=True)
            return loaded
        return item

    def put(self, index: int, tensor: Tensor) -> None:
        """Store `tensor` (moved to CPU) at `index`, appending when `index == len(self)`."""
        tensor = tensor.detach().to("cpu")
        nbytes = tensor.numel() * tensor.element_size()
        if index < len(self._items):
            self._drop(index)
        item: Tensor | Path = tensor
        if self.in_memory + nbytes > self.budget:
            item = self.spill_dir / f"{self.name}-{index}.pt"
            torch.save(tensor, item)
            self.spilled += 1
        else:
            self.in_memory += nbytes
        if index == len(self._items):
            self._items.append(item)
        else:
            self._items[index] = item

    def _drop(self, index: int) -> None:
        old = self._items[index]
        if isinstance(old, Path):
            old.unlink(missing_ok=True)
        else:
            self.in_memory -= old.numel() * old.element_size()

    def clear(self) -> None:
        for index in range(len(self._items)):
            self._drop(index)
        self._items.clear()
