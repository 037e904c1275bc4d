"""The GPTQ checkpoint layout (v1, ``checkpoint_format: "gptq"``), loaded by vLLM, SGLang, TGI,
transformers + gptqmodel and exllama.

Per quantized Linear ``{p}`` with ``W: (out, in)``, G groups::

    {p}.qweight  int32    (in * bits / 32, out)   codes packed along in, low bits first
    {p}.qzeros   int32    (G, out * bits / 32)    zero - 1 (v1) packed along out
    {p}.scales   float16  (G, out)
    {p}.g_idx    int32    (in,)                   group of each input channel
    {p}.bias     float16  (out,)                  only when the layer has one

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))      (v1)

v2 (``gptq_v2``) stores the zero itself, without the minus one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from llmquant.algorithm import UniformQuantized
from llmquant.errors import ShapeError
from llmquant.io.packing import pack_int32, unpack_int32

__all__ = ["GPTQ_TENSORS", "from_gptq_tensors", "gptq_quantization_config", "to_gptq_tensors"]

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}


def to_gptq_tensors(result: UniformQuantized, *, version: int = 1) -> dict[str, Tensor]:
    """Lay out a uniform result as GPTQ tensors (names without the module prefix).

    Raises:
        ShapeError: when ``in`` or ``out`` cannot be packed at this bit width, or a v1 zero is 0.
    """
    out_features, in_features = result.shape
    bits = result.bits
    for name, length in (("in_features", in_features), ("out_features", out_features)):
        if length * bits % 32 or (bits == 3 and length % 32):
            raise ShapeError(
                f"GPTQ {bits}-bit packing needs {name} to be a multiple of {32 if bits == 3 else 32 // bits}, "
                f"got a weight of shape {(out_features, in_features)}; leave it unquantized with `ignore`"
            )
    stored_zeros = result.zeros.to(torch.int64) - (1 if version == 1 else 0)
    if version == 1 and bool((stored_zeros < 0).any()):
        raise ShapeError("GPTQ v1 stores zero - 1 and cannot hold a zero of 0: write gptq_v2 instead")
    return {
        "qweight": pack_int32(result.codes.t(), bits, dim=0),
        "qzeros": pack_int32(stored_zeros.t(), bits, dim=1),
        "scales": result.scales.t().to(torch.float16).contiguous(),
        "g_idx": result.g_idx.to(torch.int32).cpu().contiguous(),
    }


def from_gptq_tensors(tensors: dict[str, Tensor], *, version: int = 1) -> UniformQuantized:
    """Read GPTQ tensors back; bits and group size are inferred from the shapes."""
    qweight, qzeros, scales, g_idx = (tensors[n] for n in GPTQ_TENSORS)
    in_features = g_idx.shape[0]
    bits = qweight.shape[0] * 32 // in_features
    codes = unpack_int32(qweight, bits, dim=0).t()
    zeros = unpack_int32(qzeros, bits, dim=1).to(torch.int32) + (1 if version == 1 else 0)
    groups = scales.shape[0]
    return UniformQuantized(
        codes=codes,
        scales=scales.t().float(),
        zeros=zeros.t().contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=None if groups == 1 else in_features // groups,
        symmetric=False,
    )


def gptq_quantization_config(
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    desc_act: bool = False,
    version: int = 1,
    dynamic: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    quantizer: str = "llmquant",
) -> dict[str, Any]:
    """Return the ``quantization_config`` block of config.json (also written as quantize_config.json).

    Args:
        dynamic: per-module overrides in gptqmodel's form: ``{"+:regex": {"bits": 8}}`` for a
            different setting, ``{"-:regex": {}}`` for a module left in float.
        extra: algorithm fields (``damp_percent``, ``static_groups``, ...), copied as given.
    """
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": -1 if group_size is None else group_size,
        "desc_act": desc_act,
        "sym": symmetric,
        "checkpoint_format": "gptq" if version == 1 else "gptq_v2",
        "true_sequential": True,
        "static_groups": False,
        "damp_percent": 0.01,
        "lm_head": False,
        "meta": {"quantizer": [quantizer]},
    }
    config.update(extra or {})
    if dynamic:
        config["dynamic"] = dynamic
    return config
