"""A Hugging Face folder of llmquant tensors -> one GGUF file llama.cpp and Ollama load.

The host writes its usual shards first; quantized Linears are there already as GGUF block rows,
under ``{module}.gguf.{type}`` (uint8, ``(out, row bytes)``; `llmquant.io.gguf_blocks`). This
module streams those shards, one tensor at a time, into ``model.gguf`` with llama.cpp's names,
hyperparameters and tokenizer, as llama.cpp's ``convert_hf_to_gguf.py`` would write them:

- names through gguf-py's tensor map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``);
- Llama's q/k rows permuted into llama.cpp's rope order (rows, so the blocks move whole);
  Gemma-3's norms stored with the 1 its RMSNorm adds (``x * (1 + w)`` -> ``w + 1``);
- norms, biases and other 1-D tensors in F32; float 2-D tensors (a Linear kept in float) in F16;
  the embedding and output head in their own type (llama.cpp's choice by default);
- the vocabulary padded to the embedding's rows: a byte-level BPE (GPT-2 style) as ``gpt2`` with
  merges and ``tokenizer.ggml.pre`` identified by the same token-hash check llama.cpp uses; a
  SentencePiece-style BPE (byte fallback) as ``llama`` with scores; special ids and the chat template.
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
    norm_shift: float = 0.0  # added to every ``*norm.weight`` (Gemma's RMSNorm multiplies by 1 + w)

    def shifts(self, key: str) -> bool:
        return self.norm_shift != 0.0 and key.endswith("norm.weight")


ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),
    "gemma3_text": Architecture("GEMMA3", permute_qk=False, norm_shift=1.0),
}
GEMMA3_SLIDING_THETA = 10000.0  # llama.cpp's fixed rope base of Gemma-3's sliding-window layers
GEMMA3_PATTERN = 6  # llama.cpp's Gemma-3: every sixth layer attends globally

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
    if config.get("model_type") == "gemma3_text":
        _check_gemma3(config)
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
    _add_hyperparameters(writer, config, arch)
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
        if arch.shifts(entry.key):
            tensor = tensor.float() + arch.norm_shift
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


def _add_hyperparameters(writer: Any, config: dict[str, Any], arch: Architecture) -> None:
    """The keys llama.cpp's converter writes for the architecture (Gemma-3: no vocab size or rope dimensions, always
    key/value lengths, the sliding window)."""
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
    if gemma or head_dim != int(config["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's converter writes it, padded to the embedding's rows: ``gpt2`` (byte-level BPE,
    with merges and ``pre``) or ``llama`` (SentencePiece-style BPE with byte fallback, with scores)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    sentencepiece = bool(spec["model"].get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    reverse = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types, scores = [], [], []
    normal = 0
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _is_byte_token(token):
            types.append(gguf.TokenType.BYTE)
        elif sentencepiece and len(token) > 1 and token.strip("\u2581") == "":
            # SentencePiece learns "▁" only as a piece's first character: a run of them is a user-defined symbol,
            # which llama.cpp matches in the raw text, so it is written with spaces (as llama.cpp's converter does)
            types.append(gguf.TokenType.USER_DEFINED)
            token = token.replace("\u2581", " ")
        else:
            types.append(gguf.TokenType.NORMAL)
        # SentencePiece's BPE pieces are numbered in merge order: score = -rank keeps llama.cpp's merge priority
        scores.append(-float(normal) if types[-1] == gguf.TokenType.NORMAL else
                      0.0 if types[-1] == gguf.TokenType.BYTE else -1000.0)
        normal += types[-1] == gguf.TokenType.NORMAL
        tokens.append(token)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece else _pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    if sentencepiece:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_add_space_prefix(_prepends_space(spec))
    vocab_specials = gguf.SpecialVocab(folder, load_merges=not sentencepiece, n_vocab=len(tokens))
    # what the tokenizer does, not what its config may leave unsaid (SmolLM2 and Qwen2 add no BOS, Gemma-3 does)
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab_specials.add_special_token["bos"] = bos is not None and ids[:1] == [bos]
    if sentencepiece:
        vocab_specials.add_special_token["sep"] = False
        vocab_specials.add_special_token["eos"] = eos is not None and ids[-1:] == [eos]
    vocab_specials.add_to_gguf(writer)


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (Llama-2, Mistral; not Gemma)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


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
