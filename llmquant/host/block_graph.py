"""A decoder block's structure as transforms need it, found by running it, not from its names.

One forward pass with hooks on every module records which tensor each module read and wrote.
Linears reading the same tensor form a group; the module whose output *is* that tensor is its
producer. Every claim a transform relies on is then proven by perturbing the block and running
it again on the same batch:

* a scale point: dividing the producer (a norm's weight, with or without Gemma's ``+1``
  offset, or a Linear's output rows) by ``s`` divides the group's input by exactly ``s``;
* a residual writer: adding ``d`` to a Linear's output adds exactly ``d`` to the block's output.

Norms whose input is a Linear's output (Gemma-3's post-norms) are reported as such. The
result depends only on the block's structure and is computed once per structure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmquant.transform import ScalePoint

__all__ = ["BlockStructure", "find_structure"]

log = logging.getLogger(__name__)

RunBlock = Callable[[], Tensor]  # runs the block on one calibration batch, returns its output
_TOLERANCE = 1e-3  # relative error of a proven identity, float32


@dataclass(frozen=True)
class BlockStructure:
    """What `find_structure` proved about a block (names relative to the block)."""

    groups: tuple[tuple[str, ...], ...]
    scale_points: tuple[ScalePoint, ...]
    residual_readers: tuple[str, ...]
    residual_writers: tuple[str, ...]
    post_norms: tuple[str, ...]


def find_structure(block: nn.Module, run: RunBlock) -> BlockStructure:
    """Record one forward pass of `block` (float32 weights) and prove its scale points and writers."""
    leaves = {name: m for name, m in block.named_modules() if name and not list(m.children())}
    seen: list[tuple[str, Any, Any]] = []  # (leaf, input tensor, output tensor) in execution order
    handles = [m.register_forward_hook(lambda m, a, o, name=name: seen.append((name, a[0] if a else None, o)))
               for name, m in leaves.items()]
    try:
        with torch.no_grad():
            output = run()
    finally:
        for h in handles:
            h.remove()
    linears = {n for n, m in leaves.items() if isinstance(m, nn.Linear)}
    groups: list[list[str]] = []
    inputs: list[Tensor] = []
    for name, x, _ in seen:
        if name not in linears:
            continue
        found = next((i for i, t in enumerate(inputs) if t is x), None)
        if found is None:
            groups.append([name])
            inputs.append(x)
        elif name not in groups[found]:
            groups[found].append(name)
    producers = _producers(seen, inputs, linears)
    norms = {n for n, m in leaves.items() if _norm_like(m)}
    post_norms = tuple(n for n, x, _ in seen if n in norms and any(x is o for m, _, o in seen if m in linears))
    points = []
    for group, x, producer in zip(groups, inputs, producers):
        point = _prove_point(block, run, leaves, tuple(group), x.shape[-1], producer, seen)
        if point is not None:
            points.append(point)
    reader_norms = [p.producer for p in points if p.kind == "norm" and p.producer not in post_norms]
    readers = tuple(r for p in points if p.producer in reader_norms for r in p.readers)
    order = _in_order(seen, set(leaves))
    writers = []
    for name in _in_order(seen, linears):
        if getattr(leaves[name], "out_features", 0) != output.shape[-1]:
            continue
        later = [n for n in reader_norms if order.index(n) > order.index(name)]  # the residual's next reader
        if _adds_to_residual(run, leaves[name], leaves[later[0]] if later else None, output):
            writers.append(name)
    del seen, inputs
    return BlockStructure(tuple(tuple(g) for g in groups), tuple(points), readers, tuple(writers), post_norms)


def _norm_like(module: nn.Module) -> bool:
    """A leaf whose only parameters are a 1-D weight (and bias): RMSNorm, LayerNorm."""
    params = dict(module.named_parameters())
    return "weight" in params and params["weight"].dim() == 1 and set(params) <= {"weight", "bias"}


def _in_order(seen: list[tuple[str, Any, Any]], names: set[str]) -> list[str]:
    order: list[str] = []
    for name, _, _ in seen:
        if name in names and name not in order:
            order.append(name)
    return order


def _producers(seen: list[tuple[str, Any, Any]], inputs: list[Tensor], linears: set[str]) -> list[str | None]:
    """For each group input, the leaf whose output is that very tensor (None when it was computed
    outside any module, as attention's output and the gated product are)."""
    found: list[str | None] = []
    for x in inputs:
        found.append(next((name for name, _, out in seen if out is x), None))
    return found


def _scope(readers: tuple[str, ...]) -> str:
    """The deepest module path that holds every reader (``self_attn`` for q/k/v; ``mlp.down_proj`` alone)."""
    parts = [r.split(".") for r in readers]
    if len(parts) == 1:
        return readers[0]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _prove_point(block: nn.Module, run: RunBlock, leaves: dict[str, nn.Module], group: tuple[str, ...], channels: int,
                 producer: str | None, seen: list[tuple[str, Any, Any]]) -> ScalePoint | None:
    """The group's scale point, if one of the candidate producers passes the perturbation test."""
    scope = _scope(group)
    if producer is not None:
        module = leaves[producer]
        if not _norm_like(module) or dict(module.named_parameters())["weight"].shape[0] != channels:
            return None
        for offset in (0.0, 1.0):
            point = ScalePoint(producer, "norm", group, offset, scope)
            if _scales_input(block, run, leaves, point, channels):
                return point
        return None
    order = _in_order(seen, set(leaves))
    first = order.index(group[0])
    for name in reversed(order[:first]):  # the nearest earlier Linear first
        module = leaves[name]
        if isinstance(module, nn.Linear) and module.out_features == channels and name not in group:
            point = ScalePoint(name, "linear", group, 0.0, scope)
            if _scales_input(block, run, leaves, point, channels):
                return point
    return None


def _scales_input(block: nn.Module, run: RunBlock, leaves: dict[str, nn.Module], point: ScalePoint, channels: int) -> bool:
    """Whether applying `point` with a random ``s`` divides its readers' input by exactly ``s``."""
    generator = torch.Generator().manual_seed(0)
    s = torch.rand(channels, generator=generator) * 1.5 + 0.5
    reader = leaves[point.readers[0]]
    params = {n: p for n, p in block.named_parameters()}
    touched = [k for k in (f"{point.producer}.weight", f"{point.producer}.bias") if k in params]
    weights = {k: params[k].data.float() for k in touched}
    for r in point.readers:
        weights[f"{r}.weight"] = params[f"{r}.weight"].data.float()
    original = {k: params[k].data for k in weights}
    captured: list[Tensor] = []
    before = _capture_input(reader, run, captured)
    point.apply(weights, s.to(before.device))
    try:
        for k, v in weights.items():
            params[k].data = v.to(original[k].dtype)
        after = _capture_input(reader, run, captured)
    finally:
        for k, v in original.items():
            params[k].data = v
    expected = before.float() / s.to(before.device)
    return bool((after.float() - expected).norm() <= _TOLERANCE * expected.norm())


def _capture_input(module: nn.Module, run: RunBlock, store: list[Tensor]) -> Tensor:
    store.clear()

    def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
        store.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return store[0]


def _adds_to_residual(run: RunBlock, linear: nn.Module, reader: nn.Module | None, output: Tensor) -> bool:
    """Whether adding a vector to `linear`'s output adds exactly that vector to the residual stream
    where it is next read: the input of `reader` (the next norm reading it), else the block's output."""
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(output.shape[-1], generator=generator).to(output.device) * output.float().std()
    store: list[Tensor] = []

    def probe() -> Tensor:
        if reader is not None:
            return _capture_input(reader, run, store)
        with torch.no_grad():
            return run()

    before = probe()
    handle = linear.register_forward_hook(lambda m, a, o: o + delta.to(o.dtype))
    try:
        with torch.no_grad():
            shifted = probe()
    finally:
        handle.remove()
    difference = shifted.float() - before.float()
    return bool((difference - delta).norm() <= _TOLERANCE * delta.expand_as(difference).norm())


class _Stop(Exception):
    """Ends a forward pass at the hooked module."""
