"""Input Hessians of Linear layers, ``H = 2/n * sum(x x^T)``, accumulated in float32.

The sum runs over calibration batches in batch order, each batch's product formed on its own:
a distributed run, whose workers each hold some batches, returns the per-batch products
(`BatchPartials`) and the driver adds them in the same order (`reduce_partials`), so the
Hessian's bits do not depend on how many workers ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats

__all__ = ["BatchPartials", "HessianAccumulator", "accumulate_hessian", "reduce_partials"]


@dataclass
class BatchPartials:
    """One batch's contribution to a Hessian: ``x^T x`` (and ``(x_float - x)^T x``) and its row count."""

    batch: int
    xtx: Tensor
    n: int
    delta: Tensor | None = None


@dataclass
class HessianAccumulator:
    """``H = 2/n * sum(x x^T)`` over the n rows of every input seen, kept as a float32 sum."""

    in_features: int
    device: torch.device
    float_inputs: bool = False
    keep_partials: bool = False  # keep each batch's product apart (a distributed worker) instead of summing
    total: Tensor = field(init=False)
    delta: Tensor | None = field(init=False, default=None)
    n: int = 0
    partials: list[BatchPartials] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        if self.float_inputs:
            self.delta = torch.zeros_like(self.total)

    def add(self, x: Tensor) -> None:
        """Add one batch's inputs (batches come in batch order: a partial is numbered by its position)."""
        rows = x.numel() // x.shape[-1]
        if self.keep_partials:
            part = torch.zeros_like(self.total)
            accumulate_hessian(part, x)
            self.partials.append(BatchPartials(len(self.partials), part, rows))
        else:
            accumulate_hessian(self.total, x)
        self.n += rows

    def add_float(self, x: Tensor, x_float: Tensor) -> None:
        """Add ``(x_float - x)^T x`` of the same tokens' inputs in the float and in the quantized model
        (the batch `add` saw last)."""
        assert self.delta is not None
        rows = x.reshape(-1, x.shape[-1]).float()
        product = (x_float.reshape(-1, x.shape[-1]).float() - rows).t() @ rows  # not addmm_: see accumulate_hessian
        if self.keep_partials:
            self.partials[-1].delta = product
        else:
            self.delta += product

    def stats(self) -> CalibrationStats:
        """The Hessian, scaled in place (no second H-sized matrix): call once, the accumulator is spent."""
        scale = 2 / max(self.n, 1)
        return CalibrationStats(H=self.total.mul_(scale), nsamples=self.n,
                                dXXT=self.delta.mul_(scale) if self.delta is not None else None)


def reduce_partials(in_features: int, partials: list[BatchPartials], device: torch.device | str = "cpu",
                    into: HessianAccumulator | None = None) -> HessianAccumulator:
    """Add per-batch partials (from any number of workers) in batch order: the same bits as one
    `HessianAccumulator` that saw every batch in that order. `into` continues a reduction with the
    partials of later batches (a driver adding each worker's as it arrives)."""
    total = into or HessianAccumulator(in_features, torch.device(device), any(p.delta is not None for p in partials))
    for part in sorted(partials, key=lambda p: p.batch):
        total.total += part.xtx.to(total.device)
        if total.delta is not None and part.delta is not None:
            total.delta += part.delta.to(total.device)
        total.n += part.n
    return total


def accumulate_hessian(total: Tensor, x: Tensor, tile: int = 512) -> None:
    """Add ``x^T x`` of the rows of ``x: (..., in)`` to ``total: (in, in)`` in float32.

    ``x^T x`` is symmetric: only the tiles on and above the diagonal are multiplied and the
    ones below are mirrored, which saves up to half the flops for wide inputs.

    Each batch's product is formed on its own and then added (never fused into ``total`` by
    ``addmm_``), so adding per-batch products made elsewhere (``accumulate_hessian`` into zeros, on
    a distributed worker) to a total in batch order gives the same bits as accumulating here.
    """
    rows = x.reshape(-1, x.shape[-1]).to(total.dtype)
    n = rows.shape[1]
    if n <= tile:
        total += rows.t() @ rows
        return
    starts = list(range(0, n, tile))
    for i in starts:
        left = rows[:, i:i + tile]
        block = left.t() @ rows[:, i:]
        total[i:i + tile, i:] += block
        total[i + tile:, i:i + tile] += block[:, tile:].t()
