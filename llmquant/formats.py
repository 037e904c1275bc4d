"""Output formats: how a result becomes tensors and a ``quantization_config``.

A format declares which result types it accepts, so an algorithm/format pair that cannot be
represented is refused before any work starts. (Formats become plugins with their own hook
in a later version of the plugin contract; today the host knows the GPTQ layouts.)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from llmquant.algorithm import UniformQuantized
from llmquant.errors import PluginError, ShapeError
from llmquant.io.gptq import gptq_quantization_config, to_gptq_tensors

__all__ = ["GPTQFormat", "ModuleRecord", "get_format", "FORMATS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleRecord:
    """What was done to one Linear: quantized with these settings, or kept in float (bits None)."""

    name: str
    shape: tuple[int, int]
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GPTQFormat:
    """GPTQ checkpoint layout (see `llmquant.io.gptq`); version 1 is what every server loads."""

    name: str
    version: int
    accepts: ClassVar[tuple[type, ...]] = (UniformQuantized,)
    description: ClassVar[str] = "GPTQ qweight/qzeros/scales/g_idx (vLLM, SGLang, TGI, transformers+gptqmodel)"

    def check_shape(self, name: str, shape: tuple[int, int], bits: int) -> None:
        """Raise ShapeError before any work if this weight cannot be packed at `bits`."""
        out_features, in_features = shape
        for dim, length in (("in_features", in_features), ("out_features", out_features)):
            multiple = 32 if bits == 3 else 32 // bits
            if length % multiple:
                raise ShapeError(
                    f"{name} has shape {shape}: GPTQ {bits}-bit packing needs {dim} to be a multiple of "
                    f"{multiple}; leave it unquantized with `ignore`"
                )

    def tensors(self, result: Any) -> dict[str, Tensor]:
        return to_gptq_tensors(result, version=self.version)

    def quantization_config(self, records: list[ModuleRecord], algo_params: dict[str, Any]) -> dict[str, Any]:
        """Describe the checkpoint: the most common settings, and gptqmodel ``dynamic`` rules for the rest."""
        quantized = [r for r in records if r.bits is not None]
        if not quantized:
            raise PluginError("no module was quantized: every Linear matched `ignore`")
        settings = [(r.bits, r.group_size, r.symmetric) for r in quantized]
        bits, group_size, symmetric = max(set(settings), key=settings.count)
        dynamic: dict[str, dict[str, Any]] = {}
        for r in records:
            pattern = f"^{re.escape(r.name)}$"
            if r.bits is None:
                dynamic[f"-:{pattern}"] = {}
            elif (r.bits, r.group_size, r.symmetric) != (bits, group_size, symmetric):
                dynamic[f"+:{pattern}"] = {"bits": r.bits, "group_size": r.group_size or -1, "sym": r.symmetric}
        extra: dict[str, Any] = {k: algo_params[k] for k in ("desc_act", "damp_percent", "static_groups", "true_sequential") if k in algo_params}
        kept = _same_in_every_block(records)
        if kept is not None:
            extra["modules_in_block_to_quantize"] = [kept]
        if any(key.startswith("+:") for key in dynamic) or (kept is None and dynamic):
            log.warning(
                "per-module settings are stored as gptqmodel `dynamic` rules, which vLLM and GPTQModel.load honour "
                "but transformers' GPTQ integration ignores; load this output with one of those"
            )
        return gptq_quantization_config(
            bits=int(bits or 4), group_size=group_size, symmetric=bool(symmetric), version=self.version,
            dynamic=dynamic or None, extra=extra, quantizer=_quantizer_name(),
        )


def _same_in_every_block(records: list[ModuleRecord]) -> list[str] | None:
    """Return the block-relative names of quantized Linears when some are kept in float, but the
    same ones in every block (what transformers' ``modules_in_block_to_quantize`` can say)."""
    by_block: dict[str, tuple[list[str], bool]] = {}
    for r in records:
        match = re.match(r"^(.*\.\d+)\.(.+)$", r.name)
        if match is None:
            return None
        names, any_kept = by_block.get(match.group(1), ([], False))
        if r.bits is not None:
            names.append(match.group(2))
        by_block[match.group(1)] = (names, any_kept or r.bits is None)
    sets = {tuple(names) for names, _ in by_block.values()}
    if len(sets) != 1 or not any(kept for _, kept in by_block.values()):
        return None
    return list(sets.pop())


def _quantizer_name() -> str:
    from llmquant import __version__

    return f"llmquant:{__version__}"


FORMATS = {"gptq": GPTQFormat("gptq", 1), "gptq_v2": GPTQFormat("gptq_v2", 2)}


def get_format(name: str, result_type: type, algo: str) -> GPTQFormat:
    """Return the format called `name`, checking it can hold `result_type`.

    Raises:
        PluginError: unknown name (listing the valid ones), or a result the format cannot store
            (naming the formats that can).
    """
    if name not in FORMATS:
        raise PluginError(f"unknown format {name!r}: available formats are {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    if not issubclass(result_type, fmt.accepts):
        able = [n for n, f in FORMATS.items() if issubclass(result_type, f.accepts)]
        raise PluginError(
            f"format {name!r} cannot store {result_type.__name__} results of algorithm {algo!r}; "
            f"use one of: {', '.join(able) or 'none installed'}"
        )
    return fmt
