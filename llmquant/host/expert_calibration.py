"""Calibrating a block's routed experts: one Hessian per expert projection, in chunks of experts.

The host stops every calibration batch at the experts module's input (hidden states and routing)
and calibrates all experts from those inputs, for either policy:

- ``routed``: each expert's Hessians come from the tokens the router sends to it. An expert that
  receives fewer than ``min_tokens`` (a share of all calibration tokens) is quantized without
  calibration (the algorithm's calibration-free result, e.g. GPTQ's round-to-nearest), and is
  recorded as such.
- ``all``: every token goes through every expert for the Hessians (the gate/up Hessian is then the
  same for all experts and computed once); the block's output still keeps only the routed
  contributions, since the block's own forward runs afterwards with the quantized experts.

Gate and up are quantized first; the down projection's Hessian is then taken on
``act(gate_q(x)) * up_q(x)``, the quantized experts' own intermediate (true-sequential inside an
expert). Experts are processed in chunks whose Hessians fit ``memory`` bytes, so a block of 256
experts never holds 256 Hessians at once::

    chunk Hessians = c * 4 * (I**2 + [routed] H**2)  +  [all] 4 * H**2     (float32)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats
from llmquant.host.hessian import HessianAccumulator
from llmquant.host.moe import ExpertLinears

__all__ = ["ExpertPolicy", "calibrate_experts", "chunk_size", "is_calibrated", "note_fallback", "routed_rows"]

log = logging.getLogger(__name__)

POLICIES = ("routed", "all")

# quantize(name, stats or None) -> the dequantized weight to continue with
Quantize = Callable[[str, "CalibrationStats | None"], Tensor]


@dataclass(frozen=True)
class ExpertPolicy:
    """How routed experts are calibrated.

    Attributes:
        mode: "routed" or "all" (see the module docstring).
        min_tokens: with "routed", the share of calibration tokens an expert must receive to be
            calibrated; below it the expert falls back to a calibration-free result.
        memory: bytes for one chunk of experts' Hessians.
    """

    mode: str = "routed"
    min_tokens: float = 0.005
    memory: int = 1 << 30


def chunk_size(hidden: int, intermediate: int, policy: ExpertPolicy) -> int:
    """Return how many experts' Hessians fit `policy.memory` at once (at least one)."""
    per_expert = 4 * (intermediate**2 + (hidden**2 if policy.mode == "routed" else 0))
    return max(1, policy.memory // per_expert)


def routed_rows(inputs: list[tuple[Tensor, Tensor]], experts: int) -> list[list[Tensor]]:
    """Per calibration batch and expert, the rows (tokens) the router sends to the expert."""
    return [[(idx == e).any(-1).nonzero()[:, 0] for e in range(experts)] for _, idx in inputs]


def is_calibrated(policy: ExpertPolicy, count: int, total: int) -> bool:
    """Whether an expert that received `count` of `total` calibration tokens is calibrated (else it falls back)."""
    return policy.mode == "all" or (count > 0 and count >= policy.min_tokens * total)


def note_fallback(path: str, e: int, roles: tuple[str, ...], count: int, total: int, policy: ExpertPolicy, targets: set[str],
                  fallbacks: dict[str, int]) -> None:
    """Log an expert quantized without calibration and add its projections in `targets` to `fallbacks`."""
    log.info("%s.%d: %d of %d calibration tokens routed to it (under %.2f%%): quantized without calibration",
             path, e, count, total, 100 * policy.min_tokens)
    fallbacks.update({f"{path}.{e}.{p}": count for p in roles if f"{path}.{e}.{p}" in targets})


@torch.no_grad()
def calibrate_experts(experts: ExpertLinears, path: str, inputs: list[tuple[Tensor, Tensor]], quantize: Quantize,
                      targets: set[str], policy: ExpertPolicy) -> dict[str, int]:
    """Quantize every expert projection of `experts` (skeleton path `path`) named in `targets`.

    Args:
        inputs: per calibration batch, the experts module's ``hidden (T, H)`` and ``top_k_index (T, k)``.
        quantize: called once per projection, in true-sequential order within each expert, with its
            input statistics (None for a fallback); returns the dequantized weight, which replaces
            the projection's weight for the rest of the calibration.

    Returns:
        The projections that fell back to a calibration-free result, with the tokens their expert saw.
    """
    device = inputs[0][0].device
    total = sum(h.shape[0] for h, _ in inputs)
    rows = routed_rows(inputs, len(experts))
    counts = [sum(int(r[e].numel()) for r in rows) for e in range(len(experts))]
    hidden = getattr(experts[0], experts.gate).in_features
    inter = getattr(experts[0], experts.down).in_features
    shared = None
    if policy.mode == "all":
        shared = HessianAccumulator(hidden, device)
        for h, _ in inputs:
            shared.add(h)
        shared_stats = shared.stats()
    fallbacks: dict[str, int] = {}
    step = chunk_size(hidden, inter, policy)
    for start in range(0, len(experts), step):
        chunk = range(start, min(len(experts), start + step))
        calibrated = {e: is_calibrated(policy, counts[e], total) for e in chunk}
        gate_up: dict[int, CalibrationStats | None] = {}
        for e in chunk:
            if policy.mode == "all":
                gate_up[e] = shared_stats
            elif calibrated[e]:
                acc = HessianAccumulator(hidden, device)
                for (h, _), r in zip(inputs, rows):
                    acc.add(h[r[e]])
                gate_up[e] = acc.stats()
            else:
                gate_up[e] = None
        for e in chunk:
            _quantize(experts, path, e, (experts.gate, experts.up), gate_up.pop(e), quantize, targets)
        for e in chunk:
            stats = None
            if calibrated[e]:
                acc = HessianAccumulator(inter, device)
                for (h, _), r in zip(inputs, rows):
                    x = h if policy.mode == "all" else h[r[e]]
                    acc.add(experts.intermediate(e, x))
                stats = acc.stats()
            _quantize(experts, path, e, (experts.down,), stats, quantize, targets)
        for e in chunk:
            if not calibrated[e]:
                note_fallback(path, e, (experts.gate, experts.up, experts.down), counts[e], total, policy, targets, fallbacks)
    return fallbacks


def _quantize(experts: ExpertLinears, path: str, e: int, projections: tuple[str, ...], stats: CalibrationStats | None,
              quantize: Quantize, targets: set[str]) -> None:
    for projection in projections:
        name = f"{path}.{e}.{projection}"
        if name in targets:
            linear = getattr(experts[e], projection)
            linear.weight.data = quantize(name, stats).to(linear.weight.device, linear.weight.dtype)
