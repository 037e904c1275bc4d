"""Pack small unsigned integers into int32 words, as GPTQ and compressed-tensors store them.

Values are laid out as one little-endian bit stream along the packed dimension: element j
occupies bits ``[bits*j, bits*j + bits)`` of the stream, low bits first, and word w holds
stream bits ``[32*w, 32*w + 32)``. For 2, 4 and 8 bits a word holds ``32/bits`` whole values;
3-bit values cross word boundaries, 32 values in 3 words::

    word 0: v0..v9 (30 bits) + low 2 bits of v10
    word 1: high bit of v10, v11..v20 (30 bits), low bit of v21
    word 2: high 2 bits of v21, v22..v31
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from llmquant.errors import ShapeError

__all__ = ["pack_int32", "unpack_int32", "packed_length"]


def _chunk(bits: int) -> tuple[int, int]:
    """Return (values, words) of the smallest whole chunk of the stream."""
    values = 32 // math.gcd(bits, 32)
    return values, values * bits // 32


def packed_length(length: int, bits: int) -> int:
    """Return how many int32 words hold `length` values of `bits` bits."""
    values, words = _chunk(bits)
    if length % values:
        raise ShapeError(f"cannot pack {length} values of {bits} bits: the length must be a multiple of {values}")
    return length // values * words


def pack_int32(values: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Pack unsigned `bits`-bit `values` along `dim` into int32 words.

    Args:
        values: 2-D integer tensor, every value in ``[0, 2**bits)``.
        dim: the dimension to pack; its length must be a multiple of ``32 / gcd(bits, 32)``.

    Returns:
        int32 tensor whose `dim` is ``length * bits / 32`` long.
    """
    packed_length(values.shape[dim], bits)
    if bits in (2, 4, 8) and sys.byteorder == "little":  # whole values per byte: pack bytes, read them as words
        words = _pack_bytes((values.t() if dim == 0 else values).contiguous(), bits).view(torch.int32)
        return words.t().contiguous() if dim == 0 else words
    if dim == 1:
        return pack_int32(values.t(), bits, 0).t().contiguous()
    length, cols = values.shape
    n_values, n_words = _chunk(bits)
    if n_words == 1:  # 2, 4, 8 bits: whole values per word with disjoint bits, so their sum is their bitwise or;
        # int32 shifts and sums wrap in two's complement, which is exactly the stored word
        v32 = values.to(torch.int32).reshape(length // n_values, n_values, cols)
        shift32 = (torch.arange(n_values, dtype=torch.int32, device=values.device) * bits).view(1, -1, 1)
        return (v32 << shift32).sum(dim=1, dtype=torch.int32)
    v = values.to(torch.int64).reshape(length // n_values, n_values, cols)
    offsets = torch.arange(n_values, device=values.device) * bits
    word, shift = offsets // 32, (offsets % 32).view(1, -1, 1)
    shifted = v << shift
    words = torch.zeros(v.shape[0], n_words + 1, cols, dtype=torch.int64, device=values.device)
    words.index_add_(1, word, shifted & 0xFFFFFFFF)
    words.index_add_(1, word + 1, shifted >> 32)
    words = words[:, :n_words].reshape(-1, cols)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_bytes(values: Tensor, bits: int) -> Tensor:
    """Pack ``values: (rows, length)`` along their last dimension into uint8 bytes, low bits first
    (a byte holds ``8 / bits`` values); on a little-endian machine every 4 bytes read as one word
    of the stream. One uint8 pass per value in a byte, a quarter of the int32 work."""
    per_byte = 8 // bits
    v = values.to(torch.uint8).reshape(values.shape[0], -1, per_byte)
    packed = v[..., 0].clone()
    for i in range(1, per_byte):
        packed |= v[..., i] << (bits * i)
    return packed


def unpack_int32(packed: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Invert `pack_int32`: return uint8 values (int32 for more than 8 bits) along `dim`."""
    if dim == 1:
        return unpack_int32(packed.t(), bits, 0).t().contiguous()
    rows, cols = packed.shape
    n_values, n_words = _chunk(bits)
    if rows % n_words:
        raise ShapeError(f"cannot unpack {rows} words of {bits}-bit values: expected a multiple of {n_words}")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p.reshape(-1, n_words, cols), torch.zeros_like(p[:1]).expand(rows // n_words, cols).unsqueeze(1)], dim=1)
    offsets = torch.arange(n_values, device=packed.device) * bits
    word, shift = offsets // 32, (offsets % 32).view(1, -1, 1)
    low = p[:, word] >> shift
    high = p[:, word + 1] << (32 - shift)
    values: Tensor = (low | high) & (2**bits - 1)
    return values.reshape(-1, cols).to(torch.uint8 if bits <= 8 else torch.int32)
