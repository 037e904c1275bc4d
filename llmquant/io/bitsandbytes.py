"""The bitsandbytes 4-bit layout, as transformers' ``save_pretrained`` writes it and loads it
(transformers + bitsandbytes, vLLM's pre-quantized bitsandbytes loader).

Per quantized Linear ``{p}`` with ``W: (out, in)``, ``n = out * in``, ``B = n / blocksize``::

    {p}.weight                                 uint8    ((n + 1) // 2, 1)  two codes per byte, row-major
                                                                           over (out, in), first code in
                                                                           the HIGH nibble
    {p}.weight.absmax                          float32  (B,)      uint8 codes with double quant
    {p}.weight.quant_map                       float32  (16,)     the codebook
    {p}.weight.nested_absmax                   float32  (ceil(B / 256),)   double quant only
    {p}.weight.nested_quant_map                float32  (256,)    double quant only
    {p}.weight.quant_state.bitsandbytes__nf4   uint8    UTF-8 JSON {"quant_type", "blocksize", "dtype",
                                                        "shape"[, "nested_blocksize", "nested_dtype",
                                                        "nested_offset"]}

    byte k:  | code 2k (bits 7..4) | code 2k+1 (bits 3..0) |
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping

import torch
from torch import Tensor

from llmquant.algorithm import CodebookQuantized, NestedAbsmax
from llmquant.errors import CheckpointError

__all__ = ["from_bnb_tensors", "pack_nibbles", "quant_state_key", "to_bnb_tensors"]


def quant_state_key(codebook: str) -> str:
    """Return the tensor name (under ``{p}.weight.``) of the JSON quant state for `codebook`."""
    return f"quant_state.bitsandbytes__{codebook}"


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (uint8, even length) two to a byte, the first in the high nibble."""
    if sys.byteorder == "little":  # each pair read as one int16 word, c0 + 256 * c1: 4x faster than two strided slices
        words = codes.view(torch.int16)
        return ((words << 4) | (words >> 8)).to(torch.uint8)  # the low byte: c0 << 4 | c1
    return (codes[0::2] << 4) | codes[1::2]


def to_bnb_tensors(result: CodebookQuantized, dtype: torch.dtype) -> dict[str, Tensor]:
    """Lay out a codebook result as bitsandbytes tensors (names without the module prefix).

    Args:
        dtype: the dtype bitsandbytes dequantizes to (the model's dtype).
    """
    codes = result.codes.flatten().cpu()
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    state: dict[str, Any] = {"quant_type": result.name, "blocksize": result.blocksize,
                             "dtype": str(dtype).removeprefix("torch."), "shape": list(result.shape)}
    tensors = {
        "weight": pack_nibbles(codes).unsqueeze(1),
        "weight.quant_map": result.codebook.float().cpu().clone(),  # a copy: the codebook is one shared tensor
    }
    if result.nested is None:
        tensors["weight.absmax"] = result.absmax.float().cpu().contiguous()
    else:
        nested = result.nested
        tensors["weight.absmax"] = nested.codes.cpu().contiguous()
        tensors["weight.nested_absmax"] = nested.scales.float().cpu().contiguous()
        tensors["weight.nested_quant_map"] = nested.code_map.float().cpu().clone()
        state.update(nested_blocksize=nested.blocksize, nested_dtype="float32", nested_offset=nested.offset)
    blob = json.dumps(state).encode()
    tensors[f"weight.{quant_state_key(result.name)}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return tensors


def from_bnb_tensors(tensors: Mapping[str, Tensor]) -> CodebookQuantized:
    """Read bitsandbytes tensors back into a codebook result."""
    key = next((k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")), None)
    if key is None:
        raise CheckpointError(f"no weight.quant_state.bitsandbytes__* tensor among {sorted(tensors)}")
    state = json.loads(bytes(tensors[key].cpu().numpy().tobytes()).decode())
    out_features, in_features = state["shape"]
    packed = tensors["weight"].flatten().cpu()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()[: out_features * in_features]
    nested = None
    absmax = tensors["weight.absmax"]
    if "nested_offset" in state:
        nested = NestedAbsmax(codes=absmax, scales=tensors["weight.nested_absmax"].float(),
                              code_map=tensors["weight.nested_quant_map"].float(), offset=float(state["nested_offset"]),
                              blocksize=int(state["nested_blocksize"]))
        absmax = nested.dequantize()
    return CodebookQuantized(codes=codes.view(out_features, in_features).to(torch.uint8), absmax=absmax.float(),
                             codebook=tensors["weight.quant_map"].float(), blocksize=int(state["blocksize"]),
                             name=str(state["quant_type"]), nested=nested)
