"""A Hugging Face folder of llmquant tensors -> one GGUF file llama.cpp and Ollama load.

The host writes its usual shards first; quantized Linears are there already as GGUF block rows,
under ``{module}.gguf.{type}`` (uint8, ``(out, row bytes)``; `llmquant.io.gguf_blocks`). This
module streams those shards, one tensor at a time, into ``model.gguf`` with llama.cpp's names,
hyperparameters and tokenizer, as llama.cpp's ``convert_hf_to_gguf.py`` would write them:

- names through gguf-py's tensor map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``);
- a mixture-of-experts layer's routed experts merged per projection into one 3-D tensor
  (``...experts.{0..E-1}.w1`` -> ``blk.0.ffn_gate_exps``, ``(E, out, row bytes)``), routers in F32;
- Llama's q/k rows permuted into llama.cpp's rope order (rows, so the blocks move whole);
  Gemma-3's norms stored with the 1 its RMSNorm adds (``x * (1 + w)`` -> ``w + 1``);
- norms, biases and other 1-D tensors in F32; float 2-D tensors (a Linear kept in float) in F16;
  the embedding and output head in their own type (llama.cpp's choice by default);
- the vocabulary padded to the embedding's rows (`llmquant.io.gguf_vocab`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmquant.errors import CheckpointError
from llmquant.io.gguf_blocks import LOSSLESS
from llmquant.io.gguf_kquants import KQUANTS, SUPER, encode_kquant
from llmquant.io.gguf_vocab import add_tokenizer

__all__ = ["ARCHITECTURES", "QUANTIZED_MARK", "check_convertible", "float_type", "gguf_tensor_name", "write_gguf"]

log = logging.getLogger(__name__)

QUANTIZED_MARK = ".gguf."  # {module}.gguf.{type}: a Linear's block rows in the host's shards


@dataclass(frozen=True)
class Architecture:
    """How one transformers ``model_type`` maps onto a llama.cpp architecture."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # Llama: q/k rows into llama.cpp's rope order
    norm_shift: float = 0.0  # added to every ``*norm.weight`` (Gemma's RMSNorm multiplies by 1 + w)
    moe: bool = False  # routed experts, merged per projection
    renormalized_topk: bool | None = None  # whether llama.cpp rescales the top-k routing weights (None: read from the file)

    def shifts(self, key: str) -> bool:
        return self.norm_shift != 0.0 and key.endswith("norm.weight")


ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),
    "qwen3": Architecture("QWEN3", permute_qk=False),
    "mixtral": Architecture("LLAMA", permute_qk=True, moe=True, renormalized_topk=True),
    "qwen2_moe": Architecture("QWEN2MOE", permute_qk=False, moe=True, renormalized_topk=False),
    "qwen3_moe": Architecture("QWEN3MOE", permute_qk=False, moe=True, renormalized_topk=True),
    "deepseek_v3": Architecture("DEEPSEEK2", permute_qk=False, moe=True),
    "gemma3_text": Architecture("GEMMA3", permute_qk=False, norm_shift=1.0),
}
GEMMA3_SLIDING_THETA = 10000.0  # llama.cpp's fixed rope base of Gemma-3's sliding-window layers
GEMMA3_PATTERN = 6  # llama.cpp's Gemma-3: every sixth layer attends globally
EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")  # a routed expert's projection

def architecture_of(config: dict[str, Any]) -> Architecture:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"GGUF output supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}; "
                              "write gptq or compressed-tensors instead")
    return ARCHITECTURES[model_type]


def check_convertible(folder: Path) -> None:
    """Raise CheckpointError, before any work, when the model in `folder` cannot be written as GGUF here."""
    config = json.loads((folder / "config.json").read_text())
    arch = architecture_of(config)
    _rope_theta(config)
    if config.get("model_type") == "gemma3_text":
        _check_gemma3(config)
    if arch.moe:
        _check_moe(config, arch)
    tokenizer = folder / "tokenizer.json"
    model = json.loads(tokenizer.read_text()).get("model", {}) if tokenizer.exists() else {}
    if model.get("type") != "BPE":
        kind = "no tokenizer.json" if not model else f"a {model.get('type')} tokenizer"
        raise CheckpointError(f"{folder}: GGUF output writes BPE tokenizers (byte-level or SentencePiece-style), and this "
                              f"model has {kind}; write gptq or compressed-tensors instead")


