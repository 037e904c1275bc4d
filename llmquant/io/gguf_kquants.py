"""GGUF's K-quant super-blocks (256 inputs), written from uniform codes whose scales lie on their grid.

A K-quant stores one float16 step ``d`` per super-block and small integer multipliers per group,
so a uniform result fits exactly when each super-block's group scales are ``d * k`` with integer
``k`` (`llmquant.uniform.grid_scales`, which algorithms apply when the format asks for it through
``UniformConfig.scale_grid``). Layouts (``ggml-common.h``)::

    Q4_K  144 bytes  | d | dmin | scales[12] | qs[128] |   8 groups of 32, y = d*sc*q - dmin*m, q in [0, 15]
    Q6_K  210 bytes  | ql[128] | qh[64] | scales[16] int8 | d |   16 groups of 16, y = d*sc*(q - 32), q in [0, 63]

    Q4_K qs: bytes [32p, 32p + 32) hold group 2p in their low nibbles and group 2p + 1 in the high
    Q4_K scales (6-bit sc and m of groups 0..7):
        byte j      (j < 4): sc[j]     | (sc[j + 4] >> 4) << 6
        byte j + 4  (j < 4): m[j]      | (m[j + 4] >> 4) << 6
        byte j + 8  (j < 4): (sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4
    Q6_K, each half h of 128 inputs, l in [0, 32):
        ql[64h + l]      = q[128h + l] & 0xF       | (q[128h + l + 64] & 0xF) << 4
        ql[64h + l + 32] = q[128h + l + 32] & 0xF  | (q[128h + l + 96] & 0xF) << 4
        qh[32h + l]      = q[128h + l] >> 4 | q[128h + l + 32] >> 4 << 2 | q[128h + l + 64] >> 4 << 4 | q[128h + l + 96] >> 4 << 6

Symmetric 4-bit codes ``s (c - 8)`` are Q4_K with ``sc = m = k`` and ``dmin = 8 d``; symmetric
6-bit codes ``s (c - 32)`` are Q6_K with ``sc = k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmquant.algorithm import UniformQuantized
from llmquant.errors import ShapeError

__all__ = ["KQUANTS", "SUPER", "KQuant", "decode_kquant", "encode_kquant"]

SUPER = 256  # inputs per super-block


@dataclass(frozen=True)
class KQuant:
    """One K-quant type: what it holds (symmetric `bits`-bit codes in groups of `group`) and its grid."""

    name: str
    ggml_type: int
    block_bytes: int
    bits: int
    group: int
    levels: int  # the largest multiplier k

    @property
    def grid(self) -> tuple[int, int]:
        return SUPER, self.levels


KQUANTS = {
    "q4_k": KQuant("q4_k", 12, 2 + 2 + 12 + 128, bits=4, group=32, levels=63),
    "q6_k": KQuant("q6_k", 14, 128 + 64 + 16 + 2, bits=6, group=16, levels=127),
}


def _steps(result: UniformQuantized, kind: KQuant) -> tuple[Tensor, Tensor]:
    """Return (d float16 ``(out, n)``, k ``(out, n, groups)`` int) of a result whose scales are on `kind`'s grid."""
    out_features, in_features = result.shape
    if in_features % SUPER or result.group_size != kind.group or result.bits != kind.bits or not result.symmetric:
        raise ShapeError(f"weight {result.shape}, {result.bits}-bit group {result.group_size}: {kind.name.upper()} holds "
                         f"symmetric {kind.bits}-bit codes in groups of {kind.group}, rows a multiple of {SUPER}")
    if not torch.equal(result.g_idx.cpu().long(), torch.arange(in_features) // kind.group):
        raise ShapeError(f"weight {result.shape}: scattered groups (act-order g_idx) do not fit GGUF's contiguous blocks")
    scales = result.scales.cpu().float().view(out_features, in_features // SUPER, SUPER // kind.group)
    d = (scales.amax(dim=2) / kind.levels).to(torch.float16)
    k = scales / torch.where(d > 0, d.float(), 1.0).unsqueeze(-1)
    if not torch.equal(k, k.round()) or k.max() > kind.levels:
        raise ValueError(f"scales are not on {kind.name.upper()}'s grid (one float16 step per {SUPER} inputs, multipliers "
                         f"up to {kind.levels}): quantize with --gguf-type {kind.name} so the algorithm fits them")
    return d, k.round().to(torch.int32)


def encode_kquant(result: UniformQuantized, kind: KQuant) -> Tensor:
    """Return `result` as ``(out, in / 256 * block_bytes)`` uint8 rows of `kind` super-blocks."""
    out_features, in_features = result.shape
    n = in_features // SUPER
    d, k = _steps(result, kind)
    q = result.codes.cpu().to(torch.int32).view(out_features, n, SUPER)
    if kind.name == "q4_k":
        dmin = (d.float() * 8).to(torch.float16)
        sc = k.to(torch.uint8)  # m = sc: dmin * m = 8 d sc, the symmetric zero
        low, high = sc[..., :4], sc[..., 4:]
        scale_bytes = torch.cat([low | (high >> 4) << 6, low | (high >> 4) << 6, (high & 0xF) | (high & 0xF) << 4], dim=-1)
        pairs = q.view(out_features, n, 4, 2, 32).to(torch.uint8)
        qs = (pairs[:, :, :, 0] | pairs[:, :, :, 1] << 4).reshape(out_features, n, 128)
        head = torch.stack([d, dmin], dim=-1).view(torch.uint8).view(out_features, n, 4)
        return torch.cat([head, scale_bytes, qs], dim=-1).reshape(out_features, n * kind.block_bytes)
    halves = q.view(out_features, n, 2, 4, 32)  # [h][t][l] = q[128h + 32t + l]
    ql = torch.cat([halves[:, :, :, 0] & 0xF | (halves[:, :, :, 2] & 0xF) << 4,
                    halves[:, :, :, 1] & 0xF | (halves[:, :, :, 3] & 0xF) << 4], dim=-1)  # (out, n, 2, 64)
    qh = halves[:, :, :, 0] >> 4
    for t in range(1, 4):
        qh = qh | (halves[:, :, :, t] >> 4) << (2 * t)  # (out, n, 2, 32)
    parts = [ql.reshape(out_features, n, 128).to(torch.uint8), qh.reshape(out_features, n, 64).to(torch.uint8),
             k.to(torch.int8).view(torch.uint8), d.view(torch.uint8).view(out_features, n, 2)]
    return torch.cat(parts, dim=-1).reshape(out_features, n * kind.block_bytes)


def decode_kquant(rows: Tensor, kind: KQuant, in_features: int) -> UniformQuantized:
    """Read rows that `encode_kquant` wrote back as uniform codes (Q4_K: its ``m`` must be the symmetric zero)."""
    out_features, n = rows.shape[0], in_features // SUPER
    blocks = rows.reshape(out_features, n, kind.block_bytes)
    if kind.name == "q4_k":
        d = blocks[..., 0:2].contiguous().view(torch.float16).float()
        scale_bytes, qs = blocks[..., 4:16].int(), blocks[..., 16:].int()
        sc = torch.cat([scale_bytes[..., :4] & 63, (scale_bytes[..., 8:] & 0xF) | (scale_bytes[..., :4] >> 6) << 4], dim=-1)
        pairs = qs.view(out_features, n, 4, 32)
        q = torch.stack([pairs & 0xF, pairs >> 4], dim=3).reshape(out_features, n, SUPER)
    else:
        ql, qh = blocks[..., :128].int().view(out_features, n, 2, 64), blocks[..., 128:192].int().view(out_features, n, 2, 32)
        sc = blocks[..., 192:208].contiguous().view(torch.int8).int()
        d = blocks[..., 208:210].contiguous().view(torch.float16).float()
        low = [ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4]
        q = torch.stack([low[t] | ((qh >> (2 * t)) & 3) << 4 for t in range(4)], dim=3).reshape(out_features, n, SUPER)
    scales = (d * sc.float()).reshape(out_features, -1)
    zeros = torch.full_like(scales, 2 ** (kind.bits - 1), dtype=torch.int32)
    return UniformQuantized(codes=q.reshape(out_features, in_features).to(torch.uint8), scales=scales, zeros=zeros,
                            g_idx=torch.arange(in_features, dtype=torch.int32) // kind.group, bits=kind.bits,
                            group_size=kind.group, symmetric=True)
