"""Input Hessians of Linear layers, ``H = 2/n * sum(x x^T)``, accumulated in float32."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats

__all__ = ["HessianAccumulator", "accumulate_hessian"]


@dataclass
class HessianAccumulator:
    """``H = 2/n * sum(x x^T)`` over the n rows of every input seen, kept as a float32 sum."""

    in_features: int
    device: torch.device
    float_inputs: bool = False
    total: Tensor = field(init=False)
    delta: Tensor | None = field(init=False, default=None)
    n: int = 0

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        if self.float_inputs:
            self.delta = torch.zeros_like(self.total)

    def add(self, x: Tensor) -> None:
        accumulate_hessian(self.total, x)
        self.n += x.numel() // x.shape[-1]

    def add_float(self, x: Tensor, x_float: Tensor) -> None:
        """Add ``(x_float - x)^T x`` of the same tokens' inputs in the float and in the quantized model."""
        assert self.delta is not None
        rows = x.reshape(-1, x.shape[-1]).float()
        self.delta.addmm_((x_float.reshape(-1, x.shape[-1]).float() - rows).t(), rows)

    def stats(self) -> CalibrationStats:
        """The Hessian, scaled in place (no second H-sized matrix): call once, the accumulator is spent."""
        scale = 2 / max(self.n, 1)
        return CalibrationStats(H=self.total.mul_(scale), nsamples=self.n,
                                dXXT=self.delta.mul_(scale) if self.delta is not None else None)


def accumulate_hessian(total: Tensor, x: Tensor, tile: int = 512) -> None:
    """Add ``x^T x`` of the rows of ``x: (..., in)`` to ``total: (in, in)`` in float32.

    ``x^T x`` is symmetric: only the tiles on and above the diagonal are multiplied and the
    ones below are mirrored, which saves up to half the flops for wide inputs.
    """
    rows = x.reshape(-1, x.shape[-1]).to(total.dtype)
    n = rows.shape[1]
    if n <= tile:
        total.addmm_(rows.t(), rows)
        return
    starts = list(range(0, n, tile))
    for i in starts:
        left = rows[:, i:i + tile]
        block = left.t() @ rows[:, i:]
        total[i:i + tile, i:] += block
        total[i + tile:, i:i + tile] += block[:, tile:].t()
