"""The bitsandbytes 4-bit format (NF4/FP4, with or without double quant): loaded by transformers
+ bitsandbytes (CPU and CUDA) and vLLM. Layout: `llmquant.io.bitsandbytes`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import CodebookQuantized
from llmquant.errors import PluginError
from llmquant.formats import ModuleRecord, OutputFormat
from llmquant.io.bitsandbytes import from_bnb_tensors, to_bnb_tensors

__all__ = ["BitsAndBytesFormat"]

_STATE_MARK = ".weight.quant_state.bitsandbytes__"


class BitsAndBytesFormat:
    """bitsandbytes ``Linear4bit`` state: packed codes, absmax, codebook and a JSON quant state."""

    name: ClassVar[str] = "bitsandbytes"
    description: ClassVar[str] = "bitsandbytes 4-bit NF4/FP4 (transformers+bitsandbytes on CPU/CUDA, vLLM)"
    accepts: ClassVar[tuple[type, ...]] = (CodebookQuantized,)
    default_for: ClassVar[tuple[type, ...]] = (CodebookQuantized,)

    def check_module(self, name: str, shape: tuple[int, int], config: Any) -> None:
        """Every shape fits; the algorithm checks its own block size."""

    def tensors(self, result: CodebookQuantized, dtype: torch.dtype) -> dict[str, Tensor]:
        return to_bnb_tensors(result, dtype)

    def quantization_config(self, records: list[ModuleRecord], algo_params: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """transformers' ``BitsAndBytesConfig`` as saved; Linears kept in float go to ``llm_int8_skip_modules``."""
        quantized = [r for r in records if r.bits is not None]
        if not quantized:
            raise PluginError("no module was quantized: every Linear matched `ignore`")
        kinds = {(r.extra.get("codebook"), r.extra.get("double_quant")) for r in quantized}
        if len(kinds) > 1:
            raise PluginError(f"bitsandbytes stores one codebook and double-quant setting per model, got {sorted(map(str, kinds))}")
        codebook, double_quant = kinds.pop()
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": codebook,
            "bnb_4bit_use_double_quant": bool(double_quant),
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head", *(r.name for r in records if r.bits is None)],
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }

    def recognizes(self, quantization_config: Mapping[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "bitsandbytes" and bool(quantization_config.get("load_in_4bit"))

    def quantized_module(self, key: str) -> str | None:
        head, mark, _ = key.partition(_STATE_MARK)
        return head if mark else None

    def read(self, tensors: Mapping[str, Tensor], quantization_config: Mapping[str, Any]) -> CodebookQuantized:
        return from_bnb_tensors(tensors)


@hookimpl
def llmquant_register_formats(register: Callable[[type[OutputFormat]], None]) -> None:
    register(BitsAndBytesFormat)
