"""Mixture-of-experts blocks: routed experts as per-expert Linears, named as the checkpoint names them.

transformers 5 holds a block's routed experts as fused 3-D parameters (``gate_up_proj (E, 2I, H)``,
``down_proj (E, H, I)``) and fuses a checkpoint's per-expert tensors at load through its conversion
mapping (``transformers.conversion_mapping``). llmquant reads that same mapping to learn which
per-expert projections make up each fused parameter and in which order, replaces every fused experts
module of the meta skeleton with `ExpertLinears` (one ``nn.Linear`` per expert and projection), and
so quantizes, calibrates and writes each expert under the checkpoint's own per-expert names. The
mapping's renamings (Mixtral's ``block_sparse_moe`` -> ``mlp``) give the `KeyMap` between the names
on disk, which the output keeps, and the names in the skeleton.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmquant.errors import CheckpointError

__all__ = ["EXPERT_NAMES", "ExpertLinears", "KeyMap", "MoERules", "OutputNames", "defuse_experts", "defused_skeleton",
           "moe_rules", "weight_shapes"]

_EXPERT = r"(?P<expert>\d+)"
TRANSFORMERS_ROLES = ("gate_proj", "up_proj", "down_proj")
EXPERT_NAMES = ("checkpoint", "transformers")


@dataclass(frozen=True)
class MoERules:
    """What a model type's conversion mapping says about its checkpoints.

    Attributes:
        renamings: transformers' ``WeightRenaming`` objects, applied to disk keys in order.
        fused: per fused parameter name (``gate_up_proj``), the per-expert projection names it
            concatenates along its rows, in order (``("gate_proj", "up_proj")``, Mixtral ``("w1", "w3")``).
    """

    renamings: tuple[Any, ...] = ()
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)


def moe_rules(model_type: str) -> MoERules:
    """Read transformers' conversion mapping for `model_type` (an empty `MoERules` when it has none)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    renamings, fused = [], {}
    for rule in get_checkpoint_conversion_mapping(model_type) or []:  # type: ignore[no-untyped-call]
        kind = type(rule).__name__
        if kind == "WeightRenaming":
            renamings.append(rule)
        elif kind == "WeightConverter" and all(".experts.*." in p for p in rule.source_patterns):
            target = rule.target_patterns[0].rsplit(".", 1)[-1]
            fused[target] = tuple(p.split(".experts.*.", 1)[1].removesuffix(".weight") for p in rule.source_patterns)
    return MoERules(tuple(renamings), fused)


@dataclass(frozen=True)
class KeyMap:
    """Checkpoint name <-> skeleton name, for tensor keys and module paths alike; identity for every
    name the model type's renamings leave alone (every name of a dense model)."""

    to_model: dict[str, str]
    to_disk: dict[str, str]

    @classmethod
    def build(cls, disk_keys: Iterable[str], rules: MoERules) -> KeyMap:
        """Rename every key, then map module paths from the keys: where ``A.x.y`` becomes ``B.x.y``,
        the module ``A`` is ``B`` (so ``block_sparse_moe.gate.weight`` -> ``mlp.router.weight`` also
        maps the module ``block_sparse_moe.gate`` to ``mlp.router``)."""
        if not rules.renamings:
            return cls({}, {})
        to_model = {}
        for key in disk_keys:
            renamed = key
            for rule in rules.renamings:
                renamed = rule.rename_source_key(renamed)[0]
            if renamed == key:
                continue
            to_model[key] = renamed
            old, new = key.split("."), renamed.split(".")
            while len(old) > 1 and len(new) > 1 and old[-1] == new[-1]:
                old, new = old[:-1], new[:-1]
                if old != new:
                    to_model[".".join(old)] = ".".join(new)
        return cls(to_model, {v: k for k, v in to_model.items()})

    def model(self, disk: str) -> str:
        return self.to_model.get(disk, disk)

    def disk(self, model: str) -> str:
        return self.to_disk.get(model, model)


