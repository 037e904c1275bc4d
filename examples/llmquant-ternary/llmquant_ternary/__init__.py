"""Ternary weights per group: ``w ~ alpha * {-1, 0, +1}`` with a searched threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import CalibrationStats, UniformQuantized
from llmquant.errors import ConfigError
from llmquant.uniform import check_groups, group_index, to_stored_precision

__all__ = ["Ternary", "TernaryConfig", "ternary_quantize"]


@dataclass(frozen=True, kw_only=True)
class TernaryConfig:
    """Attributes:
        group_size: input channels per scale; None means per output channel.
        search_steps: thresholds tried per group, spread over [0.3, 1.2] * mean|w|.
    """

    group_size: int | None = 64
    search_steps: int = 19

    def __post_init__(self) -> None:
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size <= 0):
            raise ConfigError("group_size", self.group_size, "a positive int, or omit for per-channel")
        if self.search_steps < 1:
            raise ConfigError("search_steps", self.search_steps, "a positive int")


def ternary_quantize(W: Tensor, group_size: int | None, search_steps: int = 19) -> UniformQuantized:
    """Return 2-bit codes {0, 1, 2} (zero 1) and one scale per group for ``W: (out, in)``."""
    out_features, in_features = W.shape
    size = check_groups((out_features, in_features), group_size)
    groups = W.float().reshape(out_features, in_features // size, size)
    magnitude = groups.abs()
    mean = magnitude.mean(dim=2, keepdim=True)
    best_err = torch.full(mean.shape, float("inf"))
    best_alpha = torch.zeros_like(mean)
    best_mask = torch.zeros_like(groups, dtype=torch.bool)
    for c in torch.linspace(0.3, 1.2, search_steps).tolist():
        mask = magnitude > c * mean
        kept = mask.sum(dim=2, keepdim=True).clamp(min=1)
        alpha = to_stored_precision((magnitude * mask).sum(dim=2, keepdim=True) / kept)
        err = (groups - torch.sign(groups) * mask * alpha).pow(2).sum(dim=2, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha, best_alpha)
        best_mask = torch.where(better, mask, best_mask)
    codes = (torch.sign(groups) * best_mask + 1).to(torch.uint8)
    scale = torch.where(best_alpha > 0, best_alpha, torch.ones_like(best_alpha)).squeeze(2)
    return UniformQuantized(
        codes=codes.reshape(out_features, in_features), scales=scale,
        zeros=torch.ones_like(scale, dtype=torch.int32), g_idx=group_index(in_features, size),
        bits=2, group_size=group_size, symmetric=False,
    )


class Ternary:
    name: ClassVar[str] = "ternary"
    description: ClassVar[str] = "ternary alpha*{-1,0,1} per group, threshold searched (TWN, arXiv:1605.04711)"
    config_type: ClassVar[type[TernaryConfig]] = TernaryConfig
    result_type: ClassVar[type[UniformQuantized]] = UniformQuantized
    needs_calibration: ClassVar[bool] = False

    def quantize_weight(self, W: Tensor, config: TernaryConfig, stats: CalibrationStats | None) -> UniformQuantized:
        return ternary_quantize(W, config.group_size, config.search_steps)


@hookimpl
def llmquant_register_algorithms(register: Callable[[type[Any]], None]) -> None:
    register(Ternary)
