"""A Hugging Face folder of llmquant tensors -> one GGUF file llama.cpp and Ollama load.

The host writes its usual shards first; quantized Linears are there already as GGUF block rows,
under ``{module}.gguf.{type}`` (uint8, ``(out, row bytes)``; `llmquant.io.gguf_blocks`). This
module streams those shards, one tensor at a time, into ``model.gguf`` with llama.cpp's names,
hyperparameters and tokenizer, as llama.cpp's ``convert_hf_to_gguf.py`` would write them:

- names through gguf-py's tensor map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``);
- Llama's q/k rows permuted into llama.cpp's rope order (rows, so the blocks move whole);
- norms, biases and other 1-D tensors in F32; float 2-D tensors (a Linear kept in float) in F16;
  the embedding and output head in their own type (llama.cpp's choice by default);
- the BPE vocabulary padded to the embedding's rows, ``tokenizer.ggml.pre`` identified by the
  same token-hash check llama.cpp uses, merges, special ids and the chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

__all__ = ["ARCHITECTURES", "QUANTIZED_MARK", "check_convertible", "float_type", "gguf_tensor_name", "write_gguf"]

log = logging.getLogger(__name__)

QUANTIZED_MARK = ".gguf."  # {module}.gguf.{type}: a Linear's block rows in the host's shards


@dataclass(frozen=True)
class Architecture:
    """How one transformers ``model_type`` maps onto a llama.cpp architecture."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # Llama: q/k rows into llama.cpp's rope order


ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),
}

# llama.cpp's pre-tokenizer check: the token ids of this text, hashed, name the pre-tokenizer
# (convert_hf_to_gguf.py, get_vocab_base_pre; the hashes are llama.cpp's for these tokenizers).
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}


def architecture_of(config: dict[str, Any]) -> Architecture:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"GGUF output supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}; "
                              "write gptq or compressed-tensors instead")
    return ARCHITECTURES[model_type]


def check_convertible(folder: Path) -> None:
    """Raise CheckpointError, before any work, when the model in `folder` cannot be written as GGUF here."""
    config = json.loads((folder / "config.json").read_text())
    architecture_of(config)
    _rope_theta(config)
    tokenizer = folder / "tokenizer.json"
    model = json.loads(tokenizer.read_text()).get("model", {}) if tokenizer.exists() else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "no tokenizer.json" if not model else f"a {model.get('type')} tokenizer" + \
            (" with byte fallback (SentencePiece-style)" if model.get("byte_fallback") else "")
        raise CheckpointError(f"{folder}: GGUF output writes byte-level BPE tokenizers (GPT-2 style) only, and this model has "
                              f"{kind}; write gptq or compressed-tensors instead")


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise CheckpointError(f"rope scaling {rope or config.get('rope_scaling')} is not written to GGUF yet; "
                              "write gptq or compressed-tensors for this model")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def gguf_tensor_name(key: str, n_blocks: int, arch: Architecture) -> str:
    """Return llama.cpp's name for the checkpoint tensor `key` (``model.norm.weight`` -> ``output_norm.weight``)."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], n_blocks)
    name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CheckpointError(f"{key}: no llama.cpp tensor name for it in the {arch.gguf_arch.lower()} architecture")
    return name


def float_type(name: str, shape: tuple[int, ...], tied: bool, base: str) -> str:
    """llama.cpp's type for a float tensor: the output head (or a tied embedding) Q6_K, or Q8_0 when its rows
    do not fill 256-element super-blocks; an untied embedding the base type; other 2-D tensors F16; 1-D F32."""
    if len(shape) < 2:
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
    """One tensor of the output: where it is in the shards, its llama.cpp name and the type it is written as."""

    key: str
    handle: Any
    name: str
    kind: str  # f32, f16 or a block type
    quantized: bool  # block rows the format already wrote; otherwise a float tensor to encode
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
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, folder, int(config["vocab_size"]))
    entries = _plan(_Shards(folder), config, arch, embedding_type, base_type)
    for entry in entries:  # the header lists every tensor before the first byte of data
        raw = None if entry.kind in ("f32", "f16") else gguf.GGMLQuantizationType[entry.kind.upper()]
        if entry.quantized:
            writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.uint8), int(np.prod(entry.shape)), raw_dtype=raw)
        elif raw is None:
            dtype = np.dtype(np.float32 if entry.kind == "f32" else np.float16)
            writer.add_tensor_info(entry.name, entry.shape, dtype, int(np.prod(entry.shape)) * dtype.itemsize)
        else:
            writer.add_tensor_info(entry.name, _byte_shape(entry.shape, entry.kind), np.dtype(np.uint8),
                                   _byte_size(entry.shape, entry.kind), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads = {"attn_q": int(config["num_attention_heads"]),
             "attn_k": int(config.get("num_key_value_heads") or config["num_attention_heads"])}
    for entry in entries:
        tensor = entry.handle.get_tensor(entry.key)
        role = entry.name.split(".")[-2]
        if arch.permute_qk and role in heads and entry.name.endswith(".weight"):
            tensor = _permute_rows(tensor, heads[role])
        writer.write_tensor_data(tensor.contiguous().numpy() if entry.quantized else _encode_float(tensor, entry.kind)[0])
    writer.close()


def _plan(shards: _Shards, config: dict[str, Any], arch: Architecture, embedding_type: str, base_type: str) -> list[_Entry]:
    """Every tensor of the shards with its llama.cpp name and type, in the shards' order."""
    n_blocks = int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    entries = []
    for key, handle in shards:
        module, mark, kind = key.partition(QUANTIZED_MARK)
        name = gguf_tensor_name(module + ".weight" if mark else key, n_blocks, arch)
        shape = shards.shape(key, handle)
        if not mark:
            kind = float_type(name, shape, tied, base_type)
            if embedding_type != "auto" and name in ("token_embd.weight", "output.weight"):
                kind = embedding_type
        entries.append(_Entry(key, handle, name, kind, bool(mark), shape))
    return entries


def _byte_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    import gguf

    return tuple(gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[kind.upper()]))


def _add_hyperparameters(writer: Any, config: dict[str, Any]) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    theta = _rope_theta(config)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """The BPE vocabulary as llama.cpp's converter writes it (``gpt2`` model, tokens padded to the embedding)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    reverse = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab_specials = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    # what the tokenizer does, not what its config may leave unsaid (SmolLM2 and Qwen2 add no BOS)
    bos = tokenizer.bos_token_id
    vocab_specials.add_special_token["bos"] = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    vocab_specials.add_to_gguf(writer)


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<unused") and token.endswith(">"))


def _pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, from the hash of its ids for a fixed text."""
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        log.warning("the tokenizer's pre-tokenizer (hash %s) is not one llama.cpp knows by name here: wrote "
                    "tokenizer.ggml.pre = default, and llama.cpp may split text differently from transformers", digest[:12])
        return "default"
    return PRE_TOKENIZERS[digest]
