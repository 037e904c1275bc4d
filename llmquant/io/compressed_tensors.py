"""The compressed-tensors ``pack-quantized`` layout (llm-compressor's W4A16/W8A16 output), loaded
by vLLM (its native format), SGLang and transformers + compressed-tensors.

Per quantized Linear ``{p}`` with ``W: (out, in)``, G groups::

    {p}.weight_packed      int32   (out, ceil(in * bits / 32))   codes packed along in, low bits first
    {p}.weight_scale       float   (out, G)                      the model's dtype (float16 for bfloat16 models)
    {p}.weight_zero_point  int32   (ceil(out * bits / 32), G)    asymmetric only; packed along out
    {p}.weight_g_idx       int32   (in,)                         only with actorder "group"
    {p}.weight_shape       int64   (2,)                          (out, in)

    W[o, i] = weight_scale[o, g] * (q[o, i] - zp[o, g]),   g = g_idx[i]

compressed-tensors quantizes to signed ``q in [-2**(bits-1), 2**(bits-1))`` and packs ``q + 2**(bits-1)``;
that shifted value is exactly llmquant's unsigned code, and the same holds for the zero point,
so codes and zeros are packed as they are. Rows are padded with zero codes to whole words.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmquant.algorithm import UniformQuantized
from llmquant.errors import CheckpointError
from llmquant.io.packing import pack_int32, unpack_int32

__all__ = ["CT_BITS", "from_ct_tensors", "to_ct_tensors"]

CT_BITS = (2, 4, 8)


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack (rows, cols) unsigned values along cols, padding each row with zeros to whole words."""
    cols = values.shape[1]
    chunk = 32 // bits
    padded = torch.nn.functional.pad(values.to(torch.int64), (0, -cols % chunk))
    return pack_int32(padded, bits, dim=1)[:, : math.ceil(cols * bits / 32)].contiguous()


def _unpack_rows(packed: Tensor, bits: int, cols: int) -> Tensor:
    return unpack_int32(packed, bits, dim=1)[:, :cols]


def to_ct_tensors(result: UniformQuantized, scale_dtype: torch.dtype, *, with_g_idx: bool) -> dict[str, Tensor]:
    """Lay out a uniform result as pack-quantized tensors (names without the module prefix)."""
    out_features, in_features = result.shape
    tensors = {
        "weight_packed": _pack_rows(result.codes.cpu(), result.bits),
        "weight_scale": result.scales.to(scale_dtype).cpu().contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not result.symmetric:
        tensors["weight_zero_point"] = _pack_rows(result.zeros.cpu().t(), result.bits).t().contiguous()
    if with_g_idx:
        tensors["weight_g_idx"] = result.g_idx.to(torch.int32).cpu().contiguous()
    return tensors


def from_ct_tensors(tensors: dict[str, Tensor]) -> UniformQuantized:
    """Read pack-quantized tensors back; bits are inferred from the packed width, symmetry from
    whether a zero point is stored."""
    symmetric = "weight_zero_point" not in tensors
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    packed = tensors["weight_packed"]
    fitting = [b for b in CT_BITS if math.ceil(in_features * b / 32) == packed.shape[1]]
    if len(fitting) != 1:
        raise CheckpointError(f"weight_packed of shape {tuple(packed.shape)} does not hold {in_features} columns of 2, 4 or 8 bits")
    bits = fitting[0]
    scales = tensors["weight_scale"].float()
    groups = scales.shape[1]
    codes = _unpack_rows(packed, bits, in_features)
    if symmetric:
        zeros = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = _unpack_rows(tensors["weight_zero_point"].t(), bits, out_features).t().to(torch.int32).contiguous()
    group_size = None if groups == 1 else in_features // groups
    if "weight_g_idx" in tensors:
        g_idx = tensors["weight_g_idx"].to(torch.int32)
    else:
        g_idx = (torch.arange(in_features) // (group_size or in_features)).to(torch.int32)
    return UniformQuantized(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits,
                            group_size=group_size, symmetric=symmetric)
