"""A block's routed experts calibrated over workers that each hold some calibration batches.

The same steps as `calibrate_experts`, cut where data must cross workers: each worker holds its
batches' inputs to the experts module (hidden states and routing) and returns, per expert, each
batch's ``x^T x`` of the tokens routed to it; the driver adds them in batch order, so every
expert's Hessian has the bits of the local run; the workers solve the experts' projections
between them (`by_cost`), gate and up first, then down on ``act(gate_q(x)) * up_q(x)``, chunk by
chunk of experts, and every worker takes the dequantized weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats
from llmquant.host.expert_calibration import ExpertPolicy, chunk_size, is_calibrated, note_fallback
from llmquant.host.groups import ExpertsGroup
from llmquant.host.hessian import BatchPartials, HessianAccumulator, reduce_partials

__all__ = ["ExpertsFound", "calibrate_experts_over", "expert_partials", "experts_found"]


SHARED = -1  # the key of the Hessian every expert shares under the "all" policy


@dataclass(frozen=True)
class ExpertsFound:
    """What one worker's batches say of a block's experts: the routed token count of each, and their shapes."""

    path: str
    roles: tuple[str, str, str]  # gate, up, down
    counts: list[int]
    tokens: int
    hidden: int
    intermediate: int


def experts_found(group: ExpertsGroup, rows: list[list[Tensor]]) -> ExpertsFound:
    """What `rows` (`routed_rows` of the group's inputs) say of the group's experts."""
    experts = group.experts
    return ExpertsFound(group.path, (experts.gate, experts.up, experts.down),
                        [sum(int(r[e].numel()) for r in rows) for e in range(len(experts))],
                        sum(int(h.shape[0]) for h, _ in group.inputs),
                        getattr(experts[0], experts.gate).in_features, getattr(experts[0], experts.down).in_features)


@torch.no_grad()
def expert_partials(group: ExpertsGroup, rows: list[list[Tensor]], first_batch: int, experts: list[int], stage: str,
                    mode: str) -> dict[int, list[BatchPartials]]:
    """Each batch's ``x^T x`` (numbered from `first_batch`) for the inputs of the experts' gate/up (`stage` "gate_up";
    `SHARED` for all tokens), or of their down projections ("down"); `rows`: the group's `routed_rows`."""
    found: dict[int, list[BatchPartials]] = {}
    for e in experts:
        acc: HessianAccumulator | None = None
        for (h, _), r in zip(group.inputs, rows):
            x = h if e == SHARED or mode == "all" else h[r[e]]
            if stage == "down":
                x = group.experts.intermediate(e, x)
            acc = acc or HessianAccumulator(x.shape[-1], x.device, keep_partials=True)
            acc.add(x)
        assert acc is not None
        found[e] = [dataclasses.replace(p, batch=first_batch + p.batch) for p in acc.partials]
    return found


Solve = Callable[[list[tuple[str, "CalibrationStats | None"]]], None]


def calibrate_experts_over(workers: list[Any], get: Any, found: list[ExpertsFound], targets: set[str], solve: Solve,
                           policy: ExpertPolicy, fallbacks: dict[str, int]) -> None:
    """Drive `calibrate_experts`' steps over the workers; `solve(items)` quantizes `(name, stats)` items on them and
    sends the weights to every worker."""
    first = found[0]
    gate, up, down = first.roles
    count = len(first.counts)
    counts = [sum(f.counts[e] for f in found) for e in range(count)]
    total = sum(f.tokens for f in found)

    def reduced(experts: list[int], stage: str, width: int) -> dict[int, CalibrationStats]:
        replies = get([w.expert_partials(experts, stage, policy.mode) for w in workers])
        return {e: reduce_partials(width, [p for reply in replies for p in reply[e]]).stats() for e in experts}

    shared = reduced([SHARED], "gate_up", first.hidden)[SHARED] if policy.mode == "all" else None
    step = chunk_size(first.hidden, first.intermediate, policy)
    for start in range(0, count, step):
        chunk = range(start, min(count, start + step))
        calibrated = {e: is_calibrated(policy, counts[e], total) for e in chunk}
        measured = [e for e in chunk if calibrated[e]]
        gate_up: dict[int, CalibrationStats | None] = dict.fromkeys(chunk)
        if shared is not None:
            gate_up.update(dict.fromkeys(chunk, shared))
        elif measured:
            gate_up.update(reduced(measured, "gate_up", first.hidden))
        solve([(f"{first.path}.{e}.{p}", gate_up[e]) for e in chunk for p in (gate, up) if f"{first.path}.{e}.{p}" in targets])
        down_stats: dict[int, CalibrationStats | None] = dict.fromkeys(chunk)
        if measured:
            down_stats.update(reduced(measured, "down", first.intermediate))
        solve([(f"{first.path}.{e}.{down}", down_stats[e]) for e in chunk if f"{first.path}.{e}.{down}" in targets])
        for e in chunk:
            if not calibrated[e]:
                note_fallback(first.path, e, first.roles, counts[e], total, policy, targets, fallbacks)
