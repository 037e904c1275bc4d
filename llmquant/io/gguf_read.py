"""llmquant's ``model.gguf`` read back under the checkpoint's names, for `llmquant.load_quantized`.

The inverse of `llmquant.io.gguf_model`: llama.cpp names -> the model's own (found by mapping the
model's state-dict keys forward; a MoE layer's merged experts split back under the names the run wrote
them, from its run record), Llama's q/k rows back out of rope order, Gemma's norms less their 1, block types that
llmquant writes as ``{module}.gguf.{type}`` rows (decoded by the GGUF format), and every other
tensor as float (other block types dequantized by gguf-py). Tensors are memory-mapped and read
on access.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmquant.errors import CheckpointError
from llmquant.io.gguf_blocks import LOSSLESS
from llmquant.io.gguf_kquants import KQUANTS
from llmquant.io.gguf_model import EXPERT, QUANTIZED_MARK, Architecture, architecture_of, gguf_tensor_name

__all__ = ["GGUFTensors"]


class GGUFTensors(Mapping[str, Tensor]):
    """Every tensor of `path` (a GGUF file llmquant wrote beside its ``config.json``) by checkpoint name."""

    def __init__(self, path: Path) -> None:
        import gguf
        from transformers import AutoConfig, AutoModelForCausalLM

        config = json.loads((path.parent / "config.json").read_text())
        arch = architecture_of(config)
        n_blocks = int(config["num_hidden_layers"])
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent))  # type: ignore[no-untyped-call]
        names = {}
        for key in skeleton.state_dict():
            try:
                names[gguf_tensor_name(key, n_blocks, arch)] = key
            except CheckpointError:
                continue
        self.reader = gguf.GGUFReader(str(path))
        self.heads = {"attn_q": int(config["num_attention_heads"]),
                      "attn_k": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
        self.arch = arch
        self.tensors: dict[str, Any] = {}
        self.expert: dict[str, int] = {}  # a key split from a merged experts tensor -> its expert
        experts = _expert_names(path.parent, n_blocks, arch) if arch.moe else {}
        for tensor in self.reader.tensors:
            kind = tensor.tensor_type.name.lower()
            block = kind in LOSSLESS or kind in KQUANTS
            if tensor.name in experts:
                for e in range(int(tensor.shape[2])):  # ggml's ne: (in, out, experts)
                    key = experts[tensor.name].format(e) + (f"{QUANTIZED_MARK}{kind}" if block else ".weight")
                    self.tensors[key], self.expert[key] = tensor, e
                continue
            if tensor.name not in names:
                raise CheckpointError(f"{path}: tensor {tensor.name} has no place in a {config.get('model_type')} model")
            key = names[tensor.name]
            if block and key.endswith(".weight") and len(tensor.shape) == 2 and "embed" not in key:
                key = f"{key.removesuffix('.weight')}{QUANTIZED_MARK}{kind}"
            self.tensors[key] = tensor
        # bytes in the file, by key (an expert's share of its merged tensor)
        self.sizes = {key: int(t.n_bytes) // (int(t.shape[2]) if key in self.expert else 1) for key, t in self.tensors.items()}

    def __getitem__(self, key: str) -> Tensor:
        import gguf

        tensor = self.tensors[key]
        kind = tensor.tensor_type
        data = np.asarray(tensor.data)
        if key in self.expert:
            data = data.reshape(int(tensor.shape[2]), int(tensor.shape[1]), -1)[self.expert[key]]
        if QUANTIZED_MARK in key:
            out = torch.from_numpy(data.copy()).reshape(int(tensor.shape[1]), -1)
        elif kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            out = torch.from_numpy(data.astype(np.float32))
        else:
            out = torch.from_numpy(gguf.quants.dequantize(data, kind).astype(np.float32))
        role = tensor.name.split(".")[-2]
        if self.arch.permute_qk and role in self.heads and tensor.name.endswith(".weight"):
            out = _unpermute_rows(out, self.heads[role])
        if self.arch.shifts(key):
            out = out - self.arch.norm_shift
        return out

    @property
    def infos(self) -> dict[str, Any]:
        """Each key's shape in the checkpoint's order (``.shape``), as `llmquant.host.checkpoint.Checkpoint.infos` gives it."""
        from types import SimpleNamespace

        return {key: SimpleNamespace(shape=tuple(int(n) for n in reversed(t.shape[:2] if key in self.expert else t.shape)))
                for key, t in self.tensors.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _expert_names(folder: Path, n_blocks: int, arch: Architecture) -> dict[str, str]:
    """llama.cpp's merged expert tensors -> the per-expert module names the run wrote (``{}`` for the expert): from the
    run record, else transformers' own names (``model.layers.N.mlp.experts.{}.gate_proj``)."""
    record = folder / "llmquant.json"
    names = [m["name"] for m in json.loads(record.read_text())["modules"]] if record.exists() else []
    if not any(EXPERT.match(name) for name in names):
        names = [f"model.layers.{b}.mlp.experts.0.{proj}" for b in range(n_blocks) for proj in ("gate_proj", "up_proj", "down_proj")]
    found = (EXPERT.match(name) for name in names)
    return {gguf_tensor_name(f"{m['prefix']}.{m['proj']}.weight", n_blocks, arch): f"{m['prefix']}.{{}}.{m['proj']}"
            for m in found if m}


def _unpermute_rows(rows: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's rope order (`llmquant.io.gguf_model`'s row permutation)."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
