from __future__ import annotations

import pytest
import torch

from llmquant.algorithm import UniformQuantized
from llmquant.errors import ShapeError
from llmquant.io.gptq import from_gptq_tensors, to_gptq_tensors
from llmquant.uniform import minmax_quantize


def _result(codes: torch.Tensor, zeros: torch.Tensor, group_size: int = 8, bits: int = 4) -> UniformQuantized:
    out_features, in_features = codes.shape
    groups = in_features // group_size
    scales = torch.arange(1, out_features * groups + 1, dtype=torch.float32).view(out_features, groups) / 16
    return UniformQuantized(codes=codes.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32),
                            g_idx=torch.arange(in_features, dtype=torch.int32) // group_size,
                            bits=bits, group_size=group_size, symmetric=False)


def test_golden_tensors_4bit_v1() -> None:
    # W (out=8, in=16): row o holds codes (o + i) % 16; zeros 8 in group 0, 1 + o in group 1.
    out_features, in_features = 8, 16
    codes = (torch.arange(out_features).view(-1, 1) + torch.arange(in_features)) % 16
    zeros = torch.stack([torch.full((out_features,), 8), 1 + torch.arange(out_features)], dim=1)
    t = to_gptq_tensors(_result(codes, zeros))
    assert t["qweight"].shape == (2, 8) and t["qweight"].dtype == torch.int32
    assert [w & 0xFFFFFFFF for w in t["qweight"][:, 0].tolist()] == [0x76543210, 0xFEDCBA98]
    assert [w & 0xFFFFFFFF for w in t["qweight"][:, 1].tolist()] == [0x87654321, 0x0FEDCBA9]
    # v1 stores zero - 1 packed along out: group 0 -> 7 everywhere, group 1 -> 0..7
    assert [w & 0xFFFFFFFF for w in t["qzeros"].flatten().tolist()] == [0x77777777, 0x76543210]
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (2, 8)
    assert t["scales"][1, 0].item() == 2 / 16
    assert t["g_idx"].tolist() == [0] * 8 + [1] * 8


def test_v2_stores_the_zero_itself() -> None:
    codes = torch.zeros(8, 8, dtype=torch.long)
    t = to_gptq_tensors(_result(codes, torch.full((8, 1), 8)), version=2)
    assert t["qzeros"].item() & 0xFFFFFFFF == 0x88888888


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_round_trip_dequantizes_identically(bits: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    result = minmax_quantize(W, bits, 32, symmetric)
    back = from_gptq_tensors(to_gptq_tensors(result))
    assert back.bits == bits and back.group_size == 32
    assert torch.equal(back.dequantize(), result.dequantize())


def test_v1_refuses_a_zero_of_zero() -> None:
    with pytest.raises(ShapeError, match="gptq_v2"):
        to_gptq_tensors(_result(torch.zeros(8, 8, dtype=torch.long), torch.zeros(8, 1)))


def test_shape_that_cannot_pack_is_named() -> None:
    result = minmax_quantize(torch.randn(12, 64), 4, 32, True)
    with pytest.raises(ShapeError, match="out_features to be a multiple of 8"):
        to_gptq_tensors(result)