def _check_gemma3(config: dict[str, Any]) -> None:
    """llama.cpp fixes some of Gemma-3's settings rather than reading them: refuse a model that differs."""
    head_dim = int(config.get("head_dim", 256))
    layers = config.get("layer_types") or []
    expected = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(len(layers))]
    problems = []
    if layers != expected:
        problems.append(f"layer_types other than a global layer every {GEMMA3_PATTERN}th")
    if float(config.get("query_pre_attn_scalar", head_dim)) != head_dim:
        problems.append(f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')} != head_dim {head_dim}")
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {config.get('hidden_activation')}")
    if config.get("attn_logit_softcapping"):
        problems.append("attn_logit_softcapping")
    if problems:
        raise CheckpointError(f"this Gemma-3 model has {', '.join(problems)}, which llama.cpp's gemma3 architecture "
                              "does not read from GGUF; write gptq or compressed-tensors for it")


def _check_moe(config: dict[str, Any], arch: Architecture) -> None:
    """llama.cpp's MoE architectures fix the routing and put experts in every layer: refuse a model that differs."""
    problems = []
    renormalized = bool(config.get("norm_topk_prob", True))  # Mixtral always rescales its top-k weights
    if arch.renormalized_topk is not None and renormalized != arch.renormalized_topk:
        problems.append(f"norm_topk_prob {renormalized} (llama.cpp's {arch.gguf_arch.lower()} uses "
                        f"{arch.renormalized_topk})")
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
        problems.append("dense MLP layers between the expert layers (mlp_only_layers, decoder_sparse_step)")
    if arch.gguf_arch == "QWEN2MOE" and config.get("tie_word_embeddings"):
        problems.append("a tied output head (llama.cpp's qwen2moe requires its own)")
    if arch.gguf_arch == "DEEPSEEK2" and not config.get("rope_interleave", True):
        problems.append("rope_interleave false (llama.cpp's deepseek2 rotates interleaved pairs)")
    if problems:
        raise CheckpointError(f"this {config.get('model_type')} model has {', '.join(problems)}, which llama.cpp does not "
                              "read from GGUF; write gptq or compressed-tensors for it")


def _rope_theta(config: dict[str, Any]) -> float:
    """The rope base (of the global layers, for models with per-layer-type ropes); refuses rope scaling."""
    rope = config.get("rope_parameters") or {}
    sliding = rope.get("sliding_attention")
    rope = rope.get("full_attention", rope)
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise CheckpointError(f"rope scaling {rope or config.get('rope_scaling')} is not written to GGUF yet; "
                              "write gptq or compressed-tensors for this model")
    if sliding is not None and (sliding.get("rope_type", "default") != "default" or
                                float(sliding.get("rope_theta", GEMMA3_SLIDING_THETA)) != GEMMA3_SLIDING_THETA):
        raise CheckpointError(f"sliding-window rope {sliding}: llama.cpp uses base {GEMMA3_SLIDING_THETA:g} without scaling "
                              "there; write gptq or compressed-tensors for this model")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def expert_count(config: dict[str, Any]) -> int:
    """The routed experts per MoE layer (0 for a dense model)."""
    return int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0)


def gguf_tensor_name(key: str, n_blocks: int, arch: Architecture) -> str:
    """Return llama.cpp's name for the checkpoint tensor `key` (``model.norm.weight`` -> ``output_norm.weight``)."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], n_blocks)
    key = key.replace("e_score_correction_bias", "e_score_correction.bias")  # DeepSeek-V3's routing bias: exp_probs_b
    name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CheckpointError(f"{key}: no llama.cpp tensor name for it in the {arch.gguf_arch.lower()} architecture")
    return name


def float_type(name: str, shape: tuple[int, ...], tied: bool, base: str) -> str:
    """llama.cpp's type for a float tensor: the output head (or a tied embedding) Q6_K, or Q8_0 when its rows
    do not fill 256-element super-blocks; an untied embedding the base type; other 2-D tensors F16; 1-D tensors
    and MoE routers (``ffn_gate_inp``, ``ffn_gate_inp_shexp``) F32."""
    if len(shape) < 2 or ".ffn_gate_inp" in name:
        return "f32"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "q8_0" if shape[-1] % 256 else "q6_k"
    if name == "token_embd.weight":
        return base if base in LOSSLESS or (base in KQUANTS and shape[-1] % SUPER == 0) else "q8_0"
    return "f16"


def _permute_rows(rows: Tensor, heads: int) -> Tensor:
    """llama.cpp's rope order: within each head, interleave the rows of its two halves."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _encode_float(tensor: Tensor, kind: str) -> tuple[np.ndarray[Any, Any], int]:
    """Return (array to write, ggml type id) for a float tensor stored as `kind` (f32, f16 or a block type)."""
    import gguf

    data = tensor.float().numpy()
    if kind == "f32":
        return data, int(gguf.GGMLQuantizationType.F32)
    if kind == "f16":
        return data.astype(np.float16), int(gguf.GGMLQuantizationType.F16)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    if kind in KQUANTS:  # llmquant's round-to-nearest on the super-block grid (gguf-py has no K-quant quantizer)
        from llmquant.uniform import minmax_quantize

        spec = KQUANTS[kind]
        if tensor.shape[-1] % SUPER:
            raise CheckpointError(f"a tensor of shape {tuple(tensor.shape)} cannot be {kind.upper()}: rows must be a multiple "
                                  f"of {SUPER}; choose q8_0 with --gguf-embedding-type")
        result = minmax_quantize(tensor.float(), spec.bits, spec.group, True, spec.grid)
        return encode_kquant(result, spec).numpy(), int(qtype)
    return gguf.quants.quantize(data, qtype), int(qtype)


