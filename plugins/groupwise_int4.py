"""Groupwise integer quantization with a per-group search for the scale and zero; no calibration.

Round-to-nearest spends its grid on each group's extremes. This searches, for every group, the
scale and zero that minimize the group's reconstruction error, each weight's squared error
weighted by ``|w|**weight_power`` (default 2): ``sum_i |w_i|^2 (w_i - q_i)^2``. Plain squared
error (``weight_power=0``) lowers the weight error most, but does it by clipping each group's
largest weights, which carry the most signal. Weighting by ``w**2`` keeps the large weights
accurate and spends the search on the rest (measurements: docs/benchmarks.md).

The search:

1. an MSE grid over clipping ratios: the min-max range shrunk by ``r`` for ``grid`` values of
   ``r`` in ``[1 - max_shrink, 1]``, keeping each group's best (the clipping search of AWQ,
   Lin et al. 2023, arXiv:2306.00978, section 3.3, applied to weight error alone, and of
   GPTQ's ``--mse`` option);
2. alternating least squares: with the codes fixed, the scale (and the offset, for asymmetric
   groups) that minimize the error have a closed form; re-round the codes against it, and keep
   the result only where the error fell (the refinement of llama.cpp's ``make_qkx2_quants``).

Scales are rounded to float16 before the codes are chosen, so the error minimized is the error
of the weights loaders read. Every step is a tensor operation over all groups at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import Algorithm, CalibrationStats, UniformQuantized
from llmquant.errors import ConfigError
from llmquant.uniform import (
    UniformConfig, best_clip, check_groups, grid_scales, group_index, minmax_params, quantization_error, quantize_to_codes,
    to_stored_precision,
)

__all__ = ["GroupwiseConfig", "GroupwiseInt4", "groupwise_search"]


@dataclass(frozen=True, kw_only=True)
class GroupwiseConfig(UniformConfig):
    """Settings of the scale/zero search, on top of bits, group_size and symmetric.

    Attributes:
        grid: clipping ratios tried per group (0 skips the grid search).
        max_shrink: the smallest ratio tried is ``1 - max_shrink``.
        refine_steps: rounds of least-squares refinement after the grid (0 skips it).
        norm: exponent of each weight's error (2: squared error).
        weight_power: each weight's error is weighted by ``|w| ** weight_power`` (0: unweighted).
    """

    grid: int = 20
    max_shrink: float = 0.2
    refine_steps: int = 4
    norm: float = 2.0
    weight_power: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 0:
            raise ConfigError("grid", self.grid, "a count >= 0 of clipping ratios to try")
        if not isinstance(self.max_shrink, (int, float)) or not 0 <= self.max_shrink < 1:
            raise ConfigError("max_shrink", self.max_shrink, "a fraction in [0, 1)")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError("refine_steps", self.refine_steps, "a count >= 0 of refinement rounds")
        if isinstance(self.norm, bool) or not isinstance(self.norm, (int, float)) or self.norm < 1:
            raise ConfigError("norm", self.norm, "an exponent >= 1 of the per-weight error")
        if isinstance(self.weight_power, bool) or not isinstance(self.weight_power, (int, float)) or self.weight_power < 0:
            raise ConfigError("weight_power", self.weight_power, "an exponent >= 0 of |w| weighting each weight's error")


def _keep_better(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int, norm: float, importance: Tensor | None,
                 current: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Return (scale, zero, error), taking the candidate scale/zero where they lower a group's error."""
    err = quantization_error(Wg, scale, zero, bits, importance, norm)
    old_scale, old_zero, old_err = current
    better = err < old_err
    row = better.unsqueeze(1)
    return torch.where(row, scale, old_scale), torch.where(row, zero, old_zero), torch.where(better, err, old_err)


