"""Load llmquant's output as a transformers model that runs on CPU with no third-party kernel.

Quantized Linears become `QuantLinear`, which keeps the stored tensors of whichever format the
checkpoint is in and dequantizes them in its forward (the format plugin reads them back);
everything else is an ordinary transformers module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.errors import CheckpointError
from llmquant.formats import OutputFormat
from llmquant.host.arch import build_skeleton
from llmquant.host.checkpoint import Checkpoint
from llmquant.plugins import Plugins, get_plugin_manager

__all__ = ["QuantLinear", "load_quantized"]


class QuantLinear(nn.Module):
    """A Linear whose weight is kept as a format's stored tensors and dequantized on the fly."""

    def __init__(self, fmt: OutputFormat, tensors: dict[str, Tensor], quantization_config: Mapping[str, Any],
                 bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.fmt, self.quantization_config, self.dtype = fmt, quantization_config, dtype
        self.names = {name: name.replace(".", "__") for name in tensors}
        for name, tensor in tensors.items():
            self.register_buffer(self.names[name], tensor)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.out_features, self.in_features = self.result().shape

    def result(self) -> Any:
        """Return the quantized result (`UniformQuantized` or `CodebookQuantized`) the tensors hold."""
        return self.fmt.read({name: getattr(self, buffer) for name, buffer in self.names.items()}, self.quantization_config)

    def dequantize(self) -> Tensor:
        """Return the float weight (out, in) in the compute dtype."""
        weight: Tensor = self.result().dequantize(self.dtype)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, plugins: Plugins | None = None) -> Any:
    """Load a folder llmquant wrote as a transformers causal LM on CPU.

    Args:
        path: the output folder of ``llmquant quantize``, in any installed format.
        dtype: compute dtype; by default the dtype recorded in config.json (float32 if none).
        plugins: the plugin manager whose formats read the checkpoint (default: a new one).

    Raises:
        CheckpointError: no installed format recognizes the folder, or its tensors do not fit the model.
    """
    from transformers import AutoConfig, GenerationConfig

    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    quant = raw.get("quantization_config") or {}
    entry = (plugins or get_plugin_manager()).format_of(quant)
    if entry is None:
        raise CheckpointError(
            f"{folder}/config.json: no installed format reads quant_method {quant.get('quant_method')!r} "
            f"(see `llmquant formats`): is it llmquant's output?"
        )
    fmt = entry.cls()
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or _config_dtype(raw)
    config.dtype = dtype
    model: Any = build_skeleton(config)  # a transformers PreTrainedModel
    checkpoint = Checkpoint(folder)
    keys = sorted(checkpoint)
    quantized = sorted({m for m in map(fmt.quantized_module, keys) if m is not None})
    done: set[str] = set()
    for name in quantized:
        own = [k for k in keys if k.startswith(f"{name}.") and k != f"{name}.bias"]
        tensors = {k[len(name) + 1:]: checkpoint[k] for k in own}
        bias = checkpoint[f"{name}.bias"] if f"{name}.bias" in checkpoint else None
        model.set_submodule(name, QuantLinear(fmt, tensors, quant, bias, dtype))
        done.update(own, [f"{name}.bias"])
    state = {k: _as(checkpoint[k], dtype) for k in keys if k not in done}
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