def _byte_size(shape: tuple[int, ...], kind: str) -> int:
    import gguf

    elements = int(np.prod(shape))
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
    return elements // block * size


class _Shards:
    """The host's output shards, read one tensor at a time, in the order they were written."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.files = sorted(folder.glob("*.safetensors"))
        self.handles = [safe_open(str(f), framework="pt") for f in self.files]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for handle in self.handles:
            for key in handle.keys():  # type: ignore[no-untyped-call]
                yield key, handle

    def shape(self, key: str, handle: Any) -> tuple[int, ...]:
        return tuple(handle.get_slice(key).get_shape())


@dataclass(frozen=True)
class _Entry:
    """One tensor of the output: its parts in the shards (one tensor, or a MoE projection's experts in order), its
    llama.cpp name, the type it is written as and its shape in elements (experts: ``(E, out, in)``)."""

    parts: tuple[tuple[str, Any, bool], ...]  # (key, handle, quantized): block rows the format wrote, or a float tensor
    name: str
    kind: str  # f32, f16 or a block type
    shape: tuple[int, ...]


def write_gguf(folder: Path, target: Path, *, embedding_type: str, base_type: str, file_type: int, name: str) -> None:
    """Write `folder`'s shards, config and tokenizer as the GGUF file `target`, one tensor at a time.

    Args:
        embedding_type: the embedding's and output head's type, or "auto" for llama.cpp's choice.
        base_type: the run's block type, for the file type and an untied embedding under "auto".
        file_type: ``general.file_type`` (a ``gguf.LlamaFileType`` value).
        name: ``general.name``.
    """
    import gguf

    config = json.loads((folder / "config.json").read_text())
    arch = architecture_of(config)
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config, arch)
    add_tokenizer(writer, folder, int(config["vocab_size"]))
    entries = _plan(_Shards(folder), config, arch, embedding_type, base_type)
    for entry in entries:  # the header lists every tensor before the first byte of data
        if entry.kind in ("f32", "f16"):
            dtype = np.dtype(np.float32 if entry.kind == "f32" else np.float16)
            writer.add_tensor_info(entry.name, entry.shape, dtype, int(np.prod(entry.shape)) * dtype.itemsize)
        else:
            writer.add_tensor_info(entry.name, _byte_shape(entry.shape, entry.kind), np.dtype(np.uint8),
                                   _byte_size(entry.shape, entry.kind), raw_dtype=gguf.GGMLQuantizationType[entry.kind.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads = {"attn_q": int(config["num_attention_heads"]),
             "attn_k": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
    for entry in entries:
        arrays = [_part_data(key, handle, quantized, entry, arch, heads) for key, handle, quantized in entry.parts]
        writer.write_tensor_data(arrays[0] if len(arrays) == 1 else np.stack(arrays))
    writer.close()


def _part_data(key: str, handle: Any, quantized: bool, entry: _Entry, arch: Architecture,
               heads: dict[str, int]) -> np.ndarray[Any, Any]:
    """One part of `entry` as written: block rows as they are, a float tensor encoded as the entry's type."""
    tensor = handle.get_tensor(key)
    role = entry.name.split(".")[-2]
    if arch.permute_qk and role in heads and entry.name.endswith(".weight"):
        tensor = _permute_rows(tensor, heads[role])
    if arch.shifts(key):
        tensor = tensor.float() + arch.norm_shift
    return tensor.contiguous().numpy() if quantized else _encode_float(tensor, entry.kind)[0]


def _plan(shards: _Shards, config: dict[str, Any], arch: Architecture, embedding_type: str, base_type: str) -> list[_Entry]:
    """Every tensor of the output with its llama.cpp name and type, in the shards' order (a layer's merged experts where
    its first expert is)."""
    import gguf

    n_blocks = int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    planned: list[_Entry | str] = []
    experts: dict[str, list[tuple[int, str, Any, str, tuple[int, ...]]]] = {}  # merged name -> its experts' parts
    for key, handle in shards:
        module, mark, kind = key.partition(QUANTIZED_MARK)
        shape = shards.shape(key, handle)
        if mark:
            shape = tuple(gguf.quant_shape_from_byte_shape(shape, gguf.GGMLQuantizationType[kind.upper()]))
        expert = EXPERT.match(module if mark else key.removesuffix(".weight")) if mark or key.endswith(".weight") else None
        if expert:
            name = gguf_tensor_name(f"{expert['prefix']}.{expert['proj']}.weight", n_blocks, arch)
            if name not in experts:
                planned.append(name)
            experts.setdefault(name, []).append((int(expert["expert"]), key, handle, kind, shape))
            continue
        name = gguf_tensor_name(module + ".weight" if mark else key, n_blocks, arch)
        if not mark:
            kind = float_type(name, shape, tied, base_type)
            if embedding_type != "auto" and name in ("token_embd.weight", "output.weight"):
                kind = embedding_type
        planned.append(_Entry(((key, handle, bool(mark)),), name, kind, shape))
    count = expert_count(config)
    return [e if isinstance(e, _Entry) else _merge_experts(e, experts[e], count) for e in planned]


def _merge_experts(name: str, parts: list[tuple[int, str, Any, str, tuple[int, ...]]], count: int) -> _Entry:
    """The `count` experts of one projection as one tensor ``(E, out, in)`` of one type: their block type, F16 when all
    are float (experts left in float beside quantized ones are rounded to the type, with a warning)."""
    parts = sorted(parts, key=lambda part: part[0])
    if [part[0] for part in parts] != list(range(count)):
        raise CheckpointError(f"{name}: the output holds {len(parts)} of the layer's {count} experts; GGUF keeps a "
                              "layer's experts in one tensor, so every expert must be written")
    kinds = sorted({kind for *_, kind, _ in parts if kind})
    shapes = {shape for *_, shape in parts}
    if len(kinds) > 1 or len(shapes) > 1:
        raise CheckpointError(f"{name}: its experts were written as {', '.join(kinds) or 'float'} with shapes "
                              f"{sorted(shapes)}; a GGUF tensor holds one type, so give every expert of a projection the "
                              "same bits and group size")
    kind = kinds[0] if kinds else "f16"
    left = sum(1 for *_, k, _ in parts if not k)
    if kinds and left:
        log.warning("%s: %d experts left in float are written as %s by round-to-nearest (a GGUF tensor holds one type)",
                    name, left, kind.upper())
    return _Entry(tuple((key, handle, bool(k)) for _, key, handle, k, _ in parts), name, kind, (count, *shapes.pop()))


def _add_deepseek(writer: Any, config: dict[str, Any]) -> None:
    """DeepSeek-V3 as llama.cpp's deepseek2 without absorbed MLA (``attn_kv_b`` whole): latent ranks, head widths, the
    leading dense layers, and the routing (sigmoid scores, expert groups, the weights' norm and scale)."""
    import gguf

    writer.add_leading_dense_block_count(int(config.get("first_k_dense_replace", 0)))
    if config.get("q_lora_rank"):
        writer.add_q_lora_rank(int(config["q_lora_rank"]))
    writer.add_kv_lora_rank(int(config["kv_lora_rank"]))
    writer.add_key_length(int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"]))
    writer.add_value_length(int(config["v_head_dim"]))
    writer.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", True)))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(int(config.get("n_group") or 1))
    writer.add_expert_group_used_count(int(config.get("topk_group") or 1))


def _byte_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    import gguf

    return tuple(gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[kind.upper()]))


def _add_hyperparameters(writer: Any, config: dict[str, Any], arch: Architecture) -> None:
    """The keys llama.cpp's converter writes for the architecture (Gemma-3: no vocab size or rope dimensions, always
    key/value lengths, the sliding window; MoE: expert counts and widths)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    gemma = arch.gguf_arch == "GEMMA3"
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if gemma:
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        writer.add_sliding_window(int(config["sliding_window"]))
    else:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
    if arch.gguf_arch == "DEEPSEEK2":
        _add_deepseek(writer, config)
    elif gemma or head_dim != int(config["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if expert_count(config):  # llama.cpp's MoE keys: a routed expert's width, and the shared expert's
        writer.add_expert_count(expert_count(config))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
