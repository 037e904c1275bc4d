from __future__ import annotations

import numpy as np
import pytest
import torch

from llmquant.algorithm import UniformQuantized
from llmquant.errors import ShapeError
from llmquant.io.gguf_blocks import LOSSLESS, decode_blocks, encode_blocks, fitting_types, uniform_fit
from llmquant.io.gguf_kquants import KQUANTS, decode_kquant, encode_kquant
from llmquant.uniform import minmax_quantize

gguf = pytest.importorskip("gguf")


def _block(codes: list[int], zero: int, bits: int, scale: float = 0.5, symmetric: bool = True) -> UniformQuantized:
    """One row of one 32-element group."""
    return UniformQuantized(codes=torch.tensor([codes], dtype=torch.uint8), scales=torch.tensor([[scale]]),
                            zeros=torch.tensor([[zero]], dtype=torch.int32), g_idx=torch.zeros(32, dtype=torch.int32),
                            bits=bits, group_size=32, symmetric=symmetric)


def test_golden_bytes_q4_0() -> None:
    # codes j % 16 with zero 8: q = code; byte j holds q[j] low, q[j + 16] high; d = 0.5 is float16 0x3800
    rows = encode_blocks(_block([j % 16 for j in range(32)], 8, 4), LOSSLESS["q4_0"])
    assert bytes(rows[0].tolist()) == b"\x00\x38" + bytes(j | j << 4 for j in range(16))


def test_golden_bytes_q4_1() -> None:
    # asymmetric zero 3, scale 0.5: m = -1.5 (float16 0xBE00), q = the codes themselves
    rows = encode_blocks(_block([j % 16 for j in range(32)], 3, 4, symmetric=False), LOSSLESS["q4_1"])
    assert bytes(rows[0].tolist()) == b"\x00\x38\x00\xbe" + bytes(j | j << 4 for j in range(16))


def test_golden_bytes_q5_0() -> None:
    # q = code - 3 + 16 = j % 16 + 13: the fifth bit is set where j % 16 >= 3, bit j of a little-endian uint32
    rows = encode_blocks(_block([j % 16 for j in range(32)], 3, 4, symmetric=False), LOSSLESS["q5_0"])
    low = [(j + 13) & 0xF for j in range(16)]
    assert bytes(rows[0].tolist()) == b"\x00\x38" + (0xFFF8FFF8).to_bytes(4, "little") + bytes(v | v << 4 for v in low)


def test_golden_bytes_q8_0() -> None:
    # symmetric 8-bit, zero 128: q = code - 128 as int8
    rows = encode_blocks(_block([128 + j - 16 for j in range(32)], 128, 8), LOSSLESS["q8_0"])
    assert bytes(rows[0].tolist()) == b"\x00\x38" + bytes((j - 16) & 0xFF for j in range(32))


@pytest.mark.parametrize("name", sorted(LOSSLESS))
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_gguf_py_dequantizes_our_blocks_to_llmquants_own_weights(name: str, group_size: int | None) -> None:
    torch.manual_seed(0)
    W = torch.randn(16, 256)
    for bits in (2, 3, 4, 5, 8):
        for symmetric in (True, False):
            if not uniform_fit(LOSSLESS[name], bits, symmetric):
                continue
            result = minmax_quantize(W, bits, group_size, symmetric)
            rows = encode_blocks(result, LOSSLESS[name])
            theirs = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType(LOSSLESS[name].ggml_type))
            exact = not (name == "q4_1" and not symmetric)  # Q4_1's m = -s * z is rounded to float16
            ours = result.dequantize().numpy()
            if exact:
                assert np.array_equal(theirs, ours), (name, bits, symmetric)
            else:
                assert np.abs(theirs - ours).max() <= 0.01 * result.scales.max().item()
            back = decode_blocks(rows, LOSSLESS[name], 256).dequantize().numpy()
            assert np.array_equal(back, ours)  # read back, the codes are llmquant's own (Q4_1 too: z = round(-m / d))


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
def test_llama_cpps_own_blocks_decode_and_encode_to_the_same_bytes(name: str) -> None:
    qtype = gguf.GGMLQuantizationType(LOSSLESS[name].ggml_type)
    rows = gguf.quants.quantize(np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32), qtype)
    result = decode_blocks(torch.from_numpy(rows), LOSSLESS[name], 128)
    assert np.array_equal(encode_blocks(result, LOSSLESS[name]).numpy(), rows)


def test_the_types_that_hold_each_width() -> None:
    assert fitting_types(4, True) == ["q4_0", "q4_1", "q5_0", "q8_0"]
    assert fitting_types(4, False) == ["q4_1", "q5_0", "q8_0"]
    assert fitting_types(3, False) == ["q4_0", "q4_1", "q5_0", "q8_0"]
    assert fitting_types(8, True) == ["q8_0"]
    assert fitting_types(8, False) == []


