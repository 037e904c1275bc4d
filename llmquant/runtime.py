"""Load llmquant's output as a transformers model that runs on CPU with no third-party kernel.

Quantized Linears become `QuantLinear`, which keeps the stored tensors of whichever format the
checkpoint is in and dequantizes them in its forward (the format plugin reads them back);
everything else is an ordinary transformers module.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.algorithm import UniformQuantized
from llmquant.errors import CheckpointError
from llmquant.formats import OutputFormat
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.moe import defused_skeleton, weight_shapes
from llmquant.host.workers import bound_onednn_cache
from llmquant.plugins import Plugins, get_plugin_manager

__all__ = ["Int4Linear", "QuantLinear", "load_quantized"]


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


class Int4Linear(nn.Module):
    """A 4-bit uniform Linear on torch's packed int4 CPU kernel (``_weight_int4pack_mm_for_cpu``).

    The kernel computes ``x @ W.T`` with ``W[o, i] = (q[o, i] - 8) * scale[g, o] + zero[g, o]`` for
    contiguous groups of 32..256 input channels; llmquant's ``scale * (q - z)`` is the same with
    ``zero = (8 - z) * scale``. Act-order results (groups scattered over the input channels) are
    run with the input channels permuted so every group is contiguous. Activations go through the
    kernel in bfloat16 (its fast path); the output is cast back to the input's dtype.
    """

    GROUP_SIZES = (32, 64, 128, 256)
    perm: Tensor | None
    packed: Tensor
    scale_and_zero: Tensor

    def __init__(self, result: UniformQuantized, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = result.shape
        self.group_size = Int4Linear.kernel_group_size(result)
        assert self.group_size is not None, "Int4Linear.supports() must be checked first"
        perm = torch.argsort(result.g_idx.long(), stable=True)
        self.register_buffer("perm", None if torch.equal(perm, torch.arange(self.in_features)) else perm)
        codes = result.codes[:, perm].to(torch.int32)
        repeat = (result.group_size or self.in_features) // self.group_size  # per-channel: one scale, many groups
        scale = result.scales.float().t().repeat_interleave(repeat, dim=0)
        zero = (8 - result.zeros.float().t().repeat_interleave(repeat, dim=0)) * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1))
        self.register_buffer("scale_and_zero", torch.stack([scale, zero], dim=-1).to(self.kernel_dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dtype = dtype

    kernel_dtype = torch.bfloat16

    @staticmethod
    def kernel_group_size(result: Any) -> int | None:
        """Return the kernel group size for `result`, or None when the kernel cannot run it."""
        if not isinstance(result, UniformQuantized) or result.bits != 4:
            return None
        size = result.group_size or next((g for g in reversed(Int4Linear.GROUP_SIZES) if result.shape[1] % g == 0), None)
        if size not in Int4Linear.GROUP_SIZES or result.shape[1] % size:
            return None
        counts = torch.bincount(result.g_idx.long())
        return size if result.group_size is None or bool((counts == size).all()) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        flat = x.reshape(-1, self.in_features).to(self.kernel_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_and_zero)
        out: Tensor = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dequantize(self) -> Tensor:
        """Return the weight (out, in) the kernel computes with (through an identity input, in float32)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        scale_and_zero = self.scale_and_zero.float()
        weight: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, scale_and_zero).t()
        if self.perm is not None:
            weight = weight[:, torch.argsort(self.perm)]
        return weight.to(self.dtype)


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None, plugins: Plugins | None = None,
                   kernel: str = "auto") -> Any:
    """Load a folder llmquant wrote as a transformers causal LM on CPU.

    Args:
        path: the output folder of ``llmquant quantize``, in any installed format.
        dtype: compute dtype; by default the dtype recorded in config.json (float32 if none).
        plugins: the plugin manager whose formats read the checkpoint (default: a new one).
        kernel: "auto" runs 4-bit uniform Linears on torch's packed int4 CPU kernel when the compute
            dtype is bfloat16 or float16 (the kernel's activations are bfloat16), and dequantizes
            the rest on the fly; "int4" uses the kernel whatever the dtype; "dequant" never does
            (exact float32 reference).

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
    if kernel not in ("auto", "int4", "dequant"):
        raise ValueError(f"kernel must be auto, int4 or dequant, got {kernel!r}")
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or _config_dtype(raw)
    use_kernel = kernel == "int4" or (kernel == "auto" and dtype in (torch.bfloat16, torch.float16))
    config.dtype = dtype
    opener = getattr(fmt, "open", None)  # a format with its own file (GGUF) reads it back under the checkpoint's names
    checkpoint: Any = opener(folder) if opener is not None else Checkpoint(folder)
    keys = sorted(checkpoint)
    quantized = sorted({m for m in map(fmt.quantized_module, keys) if m is not None})
    modules: dict[str, QuantLinear | Int4Linear] = {}
    done: set[str] = set()
    for name in quantized:
        start = bisect.bisect_left(keys, f"{name}.")  # keys are sorted: a module's are contiguous
        end = bisect.bisect_left(keys, f"{name}/")  # "/" sorts right after "."
        own = [k for k in keys[start:end] if k != f"{name}.bias"]
        tensors = {k[len(name) + 1:]: checkpoint[k] for k in own}
        bias = checkpoint[f"{name}.bias"] if f"{name}.bias" in checkpoint else None
        module: QuantLinear | Int4Linear = QuantLinear(fmt, tensors, quant, bias, dtype)
        result = module.result() if use_kernel and isinstance(module, QuantLinear) else None
        if result is not None and Int4Linear.kernel_group_size(result) is not None:
            module = Int4Linear(result, bias, dtype)
        modules[name] = module
        done.update(own, [f"{name}.bias"])
    # the quantized modules' own shapes: an output of another tool has no run record (GPTQModel's MoE outputs)
    shapes = {**_linear_shapes(folder, checkpoint), **{n: (int(m.out_features), int(m.in_features)) for n, m in modules.items()}}
    model: Any
    model, names, experts = defused_skeleton(config, keys, shapes)  # a transformers PreTrainedModel
    if experts:
        bound_onednn_cache()  # routed experts see a new token count at every step
    for name, module in modules.items():
        model.set_submodule(names.model(name), module)
    state = {names.model(k): _as(checkpoint[k], dtype) for k in keys if k not in done}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{folder} lacks tensors for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def _linear_shapes(folder: Path, checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """``(out, in)`` of every weight matrix by module name on disk: the run record's, else the float tensors'."""
    record = folder / "llmquant.json"
    if record.exists():
        return {m["name"]: tuple(m["shape"]) for m in json.loads(record.read_text())["modules"]}
    return weight_shapes(checkpoint.infos)


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _config_dtype(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, str(name)) if isinstance(name, str) else torch.float32