def _least_squares(Wg: Tensor, codes: Tensor, zero: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Return the (scale, zero) that best fit ``Wg ~ scale * (codes - zero)`` for these codes."""
    q = codes.float()
    if not symmetric:  # fit Wg ~ scale * q + offset, then take the nearest integer zero
        qc = q - q.mean(dim=1, keepdim=True)
        var = qc.pow(2).sum(dim=1, keepdim=True)
        slope = (qc * Wg).sum(dim=1, keepdim=True) / var.clamp(min=1e-30)
        offset = Wg.mean(dim=1, keepdim=True) - slope * q.mean(dim=1, keepdim=True)
        fitted = torch.round(-offset / slope.where(slope > 0, torch.ones_like(slope))).clamp(1, 2**bits - 1)
        zero = torch.where((var > 0) & (slope > 0), fitted, zero.float()).to(torch.int32)
    centered = q - zero.float()
    scale = (centered * Wg).sum(dim=1, keepdim=True) / centered.pow(2).sum(dim=1, keepdim=True).clamp(min=1e-30)
    return scale, zero


def groupwise_search(W: Tensor, config: GroupwiseConfig) -> UniformQuantized:
    """Quantize ``W: (out, in)`` group by group with searched scales and zeros.

    Raises:
        ShapeError: when the group size does not divide ``in``.
    """
    out_features, in_features = W.shape
    size = check_groups((out_features, in_features), config.group_size)
    bits, symmetric = config.bits, config.symmetric
    Wg = W.float().reshape(-1, size)
    xmin, xmax = Wg.amin(dim=1, keepdim=True), Wg.amax(dim=1, keepdim=True)
    norm = float(config.norm)
    importance = Wg.abs().pow(config.weight_power) if config.weight_power else None
    # min-max first, so a group keeps it unless a clipped range is strictly better
    ratios = torch.cat([torch.ones(1), torch.linspace(1 - config.max_shrink, 1, config.grid + 1)[:-1]])
    best, ratio = best_clip(Wg, xmin.squeeze(1), xmax.squeeze(1), ratios[:, None].expand(-1, Wg.shape[0]).to(Wg.device),
                            bits, symmetric, importance, norm)
    ratio = ratio[:, None]
    scale, zero = minmax_params(xmin * ratio, xmax * ratio, bits, symmetric)
    scale = to_stored_precision(scale)
    for _ in range(config.refine_steps):
        s, z = _least_squares(Wg, quantize_to_codes(Wg, scale, zero, bits), zero, bits, symmetric)
        scale, zero, best = _keep_better(Wg, to_stored_precision(s.clamp(min=1e-30)), z, bits, norm, importance, (scale, zero, best))
    groups = in_features // size
    if config.scale_grid is not None:  # one step per super-block (GGUF's K-quants), then the codes for it
        scale = grid_scales(scale.reshape(out_features, groups), config.scale_grid[0] // size, config.scale_grid[1]).reshape(-1, 1)
    codes = quantize_to_codes(Wg, scale, zero, bits)
    return UniformQuantized(
        codes=codes.reshape(out_features, in_features),
        scales=scale.reshape(out_features, groups),
        zeros=zero.reshape(out_features, groups).to(torch.int32),
        g_idx=group_index(in_features, size).to(W.device),
        bits=bits, group_size=config.group_size, symmetric=symmetric,
    )


class GroupwiseInt4:
    """Per-group scale/zero search (clipping grid + least squares); no calibration."""

    name: ClassVar[str] = "groupwise-int4"
    description: ClassVar[str] = "groupwise int with an MSE clipping grid + least-squares scale/zero per group; no calibration"
    config_type: ClassVar[type[GroupwiseConfig]] = GroupwiseConfig
    result_type: ClassVar[type[UniformQuantized]] = UniformQuantized
    needs_calibration: ClassVar[bool] = False

    def quantize_weight(self, W: Tensor, config: GroupwiseConfig, stats: CalibrationStats | None) -> UniformQuantized:
        """Quantize ``W: (out, in)``; raises ShapeError if the group size does not divide ``in``."""
        return groupwise_search(W, config)


@hookimpl
def llmquant_register_algorithms(register: Callable[[type[Algorithm]], None]) -> None:
    register(GroupwiseInt4)
