"""groupwise-int4: lower reconstruction error than round-to-nearest at the same group size."""

from __future__ import annotations

import pytest
import torch

from llmquant.errors import ConfigError
from llmquant.uniform import minmax_quantize
from llmquant_plugins.groupwise_int4 import GroupwiseConfig, groupwise_search


def _weights(kind: str, shape: tuple[int, int] = (384, 768)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "gaussian":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "heavy-tailed":  # Student-t like: most weights small, a few large
        return torch.randn(shape, generator=g) * 0.02 / torch.rand(shape, generator=g).clamp(min=0.05).sqrt()
    W = torch.randn(shape, generator=g) * 0.02  # outlier input channels, as in LLM projections
    W[:, torch.randperm(shape[1], generator=g)[:8]] *= 10
    return W


def _error(W: torch.Tensor, deq: torch.Tensor) -> float:
    return (deq - W).pow(2).sum().item()


@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed", "outlier-channels"])
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, True), (128, False), (64, False), (None, True)],
                         ids=["g32-sym", "g64-sym", "g128-asym", "g64-asym", "channel-sym"])
def test_beats_round_to_nearest(kind: str, group_size: int | None, symmetric: bool) -> None:
    W = _weights(kind)
    rtn = _error(W, minmax_quantize(W, 4, group_size, symmetric).dequantize())
    ours = groupwise_search(W, GroupwiseConfig(group_size=group_size, symmetric=symmetric))
    err = _error(W, ours.dequantize())
    assert err < 0.97 * rtn, f"{kind}: groupwise {err:.4g} vs RTN {rtn:.4g}"


def test_no_group_gets_worse_than_round_to_nearest() -> None:
    """The search starts from RTN's scale and keeps a candidate only where it lowers the error."""
    W = _weights("heavy-tailed")
    rtn = (minmax_quantize(W, 4, 64, False).dequantize() - W).pow(2).reshape(-1, 64).sum(1)
    ours = (groupwise_search(W, GroupwiseConfig(group_size=64, symmetric=False)).dequantize() - W).pow(2).reshape(-1, 64).sum(1)
    assert torch.all(ours <= rtn * (1 + 1e-6))


def test_each_stage_helps_and_scales_are_float16() -> None:
    W = _weights("outlier-channels")
    errors = {
        (grid, steps): _error(W, groupwise_search(W, GroupwiseConfig(group_size=64, grid=grid, refine_steps=steps)).dequantize())
        for grid, steps in ((0, 0), (20, 0), (0, 4), (20, 4))
    }
    assert errors[(0, 0)] == _error(W, minmax_quantize(W, 4, 64, True).dequantize())
    assert errors[(20, 0)] < errors[(0, 0)] and errors[(0, 4)] < errors[(0, 0)]
    assert errors[(20, 4)] <= min(errors[(20, 0)], errors[(0, 4)])
    scales = groupwise_search(W, GroupwiseConfig(group_size=64)).scales
    assert torch.equal(scales, scales.half().float())


def test_asymmetric_zeros_stay_storable_in_gptq_v1() -> None:
    W = _weights("gaussian").abs() + 0.01  # all-positive groups push zeros down
    result = groupwise_search(W, GroupwiseConfig(group_size=64, symmetric=False))
    assert int(result.zeros.min()) >= 1 and int(result.zeros.max()) <= 15


@pytest.mark.parametrize("kwargs,field", [({"grid": -1}, "grid"), ({"max_shrink": 1.0}, "max_shrink"),
                                          ({"refine_steps": 1.5}, "refine_steps"), ({"bits": 5}, "bits")],
                         ids=["grid", "max_shrink", "refine_steps", "bits"])
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GroupwiseConfig(**kwargs)  # type: ignore[arg-type]
