"""NF4/FP4: the same codes and scales as bitsandbytes' own quantizer, bit for bit."""

from __future__ import annotations

import pytest
import torch

from llmquant.errors import ConfigError, ShapeError
from llmquant_plugins.nf4 import FP4_CODEBOOK, NF4_CODEBOOK, NF4Config, dynamic_map, nf4_quantize

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="needs `pip install -e .[dev]` (bitsandbytes)")


def _weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.02
    W[3, :17] = 0.5  # an outlier block
    W[5, :64] = 0.0  # an all-zero block
    return W


def test_codebooks_and_dynamic_map_equal_bitsandbytes() -> None:
    assert torch.equal(NF4_CODEBOOK, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODEBOOK, bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
def test_code_lookup_equals_counting_midpoints_at_every_edge(codebook: str) -> None:
    """The lookup table's codes equal bitsandbytes' rule (the count of midpoints below a value; ties
    to the lower code) on the values where a table could slip: each midpoint, each bin edge, and the
    floats next to them. Each 64-block leads with 1.0, so the scaled values are the probes themselves."""
    code = NF4_CODEBOOK if codebook == "nf4" else FP4_CODEBOOK
    ordered, order = code.sort()
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    edges = torch.arange(1025) / 512 - 1  # every table's edges: 1024 bins or fewer, powers of two
    exact = torch.cat([midpoints, edges, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    probes = torch.cat([exact, torch.nextafter(exact, torch.tensor(2.0)), torch.nextafter(exact, torch.tensor(-2.0)),
                        torch.linspace(-1, 1, 20001)]).clamp(-1, 1)
    probes = torch.nn.functional.pad(probes, (0, -probes.numel() % 63)).view(-1, 63)
    W = torch.cat([torch.ones(probes.shape[0], 1), probes], dim=1)
    expected = order[(W.reshape(-1, 1) > midpoints).sum(1)].to(torch.uint8)
    assert torch.equal(nf4_quantize(W, 64, codebook).codes.flatten(), expected)


@pytest.mark.parametrize("shape,blocksize,codebook", [
    ((256, 384), 64, "nf4"), ((576, 1536), 64, "nf4"), ((1000, 600), 32, "fp4"), ((512, 640), 128, "fp4"),
    ((512, 256), 4096, "nf4"), ((64, 96), 32, "nf4"),
], ids=["nf4-64", "smollm-mlp", "fp4-32", "fp4-128", "nf4-4096", "odd-rows"])
def test_codes_and_absmax_equal_bitsandbytes(shape: tuple[int, int], blocksize: int, codebook: str) -> None:
    W = _weight(shape)
    packed, state = bnb_functional.quantize_4bit(W, blocksize=blocksize, quant_type=codebook)
    ours = nf4_quantize(W, blocksize, codebook)
    codes = ours.codes.flatten()
    assert torch.equal(((codes[0::2] << 4) | codes[1::2]).unsqueeze(1), packed)
    assert torch.equal(ours.absmax, state.absmax)
    # what bitsandbytes' kernels compute from those codes: codebook value times its block's absmax
    their_codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()
    blocks = torch.nn.functional.pad(state.code[their_codes], (0, -their_codes.numel() % blocksize)).view(-1, blocksize)
    assert torch.equal(ours.dequantize(), (blocks * state.absmax.view(-1, 1)).flatten()[:W.numel()].view(shape))
    # bitsandbytes 0.50's own CPU dequantize_4bit agrees, except on a CPU without AVX-512 at blocks of 2048 and more,
    # where its fallback path misplaces absmax (its own codes and absmax dequantize to other numbers there)
    if blocksize < 2048 or torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_weights_give_bitsandbytes_codes(dtype: torch.dtype) -> None:
    W = _weight((256, 512)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
    ours = nf4_quantize(W, 64)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(dtype), bnb_functional.dequantize_4bit(packed, state))


def test_double_quant_matches_bitsandbytes() -> None:
    """4-bit codes, the offset and the nested scales are bitsandbytes' exactly. The 8-bit codes of
    the block scales are the exact nearest entries of the dynamic map; bitsandbytes' CPU kernel
    (a bucketed search) picks the lower neighbour for a few values just above a midpoint, so they
    agree on all but a handful of blocks and never by more than one step."""
    W = _weight((1024, 1536))
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4_quantize(W, 64, double_quant=True)
    nested = ours.nested
    assert nested is not None
    codes = ours.codes.flatten()
    assert torch.equal(((codes[0::2] << 4) | codes[1::2]).unsqueeze(1), packed)
    assert nested.offset == state.offset.item()
    assert torch.equal(nested.scales, state.state2.absmax)
    differ = nested.codes != state.absmax
    assert differ.float().mean() < 0.005
    assert (nested.codes.int() - state.absmax.int()).abs().max() <= 1
    scale = state.state2.absmax.repeat_interleave(256)[: differ.numel()]
    normed = (W.reshape(-1, 64).abs().amax(1) - state.offset) / scale
    code_map = nested.code_map  # where the two differ, ours is the nearer entry
    assert torch.all((code_map[nested.codes.long()] - normed).abs() <= (code_map[state.absmax.long()] - normed).abs())


@pytest.mark.parametrize("kwargs,field", [
    ({"blocksize": 48}, "blocksize"), ({"blocksize": 8192}, "blocksize"), ({"codebook": "nf3"}, "codebook"),
    ({"double_quant": "yes"}, "double_quant"),
], ids=["blocksize-48", "blocksize-8192", "codebook", "double-quant"])
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        NF4Config(**kwargs)  # type: ignore[arg-type]


def test_weight_not_divisible_by_blocksize_is_a_shape_error() -> None:
    with pytest.raises(ShapeError, match="not a multiple of blocksize 64"):
        nf4_quantize(torch.randn(3, 7), 64)