def test_what_does_not_fit_is_refused() -> None:
    result = minmax_quantize(torch.randn(4, 64), 4, 32, False)
    with pytest.raises(ValueError, match="outside Q4_0's range"):
        encode_blocks(result, LOSSLESS["q4_0"])
    scattered = UniformQuantized(codes=result.codes, scales=result.scales, zeros=result.zeros,
                                 g_idx=torch.arange(64, dtype=torch.int32) % 2, bits=4, group_size=32, symmetric=False)
    with pytest.raises(ShapeError, match="act-order"):
        encode_blocks(scattered, LOSSLESS["q5_0"])
    with pytest.raises(ShapeError, match="multiple of 32"):
        encode_blocks(minmax_quantize(torch.randn(4, 48), 4, 16, True), LOSSLESS["q4_0"])


def _super_block(k: list[int], d: float, bits: int, group: int) -> UniformQuantized:
    """One row of one 256-input super-block: codes e % 2**bits, scales d * k per group, symmetric."""
    scales = torch.tensor([[d * kj for kj in k]])
    return UniformQuantized(codes=torch.tensor([[e % 2**bits for e in range(256)]], dtype=torch.uint8), scales=scales,
                            zeros=torch.full((1, len(k)), 2 ** (bits - 1), dtype=torch.int32),
                            g_idx=torch.arange(256, dtype=torch.int32) // group, bits=bits, group_size=group, symmetric=True)


def test_golden_bytes_q4_k() -> None:
    # d = 2**-6 (float16 0x2400), dmin = 8 d = 2**-3 (0x3000); sc = m = k; 6-bit scales packed as ggml-common.h draws them
    k = [63, 1, 2, 3, 60, 61, 62, 17]
    rows = encode_kquant(_super_block(k, 2.0**-6, 4, 32), KQUANTS["q4_k"])
    scale_bytes = bytes([63 | 3 << 6, 1 | 3 << 6, 2 | 3 << 6, 3 | 1 << 6] * 2 + [0xCC, 0xDD, 0xEE, 0x11])
    qs = bytes((l % 16) | (l % 16) << 4 for l in range(32)) * 4  # group 2p in the low nibbles, 2p + 1 in the high
    assert bytes(rows[0].tolist()) == b"\x00\x24\x00\x30" + scale_bytes + qs


def test_golden_bytes_q6_k() -> None:
    k = [127, *range(1, 16)]
    rows = bytes(encode_kquant(_super_block(k, 2.0**-6, 6, 16), KQUANTS["q6_k"])[0].tolist())
    assert len(rows) == 210 and rows[208:] == b"\x00\x24" and list(rows[192:208]) == k
    q = [e % 64 for e in range(256)]
    assert rows[0] == (q[0] & 0xF) | (q[64] & 0xF) << 4 and rows[32] == (q[32] & 0xF) | (q[96] & 0xF) << 4
    assert rows[128 + 5] == q[5] >> 4 | (q[37] >> 4) << 2 | (q[69] >> 4) << 4 | (q[101] >> 4) << 6


@pytest.mark.parametrize("name", sorted(KQUANTS))
def test_gguf_py_dequantizes_our_k_quants_to_llmquants_own_weights(name: str) -> None:
    kind = KQUANTS[name]
    W = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * torch.rand(16, 512, generator=torch.Generator().manual_seed(1))
    result = minmax_quantize(W, kind.bits, kind.group, True, kind.grid)
    rows = encode_kquant(result, kind)
    theirs = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType(kind.ggml_type))
    assert np.array_equal(theirs, result.dequantize().numpy())
    assert np.array_equal(decode_kquant(rows, kind, 512).dequantize().numpy(), theirs)


def test_k_quants_refuse_scales_off_their_grid() -> None:
    off_grid = minmax_quantize(torch.randn(4, 256), 4, 32, True)  # free float16 scales
    with pytest.raises(ValueError, match="--gguf-type q4_k"):
        encode_kquant(off_grid, KQUANTS["q4_k"])
    with pytest.raises(ShapeError, match="multiple of 256"):
        encode_kquant(minmax_quantize(torch.randn(4, 128), 4, 32, True, (128, 63)), KQUANTS["q4_k"])


def test_k_quant_grid_holds_subnormal_float16_steps() -> None:
    """Tiny scales put d among float16's subnormals, where rounding can raise d by ~1%: the largest
    multiplier must still be the top level, so the blocks encode (found on Qwen2.5's output head)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 512, generator=generator) * torch.logspace(-5, -2, 64).unsqueeze(1)
    for kind in ("q4_k", "q6_k"):
        spec = KQUANTS[kind]
        result = minmax_quantize(weight, spec.bits, spec.group, True, spec.grid)
        encode_kquant(result, spec)  # raises when a scale is off the grid
