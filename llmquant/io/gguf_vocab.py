"""The vocabulary of a Hugging Face tokenizer as llama.cpp's converter writes it into GGUF.

A byte-level BPE (GPT-2 style) goes in as ``gpt2`` with merges and ``tokenizer.ggml.pre``, the
pre-tokenizer named by the same token-hash check llama.cpp uses; a SentencePiece-style BPE (byte
fallback: Gemma, Llama-2, Mistral) as ``llama`` with scores. Special ids, add_bos/eos and the chat
template come from gguf-py's ``SpecialVocab`` and from what the tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["add_tokenizer"]

log = logging.getLogger(__name__)

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


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
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
