from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmquant.errors import ConfigError, ShapeError
from llmquant.uniform import (
    UniformConfig, best_clip, minmax_params, minmax_quantize, quantization_error, quantize_to_codes, to_stored_precision,
)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()))


@pytest.mark.parametrize("bits,floor_db", [(2, 3.0), (3, 12.0), (4, 19.0), (8, 43.0)], ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_sqnr_per_bit_width(bits: int, floor_db: float, symmetric: bool) -> None:
    torch.manual_seed(0)
    W = torch.randn(96, 256)
    assert sqnr_db(W, minmax_quantize(W, bits, 64, symmetric).dequantize()) > floor_db


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_error_is_at_most_half_a_step(symmetric: bool) -> None:
    torch.manual_seed(1)
    W = torch.randn(33, 128) * torch.rand(33, 1) * 3
    q = minmax_quantize(W, 4, 32, symmetric)
    step = q.scales[:, q.g_idx.long()]
    assert bool(((W - q.dequantize()).abs() <= step / 2 + 1e-6).all())


def test_symmetric_zero_is_the_middle_code_and_no_value_clips() -> None:
    W = torch.tensor([[-8.0, 7.0, 0.5, -0.25], [7.0, -1.0, 2.0, 3.0]])
    q = minmax_quantize(W, 4, None, True)
    assert q.zeros.tolist() == [[8], [8]]
    assert q.codes[0, 0].item() == 0 and q.codes[0, 1].item() == 15
    assert torch.allclose(q.dequantize()[:, :2], W[:, :2])


def test_asymmetric_zero_is_never_zero() -> None:
    # A group whose values are all positive would get zero 0, which GPTQ v1 cannot store.
    W = torch.tensor([[0.1, 0.5, 1.0, 1.5], [-3.0, -1.0, -2.0, -0.5]])
    q = minmax_quantize(W, 4, None, False)
    assert int(q.zeros.min()) >= 1
    step = q.scales[:, q.g_idx.long()]
    assert bool(((W - q.dequantize()).abs() <= step / 2 + 1e-6).all())


def test_scales_are_stored_in_float16_precision() -> None:
    q = minmax_quantize(torch.randn(8, 64), 4, 32, True)
    assert torch.equal(q.scales, q.scales.half().float())


def test_zero_weights_do_not_divide_by_zero() -> None:
    q = minmax_quantize(torch.zeros(4, 64), 4, 32, False)
    assert torch.equal(q.dequantize(), torch.zeros(4, 64))
    scale, zero = minmax_params(torch.zeros(3), torch.zeros(3), 4, True)
    assert bool((scale > 0).all())


def test_group_size_must_divide_in_features() -> None:
    with pytest.raises(ShapeError, match=r"in_features 100 is not a multiple of group_size 64"):
        minmax_quantize(torch.randn(4, 100), 4, 64, True)


@pytest.mark.parametrize("kwargs,field", [({"bits": 7}, "bits"), ({"group_size": 0}, "group_size"), ({"group_size": -1}, "group_size"),
                                            ({"group_size": 48, "scale_grid": (256, 63)}, "group_size")],
                         ids=["bits7", "group0", "group-1", "group-off-grid"])
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        UniformConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), groups=st.integers(1, 4), size=st.sampled_from([1, 3, 16, 32]),
       symmetric=st.booleans(), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_round_trip_is_within_half_a_step(bits: int, rows: int, groups: int, size: int, symmetric: bool, scale: float, seed: int) -> None:
    """Property: every weight comes back within half a quantization step of itself, plus the
    float16 rounding of the stored scale (at most 2**-11 of a step per code from the zero), for
    any shape the group size divides, any bit width, either zero-point scheme, across magnitudes."""
    W = torch.randn(rows, groups * size, generator=torch.Generator().manual_seed(seed)) * scale
    q = minmax_quantize(W, bits, size, symmetric)
    step = q.scales[:, q.g_idx.long()]
    bound = step / 2 + 2**bits * step * 2**-11
    assert bool(((W - q.dequantize()).abs() <= bound * (1 + 1e-5) + 1e-12).all())
    assert int(q.codes.max()) < 2**bits and int(q.zeros.min()) >= 1


@pytest.mark.parametrize("norm", [2.0, 3.0])
def test_quantization_error_weighs_each_column(norm: float) -> None:
    torch.manual_seed(2)
    W, weight = torch.randn(5, 32), torch.rand(32)
    scale, zero = minmax_params(W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True), 3, False)
    deq = (quantize_to_codes(W, scale, zero, 3).float() - zero) * scale
    expected = ((deq - W).abs() ** norm * weight).sum(dim=1)
    assert torch.allclose(quantization_error(W, scale, zero, 3, weight, norm), expected)


@pytest.mark.parametrize("max_elements", [1, 1000, 1 << 22])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_best_clip_is_the_lowest_error_candidate_in_any_batching(symmetric: bool, max_elements: int) -> None:
    """Same answer as trying every ratio one by one, batches of any size; ties go to the earlier ratio."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 64, generator=g) * torch.rand(40, 1, generator=g)
    W[::5] = torch.distributions.StudentT(2.0).sample(W[::5].shape)
    W[7] = 0  # every ratio is exact: the first one wins
    weight = torch.rand(64, generator=g)
    ratios = torch.rand(9, 40, generator=g) * 0.8 + 0.2
    xmin, xmax = W.amin(dim=1), W.amax(dim=1)
    one_by_one = []
    for r in ratios:
        scale, zero = minmax_params(xmin * r, xmax * r, 4, symmetric)
        one_by_one.append(quantization_error(W, to_stored_precision(scale)[:, None], zero[:, None], 4, weight))
    errors = torch.stack(one_by_one)
    expected_error, at = errors.min(dim=0)
    error, ratio = best_clip(W, xmin, xmax, ratios, 4, symmetric, weight, max_elements=max_elements)
    assert torch.allclose(error, expected_error, rtol=1e-6, atol=0)
    assert torch.equal(ratio, ratios.gather(0, at[None]).squeeze(0))
    assert float(ratio[7]) == float(ratios[0, 7]) and float(error[7]) == 0


def test_grid_scales_share_one_float16_step_per_super_block() -> None:
    from llmquant.uniform import grid_scales

    scale = torch.rand(6, 16, generator=torch.Generator().manual_seed(0)) + 0.01
    scale[0, :8] = 0  # an all-zero super-block stays zero
    grid = grid_scales(scale, 8, 63).view(6, 2, 8)
    d = grid.amax(dim=2, keepdim=True) / 63
    assert torch.equal(d.half().float(), d) and torch.equal(grid / torch.where(d > 0, d, 1), (grid / torch.where(d > 0, d, 1)).round())
    assert torch.equal(grid[0, 0], torch.zeros(8)) and (grid.view(6, 16)[1:] > 0).all()
    assert ((grid.view(6, 16) - scale).abs() <= d.repeat_interleave(8, dim=1).view(6, 16) / 2 + 1e-7).all()  # nearest multiple