@dataclass(frozen=True)
class OutputNames:
    """Name on disk -> name in the output, for tensor keys and module names alike (longest module
    prefix wins): empty, so the identity, for ``--expert-names checkpoint``; for ``transformers``, the
    names of transformers' own model with its experts defused (Mixtral ``block_sparse_moe.experts.N.w1``
    -> ``mlp.experts.N.gate_proj``), the only ones GPTQModel and gptqmodel's defuser load."""

    modules: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, policy: str, model: nn.Module, keys: KeyMap, experts: Iterable[str]) -> OutputNames:
        """The renaming for `policy` (one of `EXPERT_NAMES`) of the skeleton `model`'s `experts` paths."""
        if policy == "checkpoint":
            return cls()
        renamed = {}
        for path in experts:
            linears = model.get_submodule(path)
            assert isinstance(linears, ExpertLinears), f"{path} is not defused"
            for e in range(len(linears)):
                for role, name in zip((linears.gate, linears.up, linears.down), TRANSFORMERS_ROLES):
                    renamed[keys.disk(f"{path}.{e}.{role}")] = f"{path}.{e}.{name}"
        # the renamings' own entries, less the tensor keys of a renamed expert (its ``w1.weight``)
        modules = {d: m for d, m in keys.to_model.items() if d.rpartition(".")[0] not in renamed}
        return cls({d: m for d, m in {**modules, **renamed}.items() if d != m})

    def __call__(self, name: str) -> str:
        if not self.modules:
            return name
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            head = ".".join(parts[:i])
            if head in self.modules:
                return ".".join([self.modules[head], *parts[i:]])
        return name


