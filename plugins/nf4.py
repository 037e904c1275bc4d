"""NF4 (and FP4): 4-bit codebook quantization with a float absmax per block of weights.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314, section 3): each block of `blocksize` consecutive
row-major weights is divided by its absolute maximum and every value is replaced by the index of
the nearest entry of a 16-value codebook. NormalFloat4's entries are quantiles of a standard
normal, so they suit normally distributed weights; FP4 is bitsandbytes' 4-bit float (E2M1).

Double quantization (QLoRA section 3, "Double Quantization") stores the block absmax values in
8 bits: their mean is subtracted, and the rest is quantized in blocks of 256 with the signed
dynamic 8-bit map of Dettmers (2015, arXiv:1511.04561).

Every operation mirrors bitsandbytes' own CPU quantizer (reciprocal-then-multiply scaling,
nearest code by midpoints, ties to the lower code; for the 8-bit map, division and a left
search then a distance check), so the codes and scales equal ``bitsandbytes.functional.quantize_4bit``'s
bit for bit, and a bitsandbytes loader computes exactly the weights llmquant does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import Algorithm, CalibrationStats, CodebookQuantized, NestedAbsmax
from llmquant.errors import ConfigError, ShapeError

__all__ = ["FP4_CODEBOOK", "NF4", "NF4Config", "NF4_CODEBOOK", "dynamic_map", "nf4_quantize", "quantize_absmax"]

# NormalFloat4, QLoRA appendix E: 8 positive and 7 negative normal quantiles, and an exact zero.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# bitsandbytes' FP4 (sign, 2 exponent bits, 1 mantissa bit), normalized by its largest value 12;
# the index is the 4-bit pattern, so the table is not sorted.
FP4_CODEBOOK = torch.tensor([0.0, 1 / 192, 8 / 12, 1.0, 4 / 12, 6 / 12, 2 / 12, 3 / 12], dtype=torch.float32)
FP4_CODEBOOK = torch.cat([FP4_CODEBOOK, -FP4_CODEBOOK])

CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
CHUNK_ELEMENTS = 1 << 20  # weights quantized at a time


@dataclass(frozen=True, kw_only=True)
class NF4Config:
    """Settings of the codebook quantizer.

    Attributes:
        blocksize: consecutive row-major weights sharing one absmax; one of 32, 64, ..., 4096.
        double_quant: store the absmax values in 8 bits (about 0.37 fewer bits per weight at 64).
        codebook: "nf4" (NormalFloat4) or "fp4".
    """

    blocksize: int = 64
    double_quant: bool = False
    codebook: Literal["nf4", "fp4"] = "nf4"

    def __post_init__(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError("blocksize", self.blocksize, f"one of {', '.join(map(str, BLOCKSIZES))}")
        if self.codebook not in CODEBOOKS:
            raise ConfigError("codebook", self.codebook, f"one of {', '.join(CODEBOOKS)}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError("double_quant", self.double_quant, "true or false")


def dynamic_map() -> Tensor:
    """Return the signed dynamic 8-bit map (256 sorted float32 values in [-0.993, 1]).

    For each exponent e = 0..6, ``2**e`` fraction values (midpoints of a linear grid on
    [0.1, 1]) are scaled by ``10**(e - 6)``, with both signs; 0 and 1 complete the 256 entries.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        boundaries = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values = (10 ** (e - 6)) * means
        parts += [values, -values]
    return torch.sort(torch.cat(parts).float()).values


