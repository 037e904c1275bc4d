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


def _error(W: torch.Tensor, deq: torch.Tensor, weight_power: float = 0.0) -> float:
    """Squared reconstruction error, each weight's term scaled by ``|w| ** weight_power``."""
    return ((deq - W).pow(2) * W.abs().pow(weight_power)).sum().item()


@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed", "outlier-channels"])
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, True), (128, False), (64, False), (None, True)],
                         ids=["g32-sym", "g64-sym", "g128-asym", "g64-asym", "channel-sym"])
def test_beats_round_to_nearest(kind: str, group_size: int | None, symmetric: bool) -> None:
    """The default objective weights each weight's squared error by ``w**2``: it must fall well below
    RTN's, and the plain squared error must fall too."""
    W = _weights(kind)
    rtn = minmax_quantize(W, 4, group_size, symmetric).dequantize()
    ours = groupwise_search(W, GroupwiseConfig(group_size=group_size, symmetric=symmetric)).dequantize()
    assert _error(W, ours, 2) < 0.98 * _error(W, rtn, 2), f"{kind}: weighted {_error(W, ours, 2):.4g} vs RTN {_error(W, rtn, 2):.4g}"
    assert _error(W, ours) < _error(W, rtn), f"{kind}: squared {_error(W, ours):.4g} vs RTN {_error(W, rtn):.4g}"
    mse_only = groupwise_search(W, GroupwiseConfig(group_size=group_size, symmetric=symmetric, weight_power=0)).dequantize()
    assert _error(W, mse_only) < 0.97 * _error(W, rtn)


def test_no_group_gets_worse_than_round_to_nearest() -> None:
    """The search starts from RTN's scale and keeps a candidate only where it lowers the error."""
    W = _weights("heavy-tailed")
    importance = W.abs().pow(2)
    rtn = ((minmax_quantize(W, 4, 64, False).dequantize() - W).pow(2) * importance).reshape(-1, 64).sum(1)
    ours = ((groupwise_search(W, GroupwiseConfig(group_size=64, symmetric=False)).dequantize() - W).pow(2) * importance)
    assert torch.all(ours.reshape(-1, 64).sum(1) <= rtn * (1 + 1e-5))


def test_each_stage_helps_and_scales_are_float16() -> None:
    W = _weights("outlier-channels")
    errors = {
        (grid, steps): _error(W, groupwise_search(W, GroupwiseConfig(group_size=64, grid=grid, refine_steps=steps,
                                                                     weight_power=0)).dequantize())
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
                                          ({"refine_steps": 1.5}, "refine_steps"), ({"bits": 7}, "bits"),
                                          ({"norm": 0.5}, "norm"), ({"weight_power": -1}, "weight_power")],
                         ids=["grid", "max_shrink", "refine_steps", "bits", "norm", "weight_power"])
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GroupwiseConfig(**kwargs)  # type: ignore[arg-type]
