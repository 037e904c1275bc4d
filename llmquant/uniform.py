"""Uniform (affine) quantization: the config and the pure tensor functions RTN, GPTQ and the
groupwise searches share.

Conventions (the GPTQ reference's, arXiv:2210.17323, with the zero in code units)::

    q = clamp(round(w / scale) + zero, 0, 2**bits - 1)        w ~ scale * (q - zero)

Shapes: ``W: (out, in)``; per-group parameters are ``(out, G)`` with ``G = in // group_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmquant.algorithm import UniformQuantized
from llmquant.errors import ConfigError, ShapeError

__all__ = [
    "SUPPORTED_BITS",
    "UniformConfig",
    "best_clip",
    "check_groups",
    "dequantize_codes",
    "grid_scales",
    "group_index",
    "minmax_params",
    "minmax_quantize",
    "quantize_to_codes",
    "quantization_error",
    "to_stored_precision",
]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_FLOAT16_SMALLEST_NORMAL = 2.0**-14


@dataclass(frozen=True, kw_only=True)
class UniformConfig:
    """Settings every uniform quantizer shares.

    Attributes:
        bits: bits per weight code: 2, 3, 4, 5, 6 or 8 (formats say which they store).
        group_size: input channels sharing one scale and zero; None means one group per
            output channel (per-channel quantization).
        symmetric: zero fixed at the middle code ``2**(bits-1)``; False fits a zero per group.
        scale_grid: ``(superblock, levels)``: the scales of each run of `superblock` inputs are
            integer multiples ``0..levels`` of one float16 step (`grid_scales`), as GGUF's
            K-quants store them. Set by the output format (``--gguf-type q4_k``), not by hand.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError("bits", self.bits, f"one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size <= 0):
            raise ConfigError("group_size", self.group_size, "a positive int, or omit it for per-channel")
        if self.scale_grid is not None and (self.group_size is None or self.scale_grid[0] % self.group_size):
            raise ConfigError("group_size", self.group_size, f"a divisor of the scale grid's super-block of {self.scale_grid[0]}")


_CHUNK_ELEMENTS = 1 << 18  # weights rounded at a time by minmax_quantize


def check_groups(shape: tuple[int, int], group_size: int | None, what: str = "weight") -> int:
    """Return the group size in channels, raising if it does not divide ``in_features``.

    Raises:
        ShapeError: naming the weight, its shape and the group size.
    """
    in_features = shape[1]
    size = in_features if group_size is None else group_size
    if in_features % size:
        divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
        raise ShapeError(
            f"{what} has shape {tuple(shape)}: in_features {in_features} is not a multiple of "
            f"group_size {size}; choose a group size that divides it (e.g. {divisors or 'per-channel'}) "
            f"or leave the module unquantized with `ignore`"
        )
    return size


def group_index(in_features: int, group_size: int) -> Tensor:
    """Return the trivial ``g_idx``: (in,) int32 with ``i // group_size``."""
    return torch.arange(in_features, dtype=torch.int32) // group_size


def minmax_params(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Return (scale float32, zero int32) that cover ``[xmin, xmax]`` without clipping.

    Symmetric: zero is ``2**(bits-1)`` and scale is the smallest step that reaches both the
    most negative value with ``2**(bits-1)`` steps and the most positive with one step fewer
    (the GPTQ reference uses ``2*absmax / maxq``, which clips the positive end).

    Asymmetric: ``scale = (xmax - xmin) / maxq`` with the range widened to include 0, and the
    zero is kept >= 1 because GPTQ v1 files store ``zero - 1`` in an unsigned field; a group
    whose weights all but share a sign widens its step just enough to keep that.

    Args:
        xmin, xmax: same-shape tensors of per-group minimum and maximum.
    """
    maxq = 2**bits - 1
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.maximum(-xmin / half, xmax / (half - 1))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, half, dtype=torch.int32)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale)
    low = zero < 1
    scale = torch.where(low, torch.maximum(xmax / (maxq - 1), -xmin), scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.where(low, torch.ones_like(zero), zero).clamp(1, maxq)
    return scale, zero.to(torch.int32)


def to_stored_precision(scale: Tensor) -> Tensor:
    """Round scales to float16, the precision every target format stores them in.

    Codes are computed against the rounded scale, so they are the best codes for the scale
    that loaders will actually read. Normal float16 values round to nearest (at most 2**-12
    relative, under half a step even at the ends of an 8-bit grid); scales of tiny groups, which
    fall among float16's subnormals where rounding to nearest could shrink the step enough to
    clip the group's extremes, round up instead.
    """
    stored = scale.to(torch.float16)
    shrunk = (stored.float() < scale) & (scale < _FLOAT16_SMALLEST_NORMAL)
    stored = torch.where(shrunk, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.float()


def grid_scales(scale: Tensor, groups_per_block: int, levels: int) -> Tensor:
    """Put ``scale: (out, G)`` on a super-block grid: each run of `groups_per_block` groups gets one
    float16 step ``d = max / levels`` and every scale becomes ``d * k`` with integer ``k`` in
    ``0..levels`` (the largest exactly ``levels``; others rounded to the nearest, a non-zero scale
    to at least 1). This is how GGUF's K-quants store scales (Q4_K: 6-bit ``k``, Q6_K: 8-bit).
    """
    out_features, groups = scale.shape
    runs = scale.float().reshape(out_features, groups // groups_per_block, groups_per_block)
    d = (runs.amax(dim=2, keepdim=True) / levels).to(torch.float16).float()
    k = torch.where(d > 0, runs / torch.where(d > 0, d, 1.0), 0.0).round().clamp(0, levels)
    k = torch.where((runs > 0) & (k == 0), 1.0, k)
    # the largest is exactly `levels` even where float16 rounded d up (subnormal steps, under 6e-5, round by up to 1%),
    # so that d is the largest scale / levels, as readers of the blocks recover it
    k = torch.where((runs == runs.amax(dim=2, keepdim=True)) & (d > 0), float(levels), k)
    return (d * k).reshape(out_features, groups)


def quantize_to_codes(W: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Return uint8 codes ``clamp(round(W/scale) + zero, 0, 2**bits-1)``; scale/zero broadcast to W."""
    q = W.float() / scale
    return q.round_().add_(zero.float()).clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Return float32 ``scale * (codes - zero)``; scale/zero broadcast to codes."""
    return (codes.float() - zero.float()) * scale


def quantization_error(W: Tensor, scale: Tensor, zero: Tensor, bits: int, weight: Tensor | None = None,
                       norm: float = 2.0) -> Tensor:
    """Return ``sum(weight * |dequantize(quantize(W)) - W| ** norm)`` over W's last dimension.

    ``scale`` and ``zero`` broadcast to ``W`` (leading candidate dimensions included); ``weight``
    broadcasts to the error, e.g. ``(cols,)`` per column or W's shape per element.
    """
    zero_f = zero.float()
    err = quantize_to_codes(W, scale, zero, bits).float().sub_(zero_f).mul_(scale).sub_(W)
    err = err.pow_(2) if norm == 2 else err.abs_().pow_(norm)
    return (err if weight is None else err.mul_(weight)).sum(dim=-1)


def best_clip(W: Tensor, xmin: Tensor, xmax: Tensor, ratios: Tensor, bits: int, symmetric: bool,
              weight: Tensor | None = None, norm: float = 2.0, max_elements: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Return each row's lowest `quantization_error` over clipping ratios, and the ratio that reaches it.

    Row ``r`` of ``W: (rows, cols)`` is quantized on the min-max grid of ``[xmin[r], xmax[r]] * ratio``
    (scale rounded as stored) for each candidate ``ratios[:, r]`` (``ratios: (k, rows)``); ties go to
    the earlier candidate. Candidates are evaluated a batch at a time, at most `max_elements`
    errors at once, so memory stays bounded for any k.

    Returns:
        (error, ratio), both ``(rows,)`` float32.
    """
    W = W.float()
    best = torch.full(xmin.shape, float("inf"), dtype=torch.float32, device=W.device)
    chosen = torch.ones_like(best)
    for batch in torch.split(ratios, max(1, max_elements // W.numel())):
        scale, zero = minmax_params(xmin * batch, xmax * batch, bits, symmetric)  # (b, rows)
        err = quantization_error(W, to_stored_precision(scale)[..., None], zero[..., None], bits, weight, norm)
        lowest, at = err.min(dim=0)
        better = lowest < best
        best = torch.where(better, lowest, best)
        chosen = torch.where(better, batch.gather(0, at[None]).squeeze(0), chosen)
    return best, chosen


def minmax_quantize(W: Tensor, bits: int, group_size: int | None, symmetric: bool,
                    scale_grid: tuple[int, int] | None = None) -> UniformQuantized:
    """Round every weight to the nearest code of its group's min-max grid.

    Args:
        W: (out, in) float weight; ``in`` must be a multiple of `group_size`.
        scale_grid: put the scales on a super-block grid first (`UniformConfig.scale_grid`).

    Returns:
        `UniformQuantized` on W's device, with a trivial ``g_idx``.
    """
    out_features, in_features = W.shape
    size = check_groups((out_features, in_features), group_size)
    groups = W.float().reshape(out_features, in_features // size, size)
    scale, zero = minmax_params(groups.amin(dim=2), groups.amax(dim=2), bits, symmetric)
    scale = to_stored_precision(scale) if scale_grid is None else grid_scales(scale, scale_grid[0] // size, scale_grid[1])
    codes = torch.empty((out_features, in_features), dtype=torch.uint8, device=W.device)
    rows = max(1, _CHUNK_ELEMENTS // in_features)
    for start in range(0, out_features, rows):  # rows a cache-sized chunk at a time: twice as fast as the whole tensor
        chunk = slice(start, start + rows)
        codes[chunk] = quantize_to_codes(groups[chunk], scale[chunk].unsqueeze(2), zero[chunk].unsqueeze(2), bits).flatten(1)
    return UniformQuantized(
        codes=codes,
        scales=scale,
        zeros=zero,
        g_idx=group_index(in_features, size).to(W.device),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
