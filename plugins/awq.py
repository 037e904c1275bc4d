"""Activation-aware weight scaling (AWQ, arXiv:2306.00978, Section 3.2).

Per scale point (norm -> q/k/v, norm -> gate/up, v -> o where shapes allow, up -> down), the
readers' input channels are scaled up by ``s`` and the producer's output down by ``s``, which
leaves the float model unchanged; channels that see large activations get finer steps in the
quantized weight. ``s = x^a / w^(1 - a)`` (``x``: mean ``|activation|`` per channel, ``w``: mean
normalized ``|weight|``; the weight term is llm-compressor's ``duo_scaling``, off gives the
paper's ``x^a``), with ``a`` searched on a grid for the smallest output error of the point's
scope (attention, MLP, or the reading Linear) when the readers are quantized as the run's
algorithm quantizes them without calibration. ``s = 1`` is always a candidate, so a point is
never made worse on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.errors import ConfigError
from llmquant.transform import BlockContext, ModelContext, ModelEdit, ScalePoint, Transform

__all__ = ["AWQ", "AWQConfig", "candidate_scales"]


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """Settings of ``--transform awq``.

    Attributes:
        awq_grid: exponents ``a`` tried, ``0, 1/grid, ..., (grid - 1)/grid``.
        awq_duo_scaling: divide by the weight term ``w^(1 - a)`` as well.
        awq_tokens: calibration tokens (the first windows) the statistics and the search use.
    """

    awq_grid: int = 20
    awq_duo_scaling: bool = True
    awq_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.awq_grid < 1:
            raise ConfigError("awq_grid", self.awq_grid, "a positive int (20 in the paper)")
        if self.awq_tokens < 1:
            raise ConfigError("awq_tokens", self.awq_tokens, "a positive number of tokens, e.g. 2048")


def candidate_scales(x_mean: Tensor, w_mean: Tensor, grid: int, duo: bool) -> list[Tensor]:
    """The scales searched: ones, then ``x^a / w^(1-a)`` for each ``a`` on the grid, each
    normalized by ``sqrt(max * min)`` so that scales center on one."""
    candidates = [torch.ones_like(x_mean)]
    for step in range(grid):
        a = step / grid
        s = x_mean.pow(a) / w_mean.pow(1 - a) if duo else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        candidates.append(s / (s.max() * s.min()).sqrt())
    return candidates


def weight_mean(W: Tensor) -> Tensor:
    """Mean over output rows of ``|W|`` normalized by each row's largest ``|W|``: ``(in,)``."""
    magnitude = W.abs()
    return (magnitude / magnitude.amax(dim=1, keepdim=True).clamp(min=1e-12)).mean(0).clamp(min=1e-4)


class AWQ:
    """Search per-channel scales per scale point on calibration data, then apply them."""

    name: ClassVar[str] = "awq"
    description: ClassVar[str] = "activation-aware per-channel scaling searched on calibration data (AWQ)"
    config_type: ClassVar[type[AWQConfig]] = AWQConfig
    needs_calibration: ClassVar[bool] = True

    def prepare(self, model: ModelContext, config: AWQConfig) -> ModelEdit:
        return ModelEdit()

    def transform_block(self, block: BlockContext, config: AWQConfig) -> None:
        block.search_tokens = config.awq_tokens
        for point in block.scale_points:
            point.apply(block.weights, self.search(block, point, config))

    def search(self, block: BlockContext, point: ScalePoint, config: AWQConfig) -> Tensor:
        """Return the candidate scale with the smallest output error of the point's scope."""
        assert block.input_mean is not None and block.error is not None and block.fake_quantize is not None
        fake_quantize, error = block.fake_quantize, block.error
        readers = {r: block.weights[f"{r}.weight"] for r in point.readers}
        w_mean = weight_mean(torch.cat(list(readers.values())))
        best, best_error = None, float("inf")
        for s in candidate_scales(block.input_mean(point).to(w_mean.device), w_mean, config.awq_grid, config.awq_duo_scaling):
            trial = {f"{r}.weight": fake_quantize(r, W * s[None, :]) / s[None, :] for r, W in readers.items()}
            loss = error(point, trial)
            if loss < best_error:
                best, best_error = s, loss
        assert best is not None
        return best


@hookimpl
def llmquant_register_transforms(register: Callable[[type[Transform]], None]) -> None:
    register(AWQ)
