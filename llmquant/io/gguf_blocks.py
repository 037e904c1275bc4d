"""GGUF's 32-element block types, written from uniform codes without re-quantizing them.

Blocks run along each row of the Hugging Face weight ``W: (out, in)`` (GGUF's ``ne[0]`` is the
input dimension), 32 inputs per block; a row is ``in / 32`` blocks back to back. Per block
(``ggml-common.h``; d and m float16, little-endian)::

    Q4_0  18 bytes  | d | qs[16] |             y = d * (q - 8)     q in [0, 15]
    Q4_1  20 bytes  | d | m | qs[16] |         y = d * q + m       q in [0, 15]
    Q5_0  22 bytes  | d | qh[4] | qs[16] |     y = d * (q - 16)    q in [0, 31]
    Q8_0  34 bytes  | d | qs[32] int8 |        y = d * q           q in [-128, 127]

    qs[16], nibbles:  byte j = q[j] & 0xF  |  (q[j + 16] & 0xF) << 4
    qh[4], Q5_0:      bit j of the little-endian uint32 = bit 4 of q[j]

A uniform result ``W = s * (c - z)`` with one float16 scale per group of 32 (a group of 64 or 128
repeats its scale in each of its 32-blocks) is one of these exactly when ``c - z`` lies in the
type's range: Q4_0 holds symmetric 4-bit and any 2- or 3-bit codes (``q = c - z + 8``), Q5_0 any
4-bit codes (``q = c - z + 16``), Q8_0 up to 7 bits and symmetric 8-bit (``q = c - z``); Q4_1
holds 4-bit codes with ``m = -s * z`` rounded to float16 (exact when symmetric, under 1% of a
step otherwise). Scattered groups (GPTQ's act-order ``g_idx``) never fit contiguous blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmquant.algorithm import UniformQuantized
from llmquant.errors import ShapeError

__all__ = ["BLOCK", "LOSSLESS", "BlockType", "decode_blocks", "encode_blocks", "fitting_types", "uniform_fit"]

BLOCK = 32  # inputs per block in every type here


@dataclass(frozen=True)
class BlockType:
    """One 32-element GGUF type: its name, ggml type id, bytes per block and ``q = c - z + offset`` range."""

    name: str
    ggml_type: int
    block_bytes: int
    offset: int  # q = c - z + offset
    low: int  # the smallest q
    high: int  # the largest q
    affine: bool = False  # Q4_1: y = d * q + m, q = c itself


LOSSLESS = {
    "q4_0": BlockType("q4_0", 2, 2 + 16, 8, 0, 15),
    "q4_1": BlockType("q4_1", 3, 2 + 2 + 16, 0, 0, 15, affine=True),
    "q5_0": BlockType("q5_0", 6, 2 + 4 + 16, 16, 0, 31),
    "q8_0": BlockType("q8_0", 8, 2 + 32, 0, -128, 127),
}


def uniform_fit(kind: BlockType, bits: int, symmetric: bool) -> bool:
    """Return whether every ``bits``-bit code ``c - z`` (zero fixed at ``2**(bits-1)`` when symmetric) fits `kind`."""
    if kind.affine:
        return bits <= 4
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (-(2**bits - 1), 2**bits - 1)
    return bool(kind.low <= lowest + kind.offset and highest + kind.offset <= kind.high)


def fitting_types(bits: int, symmetric: bool) -> list[str]:
    """Return the block types that hold ``bits``-bit codes of this symmetry, smallest first."""
    return [name for name, kind in LOSSLESS.items() if uniform_fit(kind, bits, symmetric)]


def encode_blocks(result: UniformQuantized, kind: BlockType) -> Tensor:
    """Return `result` as ``(out, in / 32 * block_bytes)`` uint8 rows of `kind` blocks.

    Raises:
        ShapeError: a group size that is not a multiple of 32, or scattered groups.
        ValueError: codes outside the type's range (`uniform_fit` says which fit).
    """
    out_features, in_features = result.shape
    group = result.group_size or in_features
    if group % BLOCK or in_features % BLOCK:
        raise ShapeError(f"weight {result.shape} with group size {group}: GGUF blocks need groups of a multiple of {BLOCK}")
    if not torch.equal(result.g_idx.cpu().long(), torch.arange(in_features) // group):
        raise ShapeError(f"weight {result.shape}: scattered groups (act-order g_idx) do not fit GGUF's contiguous blocks")
    n = in_features // BLOCK
    per_group = group // BLOCK
    scales = result.scales.cpu().float().repeat_interleave(per_group, dim=1)  # (out, n)
    zeros = result.zeros.cpu().int().repeat_interleave(per_group, dim=1)
    codes = result.codes.cpu().int().view(out_features, n, BLOCK)
    d = scales.to(torch.float16)
    if kind.affine:
        q = codes
        m = (-scales * zeros).to(torch.float16)
        head = torch.stack([d, m], dim=-1)
    else:
        q = codes - zeros.unsqueeze(-1) + kind.offset
        head = d.unsqueeze(-1)
    if q.min() < kind.low or q.max() > kind.high:
        raise ValueError(f"codes minus zeros span [{int(q.min()) - kind.offset}, {int(q.max()) - kind.offset}]: "
                         f"outside {kind.name.upper()}'s range")
    parts = [head.contiguous().view(torch.uint8).view(out_features, n, -1)]
    if kind.name == "q8_0":
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        if kind.name == "q5_0":
            high = ((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)
            parts.append(high.sum(-1, keepdim=True).to(torch.int32).view(torch.uint8).view(out_features, n, 4))
        low = (q & 0xF).to(torch.uint8)
        parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2:] << 4))
    return torch.cat(parts, dim=-1).reshape(out_features, n * kind.block_bytes)


def decode_blocks(rows: Tensor, kind: BlockType, in_features: int) -> UniformQuantized:
    """Read ``(out, in / 32 * block_bytes)`` uint8 rows of `kind` blocks back as uniform codes (groups of 32)."""
    out_features = rows.shape[0]
    n = in_features // BLOCK
    blocks = rows.reshape(out_features, n, kind.block_bytes)
    heads = 2 if kind.affine else 1
    head = blocks[..., : 2 * heads].contiguous().view(torch.float16).float()  # (out, n, heads)
    body = blocks[..., 2 * heads:]
    if kind.name == "q8_0":
        q = body.contiguous().view(torch.int8).int()
    else:
        qs = body[..., -BLOCK // 2:].int()
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1)
        if kind.name == "q5_0":
            qh = body[..., :4].contiguous().view(torch.int32)  # (out, n, 1)
            q = q | (((qh >> torch.arange(BLOCK, dtype=torch.int32)) & 1) << 4)
    scales = head[..., 0]
    if kind.affine:
        # y = d q + m = d (q - z) with z = -m / d: an integer zero only when m is a multiple of d, as we write it
        zeros = torch.round(-head[..., 1] / torch.where(scales == 0, 1.0, scales)).int()
        codes = q
    else:
        zeros = torch.full_like(scales, 2 ** 7 if kind.name == "q8_0" else kind.offset, dtype=torch.int32)
        codes = q - kind.offset + zeros.unsqueeze(-1)
    bits = 8 if kind.name == "q8_0" else (5 if kind.name == "q5_0" else 4)
    return UniformQuantized(codes=codes.reshape(out_features, in_features).to(torch.uint8), scales=scales, zeros=zeros,
                            g_idx=torch.arange(in_features, dtype=torch.int32) // BLOCK, bits=bits, group_size=BLOCK,
                            symmetric=not kind.affine)
