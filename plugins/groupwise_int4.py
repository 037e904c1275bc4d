"""Groupwise integer quantization with a per-group search for the scale and zero; no calibration.

Round-to-nearest spends its grid on each group's extremes. This searches, for every group, the
scale and zero that minimize the group's squared reconstruction error ``||W_g - Q_g||^2``:

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
from llmquant.uniform import UniformConfig, check_groups, group_index, minmax_params, quantize_to_codes, to_stored_precision

__all__ = ["GroupwiseConfig", "GroupwiseInt4", "groupwise_search"]


@dataclass(frozen=True, kw_only=True)
class GroupwiseConfig(UniformConfig):
    """Settings of the scale/zero search, on top of bits, group_size and symmetric.

    Attributes:
        grid: clipping ratios tried per group (0 skips the grid search).
        max_shrink: the smallest ratio tried is ``1 - max_shrink``.
        refine_steps: rounds of least-squares refinement after the grid (0 skips it).
    """

    grid: int = 20
    max_shrink: float = 0.2
    refine_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 0:
            raise ConfigError("grid", self.grid, "a count >= 0 of clipping ratios to try")
        if not isinstance(self.max_shrink, (int, float)) or not 0 <= self.max_shrink < 1:
            raise ConfigError("max_shrink", self.max_shrink, "a fraction in [0, 1)")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError("refine_steps", self.refine_steps, "a count >= 0 of refinement rounds")


def _error(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Return the squared error per group of groups ``Wg: (N, size)`` on (N, 1) scale/zero."""
    zero_f = zero.float()
    q = torch.round(Wg / scale).add_(zero_f).clamp_(0, 2**bits - 1)
    return q.sub_(zero_f).mul_(scale).sub_(Wg).pow_(2).sum(dim=1)


def _keep_better(Wg: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 current: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Return (scale, zero, error), taking the candidate scale/zero where they lower a group's error."""
    err = _error(Wg, scale, zero, bits)
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
    scale, zero = minmax_params(xmin, xmax, bits, symmetric)
    scale = to_stored_precision(scale)
    best = _error(Wg, scale, zero, bits)
    ratios = torch.linspace(1 - config.max_shrink, 1, config.grid + 1)[:-1].tolist() if config.grid else []
    for ratio in ratios:
        s, z = minmax_params(xmin * ratio, xmax * ratio, bits, symmetric)
        scale, zero, best = _keep_better(Wg, to_stored_precision(s), z, bits, (scale, zero, best))
    for _ in range(config.refine_steps):
        s, z = _least_squares(Wg, quantize_to_codes(Wg, scale, zero, bits), zero, bits, symmetric)
        scale, zero, best = _keep_better(Wg, to_stored_precision(s.clamp(min=1e-30)), z, bits, (scale, zero, best))
    codes = quantize_to_codes(Wg, scale, zero, bits)
    groups = in_features // size
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
