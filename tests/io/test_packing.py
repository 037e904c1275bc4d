from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.errors import ShapeError
from llmquant.io.packing import pack_int32, packed_length, unpack_int32


def reference_pack_rows(intweight: torch.Tensor, bits: int) -> list[list[int]]:
    """The GPTQ reference's packing loop (IST-DASLab/gptq quant.py), element by element."""
    rows, cols = intweight.shape
    w = intweight.tolist()
    out = [[0] * cols for _ in range(rows * bits // 32)]
    for c in range(cols):
        i = row = 0
        while row < len(out):
            if bits in (2, 4, 8):
                for j in range(i, i + 32 // bits):
                    out[row][c] |= w[j][c] << (bits * (j - i))
                i += 32 // bits
                row += 1
            else:  # 3 bits: 10 + 1 + 10 + 1 + 10 over three words
                for j in range(i, i + 10):
                    out[row][c] |= w[j][c] << (3 * (j - i))
                i += 10
                out[row][c] |= (w[i][c] << 30) & 0xFFFFFFFF
                row += 1
                out[row][c] |= (w[i][c] >> 2) & 1
                i += 1
                for j in range(i, i + 10):
                    out[row][c] |= w[j][c] << (3 * (j - i) + 1)
                i += 10
                out[row][c] |= (w[i][c] << 31) & 0xFFFFFFFF
                row += 1
                out[row][c] |= (w[i][c] >> 1) & 0x3
                i += 1
                for j in range(i, i + 10):
                    out[row][c] |= w[j][c] << (3 * (j - i) + 2)
                i += 10
                row += 1
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"{b}bit")
def test_pack_matches_gptq_reference_loop(bits: int) -> None:
    torch.manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 3))
    packed = pack_int32(values, bits).long() & 0xFFFFFFFF
    assert packed.tolist() == reference_pack_rows(values, bits)


def test_golden_words() -> None:
    eights = torch.full((8, 1), 7)
    assert pack_int32(eights, 4).item() == 0x77777777
    ramp = torch.arange(8).view(8, 1)
    assert pack_int32(ramp, 4).item() & 0xFFFFFFFF == 0x76543210
    assert pack_int32(torch.tensor([[1], [2], [3], [255]]), 8).item() & 0xFFFFFFFF == 0xFF030201
    three = torch.arange(32).remainder(8).view(32, 1)
    assert [w & 0xFFFFFFFF for w in pack_int32(three, 3).flatten().tolist()] == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]
    assert pack_int32(torch.full((16, 1), 3), 2).item() == -1  # all ones, stored as signed int32


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), chunks=st.integers(1, 4), cols=st.integers(1, 7), dim=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits: int, chunks: int, cols: int, dim: int, seed: int) -> None:
    length = chunks * (32 if bits == 3 else 32 // bits)
    values = torch.randint(0, 2**bits, (length, cols), generator=torch.Generator().manual_seed(seed))
    if dim == 1:
        values = values.t().contiguous()
    packed = pack_int32(values, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == packed_length(length, bits)
    assert torch.equal(unpack_int32(packed, bits, dim=dim).long(), values)


def test_length_that_cannot_pack_is_named() -> None:
    with pytest.raises(ShapeError, match="multiple of 32"):
        pack_int32(torch.zeros(31, 2, dtype=torch.long), 3)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"{b}bit")
def test_byte_path_equals_word_path(bits: int, dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """2/4/8 bits pack bytes and read them as little-endian words; the int32 path (big-endian machines) agrees."""
    import llmquant.io.packing as packing

    values = torch.randint(0, 2**bits, (64, 96), generator=torch.Generator().manual_seed(bits))
    fast = pack_int32(values, bits, dim=dim)
    monkeypatch.setattr(packing.sys, "byteorder", "big")
    assert fast.is_contiguous() and torch.equal(fast, pack_int32(values, bits, dim=dim))
