"""bitsandbytes 4-bit layout: golden bytes, and the same tensors bitsandbytes itself saves."""

from __future__ import annotations

import json

import pytest
import torch

from llmquant.algorithm import CodebookQuantized
from llmquant.io.bitsandbytes import from_bnb_tensors, to_bnb_tensors
from llmquant_plugins.nf4 import NF4_CODEBOOK, nf4_quantize


def test_golden_bytes_first_code_in_high_nibble() -> None:
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    result = CodebookQuantized(codes=codes, absmax=torch.tensor([0.5, 2.0]), codebook=NF4_CODEBOOK, blocksize=4, name="nf4")
    tensors = to_bnb_tensors(result, torch.float16)
    assert tensors["weight"].flatten().tolist() == [0x12, 0x34, 0xF0, 0x78]
    assert tensors["weight"].shape == (4, 1) and tensors["weight"].dtype == torch.uint8
    state = json.loads(bytes(tensors["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state == {"quant_type": "nf4", "blocksize": 4, "dtype": "float16", "shape": [2, 4]}
    back = from_bnb_tensors(tensors)
    assert torch.equal(back.codes, codes) and torch.equal(back.dequantize(), result.dequantize())


def test_odd_element_count_pads_the_last_byte() -> None:
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    result = CodebookQuantized(codes=codes, absmax=torch.tensor([1.0]), codebook=NF4_CODEBOOK, blocksize=3, name="nf4")
    tensors = to_bnb_tensors(result, torch.float32)
    assert tensors["weight"].flatten().tolist() == [0x12, 0x30]
    assert torch.equal(from_bnb_tensors(tensors).codes, codes)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_tensors_equal_what_bitsandbytes_saves(double_quant: bool) -> None:
    """Same weight through bitsandbytes' quantize_4bit + QuantState.as_dict(packed=True) (what
    transformers writes) and through llmquant: the same keys, dtypes, shapes and bytes (the 8-bit
    block-scale codes of double quant may differ by one step on a few blocks; see test_nf4_plugin)."""
    F = pytest.importorskip("bitsandbytes.functional", reason="needs `pip install -e .[dev]` (bitsandbytes)")
    W = torch.randn(256, 384) * 0.02
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    theirs["weight"] = packed
    ours = to_bnb_tensors(nf4_quantize(W, 64, double_quant=double_quant), torch.float32)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert (ours[key].dtype, ours[key].shape) == (tensor.dtype, tensor.shape), key
        if key == "weight.quant_state.bitsandbytes__nf4":
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(tensor.tolist()))
        elif not (double_quant and key == "weight.absmax"):
            assert torch.equal(ours[key], tensor), key


def test_nibble_packing_by_words_equals_two_strided_slices() -> None:
    from llmquant.io.bitsandbytes import pack_nibbles

    codes = torch.randint(0, 16, (2 * 12345,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    codes[:4] = torch.tensor([15, 15, 0, 15], dtype=torch.uint8)  # the extremes of both nibbles
    assert torch.equal(pack_nibbles(codes), (codes[0::2] << 4) | codes[1::2])