class _Expert(nn.Module):
    """One routed expert: its projections as Linears named as on disk (``gate_proj`` or ``w1`` ...)."""

    def __init__(self, names: tuple[str, str, str], shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> None:
        super().__init__()
        for name in names:
            out_features, in_features = shapes[name]
            self.add_module(name, nn.Linear(in_features, out_features, bias=False, device="meta", dtype=dtype))


class ExpertLinears(nn.Module):
    """A drop-in for transformers' fused experts module, ``forward(hidden (T, H), top_k_index (T, k),
    top_k_weights (T, k)) -> (T, H)``, holding expert ``e``'s projections as Linears at ``{e}.{name}``.

    Each expert computes ``down(act(gate(x)) * up(x))`` on the tokens routed to it, weighted by
    their routing weight, as the fused module's eager forward does.
    """

    def __init__(self, experts: list[_Expert], roles: tuple[str, str, str], act_fn: nn.Module) -> None:
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.count = len(experts)
        self.gate, self.up, self.down = roles
        self.act_fn = act_fn  # parameter-free (SiLU): its own submodule, not an expert

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, e: int) -> nn.Module:
        return self.get_submodule(str(e))

    def expert_output(self, e: int, x: Tensor) -> Tensor:
        """Return expert `e`'s output (n, H) on inputs ``x: (n, H)``, before the routing weight."""
        down: nn.Module = getattr(self[e], self.down)
        out: Tensor = down(self.intermediate(e, x))
        return out

    def intermediate(self, e: int, x: Tensor) -> Tensor:
        """Return ``act(gate(x)) * up(x)``, the input of expert `e`'s down projection."""
        expert = self[e]
        out: Tensor = self.act_fn(getattr(expert, self.gate)(x)) * getattr(expert, self.up)(x)
        return out

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < len(self):
                continue  # an index past the last expert marks a dropped slot
            token, slot = torch.where(top_k_index == e)
            y = self.expert_output(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def defuse_experts(model: nn.Module, model_type: str, linear_shapes: Mapping[str, tuple[int, ...]], keys: KeyMap,
                   rules: MoERules) -> list[str]:
    """Replace every fused experts module of the meta skeleton `model` by `ExpertLinears`.

    Args:
        linear_shapes: ``(out, in)`` of every 2-D weight by module name on disk (a source's
            ``NAME.weight`` tensors, or an output's records), to find each expert's projections.
        keys, rules: from `moe_rules` / `KeyMap.build` for `model_type`.

    Returns:
        The skeleton paths of the replaced modules (empty for a dense model).

    Raises:
        CheckpointError: a module holds fused 3-D expert parameters that the checkpoint does not
            store per expert (gpt-oss: fused, transposed, gate/up interleaved), or whose projections
            the conversion mapping does not describe.
    """
    replaced = []
    for path, module in list(model.named_modules()):
        fused = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
        if not fused:
            continue
        if not rules.fused or not set(fused) <= set(rules.fused):
            raise CheckpointError(
                f"{path} holds fused expert tensors ({', '.join(f'{n} {tuple(p.shape)}' for n, p in fused.items())}) that "
                f"model_type {model_type!r} stores fused on disk, not per expert; llmquant quantizes experts stored per "
                f"expert (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) and cannot yet quantize this layout"
            )
        gate = getattr(type(module), "_apply_gate", None)  # transformers' default is act(gate) * up
        unusual = [a for a in ("limit", "swiglu_limit", "alpha") if hasattr(module, a)]
        unusual += ["_apply_gate"] if gate is not None and gate.__name__ != "_default_apply_gate" else []
        if unusual:
            raise CheckpointError(
                f"{path} ({type(module).__name__}) computes its experts with more than act(gate) * up ({', '.join(unusual)}); "
                f"llmquant quantizes experts of Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 form and cannot yet run this one"
            )
        count = next(iter(fused.values())).shape[0]
        dtype = next(iter(fused.values())).dtype
        pattern = re.compile(rf"^{re.escape(keys.disk(path))}\.{_EXPERT}\.(?P<name>[^.]+)$")
        found: dict[int, dict[str, tuple[int, int]]] = {}
        for key, shape in linear_shapes.items():
            match = pattern.match(key)
            if match:
                found.setdefault(int(match["expert"]), {})[match["name"]] = (int(shape[0]), int(shape[1]))
        # the mapping's names, or transformers' own (GPTQModel writes Mixtral's experts as gate_proj/up_proj/down_proj)
        roles = next((r for r in (_roles(rules, fused), TRANSFORMERS_ROLES)
                      if sorted(found) == list(range(count)) and all(set(r) <= set(f) for f in found.values())), None)
        if roles is None:
            raise CheckpointError(
                f"{path}: the checkpoint lacks per-expert tensors {keys.disk(path)}.N.{{{','.join(_roles(rules, fused))}}} "
                f"for some of its {count} experts; the checkpoint does not match its config.json"
            )
        shapes = {e: {name: f[name] for name in roles} for e, f in found.items()}
        experts = [_Expert(roles, shapes[e], dtype) for e in range(count)]
        model.set_submodule(path, ExpertLinears(experts, roles, module.act_fn))
        replaced.append(path)
    return replaced


def _roles(rules: MoERules, fused: dict[str, Any]) -> tuple[str, str, str]:
    """Return the per-expert (gate, up, down) projection names from the fused parameters' sources."""
    pairs = [rules.fused[n] for n in fused if len(rules.fused[n]) == 2]
    singles = [rules.fused[n] for n in fused if len(rules.fused[n]) == 1]
    if len(pairs) != 1 or len(singles) != 1:
        raise CheckpointError(f"fused experts {sorted(fused)}: expected one gate/up pair and one down projection")
    (gate, up), (down,) = pairs[0], singles[0]
    return gate, up, down


def weight_shapes(infos: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``(out, in)`` of every 2-D ``NAME.weight`` tensor of a checkpoint's `infos`, by module ``NAME``."""
    return {k.removesuffix(".weight"): tuple(i.shape) for k, i in infos.items() if k.endswith(".weight") and len(i.shape) == 2}


def defused_skeleton(config: Any, disk_keys: Iterable[str], linear_shapes: Mapping[str, tuple[int, ...]]) -> tuple[
        nn.Module, KeyMap, list[str]]:
    """Build the meta skeleton of `config` with its fused experts replaced by `ExpertLinears`.

    Returns:
        The skeleton, the checkpoint <-> skeleton `KeyMap`, and the replaced experts' skeleton paths.
    """
    from llmquant.host.arch import build_skeleton

    rules = moe_rules(config.model_type)
    keys = KeyMap.build(disk_keys, rules)
    model = build_skeleton(config)
    return model, keys, defuse_experts(model, config.model_type, linear_shapes, keys, rules)
