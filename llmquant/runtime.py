"""Load llmquant's output as a transformers model that runs on CPU with no third-party kernel.

Quantized Linears become `QuantLinear`, which keeps the packed GPTQ tensors and dequantizes
them in its forward; everything else is an ordinary transformers module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.errors import CheckpointError
from llmquant.host.arch import build_skeleton
from llmquant.host.checkpoint import Checkpoint
from llmquant.io.gptq import GPTQ_TENSORS, from_gptq_tensors

__all__ = ["QuantLinear", "load_quantized"]


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as GPTQ tensors and dequantized on the fly."""

    def __init__(self, tensors: dict[str, Tensor], bias: Tensor | None, version: int, dtype: torch.dtype) -> None:
        super().__init__()
        for name in GPTQ_TENSORS:
            self.register_buffer(name, tensors[name])
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.version, self.dtype = version, dtype
        self.in_features = int(tensors["g_idx"].shape[0])
        self.out_features = int(tensors["scales"].shape[1])

    def dequantize(self) -> Tensor:
        """Return the float weight (out, in) in the compute dtype."""
        tensors = {name: getattr(self, name) for name in GPTQ_TENSORS}
        return from_gptq_tensors(tensors, version=self.version).dequantize(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Any:
    """Load a folder llmquant wrote as a transformers causal LM on CPU.

    Args:
        path: the output folder of ``llmquant quantize``.
        dtype: compute dtype; by default the dtype recorded in config.json (float32 if none).

    Raises:
        CheckpointError: the folder is not a GPTQ checkpoint or its tensors do not fit the model.
    """
    from transformers import AutoConfig, GenerationConfig

    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method") != "gptq":
        raise CheckpointError(f"{folder}/config.json has no GPTQ quantization_config: is it llmquant's output?")
    version = 2 if quant.get("checkpoint_format") == "gptq_v2" else 1
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or _config_dtype(raw)
    config.dtype = dtype
    model: Any = build_skeleton(config)  # a transformers PreTrainedModel
    checkpoint = Checkpoint(folder)
    quantized = sorted({k.rsplit(".", 1)[0] for k in checkpoint if k.endswith(".qweight")})
    for name in quantized:
        tensors = {t: checkpoint[f"{name}.{t}"] for t in GPTQ_TENSORS}
        bias = checkpoint[f"{name}.bias"] if f"{name}.bias" in checkpoint else None
        model.set_submodule(name, QuantLinear(tensors, bias, version, dtype))
    done = {f"{name}.{t}" for name in quantized for t in (*GPTQ_TENSORS, "bias")}
    state = {k: _as(checkpoint[k], dtype) for k in checkpoint if k not in done}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{folder} lacks tensors for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _config_dtype(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, str(name)) if isinstance(name, str) else torch.float32