def quantize_absmax(absmax: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> NestedAbsmax:
    """Quantize block scales to 8 bits: subtract their mean, then blockwise absmax + dynamic map.

    Args:
        absmax: (n,) float32 block scales.
    """
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    code_map = dynamic_map().to(x.device)
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    scales = blocks.abs().amax(dim=1)  # the zero padding cannot raise a maximum of absolute values
    normed = (blocks / scales.view(-1, 1)).flatten()[:n]
    left = (torch.searchsorted(code_map, normed, right=True) - 1).clamp(0, code_map.numel() - 1)
    right = (left + 1).clamp(max=code_map.numel() - 1)
    closer_right = (normed - code_map[right]).abs() < (normed - code_map[left]).abs()
    codes = torch.where(closer_right, right, left).to(torch.uint8)
    return NestedAbsmax(codes=codes, scales=scales, code_map=code_map, offset=float(offset), blocksize=blocksize)


def code_table(midpoints: Tensor) -> tuple[int, Tensor, Tensor]:
    """Return the lookup table that turns a value in [-1, 1] into the count of sorted `midpoints` below it.

    A value v falls in bin ``int(v * B/2 + B/2)`` of ``B`` equal bins (plus one for v = 1), B the
    fewest (a power of two, at least 256) that put at most one midpoint in a bin. Per bin: `below`,
    how many midpoints lie below the bin (less a margin that covers float32's rounding of the bin's
    position, under 2**-23), and `inside`, the one midpoint in the bin or its margins (+inf where
    none). ``below[bin] + (v > inside[bin])`` is then exactly the count that comparing v with every
    midpoint gives. Returns ``(B, below, inside)``.
    """
    margin = 1e-6
    values = midpoints.double().tolist()
    bins = 256
    while any(b - a <= 2 / bins + 2 * margin for a, b in zip(values, values[1:])):
        bins *= 2
        if bins > 2**16:
            raise ValueError(f"codebook midpoints {values} lie too close together for a lookup table")
    below = torch.empty(bins + 1, dtype=torch.uint8)
    inside = torch.full((bins + 1,), float("inf"))
    for b in range(bins + 1):
        low, high = b / (bins / 2) - 1 - margin, (b + 1) / (bins / 2) - 1 + margin
        held = [m for m in values if low <= m <= high]
        below[b] = sum(m < low for m in values)
        if held:
            inside[b] = held[0]
    return bins, below, inside


@functools.lru_cache(maxsize=None)
def _table(codebook: str) -> tuple[int, Tensor, Tensor]:
    code = CODEBOOKS[codebook]
    ordered = code.sort().values
    return code_table((ordered[:-1] + ordered[1:]) / 2)


def nf4_quantize(W: Tensor, blocksize: int = 64, codebook: str = "nf4", double_quant: bool = False) -> CodebookQuantized:
    """Quantize ``W: (out, in)`` to 4-bit codebook indices with a per-block absmax.

    Raises:
        ShapeError: when ``out * in`` is not a multiple of `blocksize`.
    """
    out_features, in_features = W.shape
    if W.numel() % blocksize:
        raise ShapeError(f"a weight of shape {(out_features, in_features)} has {W.numel()} elements, not a multiple "
                         f"of blocksize {blocksize}; choose a blocksize that divides it or leave it unquantized with `ignore`")
    code = CODEBOOKS[codebook].to(W.device)
    order = torch.argsort(code)
    bins, below, inside = _table(codebook)
    below, inside = below.to(W.device), inside.to(W.device)
    sorted_code = torch.equal(order, torch.arange(order.numel(), device=W.device))  # NF4's is: no lookup
    blocks = W.reshape(-1, blocksize)
    absmax = torch.empty(blocks.shape[0], dtype=torch.float32, device=W.device)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=W.device)
    rows = max(1, CHUNK_ELEMENTS // blocksize)
    size = min(blocks.shape[0], rows) * blocksize  # reused buffers: fresh ones cost a page fault per 4 KB
    position, index = torch.empty(size, device=W.device), torch.empty(size, dtype=torch.int32, device=W.device)
    midpoint, above = torch.empty(size, device=W.device), torch.empty(size, dtype=torch.bool, device=W.device)
    scaled_buffer = torch.empty(size, device=W.device)
    for start in range(0, blocks.shape[0], rows):  # chunks that stay in cache: about twice as fast as whole tensors
        chunk = blocks[start:start + rows].to(torch.float32)  # no copy when W is float32 already
        n = chunk.numel()
        chunk_absmax = absmax[start:start + rows]
        torch.amax(torch.abs(chunk, out=scaled_buffer[:n].view(chunk.shape)), dim=-1, out=chunk_absmax)
        scaled = torch.mul(chunk, (1.0 / chunk_absmax.clamp(min=1e-38)).view(-1, 1), out=scaled_buffer[:n].view(chunk.shape))
        scaled = scaled.clamp_(-1, 1).view(-1)
        # the nearest code is the count of midpoints below the value: the table gives it per bin of [-1, 1],
        # bar the one midpoint a bin may hold, which is compared exactly (3x faster than 15 comparisons)
        torch.mul(scaled, bins / 2, out=position[:n]).add_(bins / 2)
        index[:n].copy_(position[:n]).clamp_(0, bins)  # NaN weights land in a bin too
        nearest = codes[start:start + rows].view(-1)
        torch.index_select(below, 0, index[:n], out=nearest)
        torch.index_select(inside, 0, index[:n], out=midpoint[:n])
        nearest.add_(torch.gt(scaled, midpoint[:n], out=above[:n]).view(torch.uint8))
        if not sorted_code:
            nearest.copy_(order[nearest.long()])
    nested = quantize_absmax(absmax) if double_quant else None
    return CodebookQuantized(
        codes=codes.view(out_features, in_features),
        absmax=nested.dequantize() if nested is not None else absmax,
        codebook=code, blocksize=blocksize, name=codebook, nested=nested,
    )


class NF4:
    """Blockwise absmax + nearest NF4 (or FP4) code; no calibration."""

    name: ClassVar[str] = "nf4"
    description: ClassVar[str] = "NormalFloat4/FP4 codebook with blockwise absmax (QLoRA), optional double quant; no calibration"
    config_type: ClassVar[type[NF4Config]] = NF4Config
    result_type: ClassVar[type[CodebookQuantized]] = CodebookQuantized
    needs_calibration: ClassVar[bool] = False

    def quantize_weight(self, W: Tensor, config: NF4Config, stats: CalibrationStats | None) -> CodebookQuantized:
        """Quantize ``W: (out, in)``; raises ShapeError if `blocksize` does not divide ``out * in``."""
        return nf4_quantize(W, config.blocksize, config.codebook, config.double_quant)


@hookimpl
def llmquant_register_algorithms(register: Callable[[type[Algorithm]], None]) -> None:
    register(NF4)
