"""compressed-tensors pack-quantized layout: golden words, and compressed-tensors' own packing."""

from __future__ import annotations

import pytest
import torch

from llmquant.algorithm import UniformQuantized
from llmquant.io.compressed_tensors import from_ct_tensors, to_ct_tensors
from llmquant.uniform import minmax_quantize


def _result(codes: torch.Tensor, zeros: torch.Tensor, group_size: int | None, symmetric: bool, bits: int = 4) -> UniformQuantized:
    out_features, in_features = codes.shape
    groups = zeros.shape[1]
    return UniformQuantized(codes=codes.to(torch.uint8), scales=torch.ones(out_features, groups), zeros=zeros.to(torch.int32),
                            g_idx=(torch.arange(in_features) // (group_size or in_features)).to(torch.int32),
                            bits=bits, group_size=group_size, symmetric=symmetric)


def test_golden_words_packed_along_in_low_bits_first() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [15, 0, 0, 0, 0, 0, 0, 0, 0, 15]])
    zeros = torch.tensor([[3], [12]])
    tensors = to_ct_tensors(_result(codes, zeros, None, symmetric=False), torch.float16, with_g_idx=False)
    assert tensors["weight_packed"].tolist() == [[0x87654321 - 2**32, 0xA9], [0x0000000F, 0xF0]]
    assert tensors["weight_packed"].shape == (2, 2)  # ceil(10 * 4 / 32) words per row, rows padded with zero codes
    assert tensors["weight_zero_point"].tolist() == [[0xC3]]  # packed along out
    assert tensors["weight_shape"].tolist() == [2, 10] and tensors["weight_shape"].dtype == torch.int64
    assert tensors["weight_scale"].dtype == torch.float16 and "weight_g_idx" not in tensors
    back = from_ct_tensors(tensors)
    assert torch.equal(back.codes, codes.to(torch.uint8)) and torch.equal(back.zeros, zeros.to(torch.int32))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False), (2, False)], ids=["w4-sym", "w4-asym", "w8-asym", "w2-asym"])
def test_packing_equals_compressed_tensors(bits: int, symmetric: bool) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                                  reason="needs `pip install -e .[dev]` (compressed-tensors)")
    W = torch.randn(136, 200)
    result = minmax_quantize(W, bits, 40, symmetric) if bits != 2 else minmax_quantize(W, 2, 40, False)
    tensors = to_ct_tensors(result, torch.float32, with_g_idx=False)
    offset = 2 ** (bits - 1)  # compressed-tensors packs signed values shifted by half the range
    assert torch.equal(tensors["weight_packed"], helpers.pack_to_int32((result.codes.int() - offset).to(torch.int8), bits))
    if not symmetric:
        expected = helpers.pack_to_int32((result.zeros - offset).to(torch.int8), bits, packed_dim=0)
        assert torch.equal(tensors["weight_zero_point"], expected)
    back = from_ct_tensors(tensors)
    assert torch.equal(back.dequantize(), result.dequantize())


def test_act_order_g_idx_round_trips() -> None:
    result = minmax_quantize(torch.randn(64, 128), 4, 32, True)
    perm = torch.randperm(128)
    shuffled = UniformQuantized(codes=result.codes[:, perm], scales=result.scales, zeros=result.zeros,
                                g_idx=result.g_idx[perm], bits=4, group_size=32, symmetric=True)
    tensors = to_ct_tensors(shuffled, torch.float32, with_g_idx=True)
    assert tensors["weight_g_idx"].dtype == torch.int32
    assert torch.equal(from_ct_tensors(tensors).dequantize(), shuffled.dequantize())
