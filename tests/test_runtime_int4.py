"""llmquant's runtime runs 4-bit uniform Linears on torch's packed int4 CPU kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmquant.algorithm import UniformQuantized
from llmquant.api import quantize
from llmquant.plugins import Plugins
from llmquant.runtime import Int4Linear, QuantLinear, load_quantized
from llmquant.uniform import minmax_quantize

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 17, 99, 123, 4]])


def _expected_weight(result: UniformQuantized) -> torch.Tensor:
    """The kernel's weight: (q - 8) * scale + (8 - zero) * scale, scale and zero in bfloat16."""
    g = result.g_idx.long()
    scale = result.scales.float()[:, g]
    zero = ((8 - result.zeros.float()[:, g]) * scale).bfloat16().float()
    return (result.codes.float() - 8) * scale.bfloat16().float() + zero


@pytest.mark.parametrize("shape,group_size,symmetric", [((96, 256), 64, True), ((64, 256), 32, False), ((64, 576), None, True),
                                                         ((128, 128), 128, False)],
                         ids=["g64-sym", "g32-asym", "channel-576", "g128-asym"])
def test_kernel_weight_and_output_match_the_codes(shape: tuple[int, int], group_size: int | None, symmetric: bool) -> None:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    result = minmax_quantize(W, 4, group_size, symmetric)
    layer = Int4Linear(result, None, torch.float32)
    torch.testing.assert_close(layer.dequantize(), _expected_weight(result), rtol=1e-6, atol=1e-7)
    x = torch.randn(5, shape[1])
    cosine = torch.nn.functional.cosine_similarity(layer(x).flatten(), (x @ result.dequantize().t()).flatten(), dim=0)
    assert cosine > 0.9999


def test_act_order_groups_are_permuted_into_place() -> None:
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    base = minmax_quantize(W, 4, 64, True)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    scattered = UniformQuantized(codes=base.codes[:, perm], scales=base.scales, zeros=base.zeros, g_idx=base.g_idx[perm],
                                 bits=4, group_size=64, symmetric=True)
    layer = Int4Linear(scattered, None, torch.float32)
    assert layer.perm is not None
    torch.testing.assert_close(layer.dequantize(), _expected_weight(scattered), rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 256)
    cosine = torch.nn.functional.cosine_similarity(layer(x).flatten(), (x @ scattered.dequantize().t()).flatten(), dim=0)
    assert cosine > 0.9999


def test_kernel_only_for_what_it_can_run() -> None:
    W = torch.randn(64, 256)
    assert Int4Linear.kernel_group_size(minmax_quantize(W, 4, 64, True)) == 64
    assert Int4Linear.kernel_group_size(minmax_quantize(W, 4, None, True)) == 256
    assert Int4Linear.kernel_group_size(minmax_quantize(W, 3, 64, True)) is None
    assert Int4Linear.kernel_group_size(minmax_quantize(W, 4, 16, True)) is None  # the kernel's smallest group is 32


def test_bfloat16_model_uses_the_kernel_and_matches(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    quantize(tiny_llama, tmp_path / "w4", {"bits": 4, "group_size": 64}, plugins=pm)
    quantize(tiny_llama, tmp_path / "w8", {"bits": 8, "group_size": 64}, plugins=pm)
    fast = load_quantized(tmp_path / "w4", dtype=torch.bfloat16, plugins=pm)
    exact = load_quantized(tmp_path / "w4", dtype=torch.float32, plugins=pm)
    assert sum(isinstance(m, Int4Linear) for m in fast.modules()) == 14
    assert not any(isinstance(m, Int4Linear) for m in exact.modules())
    assert sum(isinstance(m, Int4Linear) for m in load_quantized(tmp_path / "w4", kernel="int4", plugins=pm).modules()) == 14
    assert all(not isinstance(m, Int4Linear) for m in load_quantized(tmp_path / "w8", dtype=torch.bfloat16, plugins=pm).modules())
    assert any(isinstance(m, QuantLinear) for m in load_quantized(tmp_path / "w8", dtype=torch.bfloat16, plugins=pm).modules())
    with torch.no_grad():
        a, b = exact(IDS).logits.flatten(), fast(IDS).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    with pytest.raises(ValueError, match="kernel must be auto, int4 or dequant"):
        load_quantized(tmp_path / "w4", kernel="fast", plugins=pm)
