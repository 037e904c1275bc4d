"""The compressed-tensors ``pack-quantized`` format (llm-compressor's W4A16/W8A16): loaded by vLLM,
SGLang and transformers + compressed-tensors. Layout: `llmquant.io.compressed_tensors`.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import UniformQuantized
from llmquant.errors import PluginError, ShapeError
from llmquant.formats import ModuleRecord, OutputFormat, has_act_order
from llmquant.io.compressed_tensors import CT_BITS, from_ct_tensors, to_ct_tensors

__all__ = ["CompressedTensorsFormat"]

log = logging.getLogger(__name__)

# The schema version of compressed-tensors whose layout this writes (checked with its loader).
CT_VERSION = "0.20.0"


class CompressedTensorsFormat:
    """``weight_packed/weight_scale[/weight_zero_point][/weight_g_idx]/weight_shape`` per Linear."""

    name: ClassVar[str] = "compressed-tensors"
    description: ClassVar[str] = "compressed-tensors pack-quantized, sym/asym, act-order g_idx (vLLM, SGLang, transformers)"
    accepts: ClassVar[tuple[type, ...]] = (UniformQuantized,)
    default_for: ClassVar[tuple[type, ...]] = ()

    def __init__(self) -> None:
        self._warned = False

    def check_module(self, name: str, shape: tuple[int, int], config: Any) -> None:
        bits = getattr(config, "bits", 4)
        if bits not in CT_BITS:
            raise ShapeError(f"{name}: compressed-tensors pack-quantized stores {', '.join(map(str, CT_BITS))}-bit "
                             f"integers, not {bits}-bit; use --format gptq for {bits} bits")
        if getattr(config, "desc_act", False) and not getattr(config, "static_groups", False) and not self._warned:
            self._warned = True
            log.warning(
                "act-order without static groups stores weight_g_idx with actorder 'group', which vLLM reads but "
                "compressed-tensors >= 0.20 (transformers) refuses; add --static-groups, or write --format gptq")

    def tensors(self, result: UniformQuantized, dtype: torch.dtype) -> dict[str, Tensor]:
        # Scales are float16-exact, so float16 keeps them for float16 and bfloat16 models alike.
        scale_dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float16
        return to_ct_tensors(result, scale_dtype, with_g_idx=has_act_order(result))

    def quantization_config(self, records: list[ModuleRecord], algo_params: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """One config group per distinct setting; a single setting targets every Linear not ignored."""
        quantized = [r for r in records if r.bits is not None]
        if not quantized:
            raise PluginError("no module was quantized: every Linear matched `ignore`")
        by_setting: dict[tuple[Any, ...], list[str]] = {}
        for r in quantized:
            key = (r.bits, r.group_size, r.symmetric, bool(r.extra.get("act_order")))
            by_setting.setdefault(key, []).append(r.name)
        groups = {}
        for index, ((bits, group_size, symmetric, act_order), names) in enumerate(sorted(by_setting.items(), key=str)):
            targets = ["Linear"] if len(by_setting) == 1 else [f"re:^{re.escape(n)}$" for n in names]
            groups[f"group_{index}"] = {
                "targets": targets,
                "weights": {
                    "num_bits": bits, "type": "int", "symmetric": bool(symmetric),
                    "strategy": "channel" if group_size is None else "group", "group_size": group_size,
                    "dynamic": False, "actorder": "group" if act_order else None, "observer": "minmax",
                },
                "input_activations": None, "output_activations": None, "format": "pack-quantized",
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ["lm_head", *(r.name for r in records if r.bits is None)],
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "version": CT_VERSION,
        }

    def recognizes(self, quantization_config: Mapping[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "compressed-tensors" and \
            quantization_config.get("format") == "pack-quantized"

    def quantized_module(self, key: str) -> str | None:
        return key[: -len(".weight_packed")] if key.endswith(".weight_packed") else None

    def read(self, tensors: Mapping[str, Tensor], quantization_config: Mapping[str, Any]) -> UniformQuantized:
        return from_ct_tensors(dict(tensors))


@hookimpl
def llmquant_register_formats(register: Callable[[type[OutputFormat]], None]) -> None:
    register(CompressedTensorsFormat)
