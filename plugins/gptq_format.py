"""The GPTQ checkpoint format (v1 ``gptq``, and ``gptq_v2``): loaded by vLLM, SGLang, TGI,
transformers + gptqmodel and exllama. Layout and packing: `llmquant.io.gptq`.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import UniformQuantized
from llmquant.errors import ConfigError, PluginError, ShapeError
from llmquant.formats import ModuleRecord, OutputFormat, quantizer_name
from llmquant.io.gptq import from_gptq_tensors, gptq_quantization_config, to_gptq_tensors

__all__ = ["GPTQFormat", "GPTQv2Format"]

log = logging.getLogger(__name__)


class GPTQFormat:
    """GPTQ v1: ``qweight/qzeros/scales/g_idx``, zeros stored minus one."""

    name: ClassVar[str] = "gptq"
    description: ClassVar[str] = "GPTQ v1 qweight/qzeros/scales/g_idx (vLLM, SGLang, TGI, transformers+gptqmodel)"
    accepts: ClassVar[tuple[type, ...]] = (UniformQuantized,)
    default_for: ClassVar[tuple[type, ...]] = (UniformQuantized,)
    version: ClassVar[int] = 1

    def check_module(self, name: str, shape: tuple[int, int], config: Any) -> None:
        """Raise ShapeError if this weight cannot be packed at the config's bit width."""
        bits = getattr(config, "bits", 4)
        if bits not in (2, 3, 4, 8):
            raise ConfigError("bits", bits, "2, 3, 4 or 8 for GPTQ (GGUF's K-quants hold 5 and 6 bits: --format gguf)")
        for dim, length in (("out_features", shape[0]), ("in_features", shape[1])):
            multiple = 32 if bits == 3 else 32 // bits
            if length % multiple:
                raise ShapeError(
                    f"{name} has shape {shape}: GPTQ {bits}-bit packing needs {dim} to be a multiple of "
                    f"{multiple}; leave it unquantized with `ignore`"
                )

    def tensors(self, result: UniformQuantized, dtype: torch.dtype) -> dict[str, Tensor]:
        return to_gptq_tensors(result, version=self.version)

    def quantization_config(self, records: list[ModuleRecord], algo_params: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
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
        kept = same_in_every_block(records)
        if kept is not None:
            extra["modules_in_block_to_quantize"] = [kept]
        if any(key.startswith("+:") for key in dynamic) or (kept is None and dynamic):
            log.warning(
                "per-module settings are stored as gptqmodel `dynamic` rules, which vLLM and GPTQModel.load honour "
                "but transformers' GPTQ integration ignores; load this output with one of those"
            )
        return gptq_quantization_config(
            bits=int(bits or 4), group_size=group_size, symmetric=bool(symmetric), version=self.version,
            dynamic=dynamic or None, extra=extra, quantizer=quantizer_name(),
        )

    def recognizes(self, quantization_config: Mapping[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "gptq" and \
            quantization_config.get("checkpoint_format", "gptq") == self.name

    def quantized_module(self, key: str) -> str | None:
        return key[: -len(".qweight")] if key.endswith(".qweight") else None

    def read(self, tensors: Mapping[str, Tensor], quantization_config: Mapping[str, Any]) -> UniformQuantized:
        return from_gptq_tensors(dict(tensors), version=self.version)


class GPTQv2Format(GPTQFormat):
    """GPTQ v2 (``checkpoint_format: gptq_v2``): zeros stored as they are, so asymmetric zero 0 fits."""

    name: ClassVar[str] = "gptq_v2"
    description: ClassVar[str] = "GPTQ v2, zeros without the minus one (GPTQModel, vLLM via gptqmodel)"
    default_for: ClassVar[tuple[type, ...]] = ()
    version: ClassVar[int] = 2


def same_in_every_block(records: list[ModuleRecord]) -> list[str] | None:
    """Return the block-relative names of quantized Linears when some are kept in float, but the
    same ones in every block (what transformers' ``modules_in_block_to_quantize`` can say)."""
    by_block: dict[str, tuple[list[str], bool]] = {}
    for r in records:
        match = re.match(r"^(.*?\.\d+)\.(.+)$", r.name)  # the block: up to the first index
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


@hookimpl
def llmquant_register_formats(register: Callable[[type[OutputFormat]], None]) -> None:
    register(GPTQFormat)
    register(GPTQv2Format)
