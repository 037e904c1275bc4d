"""Round-to-nearest: each weight to the nearest code of its group's min-max grid.

No calibration data; the baseline every other algorithm must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import Algorithm, CalibrationStats, UniformQuantized
from llmquant.uniform import UniformConfig, minmax_quantize

__all__ = ["RTN", "RTNConfig"]


@dataclass(frozen=True, kw_only=True)
class RTNConfig(UniformConfig):
    """Round-to-nearest has no settings beyond the shared uniform ones."""


class RTN:
    """Round-to-nearest over per-group min-max ranges."""

    name: ClassVar[str] = "rtn"
    description: ClassVar[str] = "round-to-nearest, per-group min-max scales; no calibration"
    config_type: ClassVar[type[RTNConfig]] = RTNConfig
    result_type: ClassVar[type[UniformQuantized]] = UniformQuantized
    needs_calibration: ClassVar[bool] = False

    def quantize_weight(self, W: Tensor, config: RTNConfig, stats: CalibrationStats | None) -> UniformQuantized:
        """Quantize ``W: (out, in)``; raises ShapeError if the group size does not divide ``in``."""
        return minmax_quantize(W, config.bits, config.group_size, config.symmetric, config.scale_grid)


@hookimpl
def llmquant_register_algorithms(register: Callable[[type[Algorithm]], None]) -> None:
    register(RTN)
