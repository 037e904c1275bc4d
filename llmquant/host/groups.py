"""What gathers one sequential group's inputs over the calibration batches and then quantizes it:
the Linears reading one tensor share a Hessian; a block's routed experts are calibrated together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from llmquant.algorithm import CalibrationStats
from llmquant.host.expert_calibration import ExpertPolicy, calibrate_experts
from llmquant.host.hessian import HessianAccumulator
from llmquant.host.moe import ExpertLinears

__all__ = ["ExpertsGroup", "Group", "LinearGroup", "QuantizeModule"]

# quantize(name, stats) -> the dequantized weight to run the rest of the calibration with (stats None: a fallback)
QuantizeModule = Callable[[str, "CalibrationStats | None"], Tensor]


class Group:
    """Gathers one sequential group's inputs from every batch, then quantizes the group."""

    def add(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class LinearGroup(Group):
    """Linears reading the same input: one Hessian, shared by all of them."""

    def __init__(self, hessian: HessianAccumulator | None, linears: list[tuple[str, nn.Module]], quantize: QuantizeModule,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.hessian, self.linears, self.quantize, self.device, self.dtype = hessian, linears, quantize, device, dtype

    def add(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.hessian is not None:
            self.hessian.add(args[0] if args else kwargs["input"])

    def add_float(self, x: Tensor, x_float: Tensor) -> None:
        """The same tokens' input in the float model, for ``dXXT``."""
        if self.hessian is not None and self.hessian.float_inputs:
            self.hessian.add_float(x, x_float)

    def finish(self) -> None:
        stats = self.hessian.stats() if self.hessian is not None else None
        for name, linear in self.linears:
            linear.weight.data = self.quantize(name, stats).to(self.device, self.dtype)


class ExpertsGroup(Group):
    """A block's routed experts: their inputs (hidden states and routing) kept, then `calibrate_experts`."""

    def __init__(self, path: str, experts: ExpertLinears, quantize: QuantizeModule, targets: set[str], policy: ExpertPolicy,
                 fallbacks: dict[str, int]) -> None:
        self.path, self.experts, self.quantize, self.targets = path, experts, quantize, targets
        self.policy, self.fallbacks = policy, fallbacks  # fallbacks: filled with the experts quantized without calibration
        self.inputs: list[tuple[Tensor, Tensor]] = []

    def add(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        values = list(args) + [kwargs[k] for k in kwargs]
        self.inputs.append((values[0].detach(), values[1].detach()))

    def finish(self) -> None:
        self.fallbacks.update(calibrate_experts(self.experts, self.path, self.inputs, self.quantize, self.targets, self.policy))
        self.inputs.clear()
