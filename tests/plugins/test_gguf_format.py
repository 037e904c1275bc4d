"""The GGUF format on tiny random Llamas: what the file holds, that its Linears are llmquant's own
results bit for bit, that transformers' GGUF loader reproduces llmquant's logits, and what is
refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_bpe_model
from llmquant.api import quantize
from llmquant.errors import CheckpointError, ConfigError
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

gguf = pytest.importorskip("gguf")

LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("llama_bpe") / "m", vocab=512)


@pytest.fixture(scope="module")
def q4_0(llama_bpe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "q4_0"
    quantize(llama_bpe, out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32})
    return out


def test_the_folder_holds_model_gguf_its_record_and_a_modelfile(q4_0: Path) -> None:
    files = sorted(p.name for p in q4_0.iterdir())
    assert "model.gguf" in files and "Modelfile" in files and "llmquant.json" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith(".safetensors") or f.endswith(".index.json")]
    modelfile = (q4_0 / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"") and 'PARAMETER stop "<|im_end|>"' in modelfile
    quant = json.loads((q4_0 / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["gguf_file"], quant["gguf_type"]) == ("gguf", "model.gguf", "q4_0")


def test_tensors_metadata_and_tokenizer_are_llama_cpps(q4_0: Path, llama_bpe: Path) -> None:
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(q4_0 / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for block in range(2):
        assert all(types[f"blk.{block}.{name}.weight"] == "Q4_0" for name in LINEARS.values())
        assert types[f"blk.{block}.attn_norm.weight"] == types[f"blk.{block}.ffn_norm.weight"] == "F32"
    # untied: the embedding in the base type, the head Q8_0 (its 128-wide rows do not fill a 256-element super-block)
    assert (types["token_embd.weight"], types["output.weight"], types["output_norm.weight"]) == ("Q4_0", "Q8_0", "F32")
    assert len(types) == 2 * 9 + 3
    field = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert field["general.architecture"] == "llama" and field["general.file_type"] == 2
    assert (field["llama.block_count"], field["llama.embedding_length"], field["llama.feed_forward_length"]) == (2, 128, 256)
    assert (field["llama.attention.head_count"], field["llama.attention.head_count_kv"], field["llama.context_length"]) == (4, 2, 128)
    assert field["llama.rope.dimension_count"] == 32 and field["llama.rope.freq_base"] == 10000.0
    tokens, kinds = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    tokenizer = AutoTokenizer.from_pretrained(llama_bpe)
    n = len(tokenizer)
    assert n < 512 and tokens[:n] == [tokenizer.convert_ids_to_tokens(i) for i in range(n)]
    assert len(tokens) == 512 and tokens[n] == f"[PAD{n}]" and kinds[n] == gguf.TokenType.UNUSED  # padded to the embedding
    assert kinds[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "default"
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id and field["tokenizer.ggml.add_bos_token"] is False
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0
    assert field["tokenizer.chat_template"].startswith("{% for m in messages %}")


def _rope_order_undone(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k rows back in the checkpoint's order (an independent spelling of the inverse permutation)."""
    half = rows.shape[0] // heads // 2
    order = [h * 2 * half + (i % 2) * half + i // 2 for h in range(heads) for i in range(2 * half)]
    back = np.empty_like(rows)
    back[order] = rows
    return back


def test_every_linear_is_llmquants_own_result_bit_for_bit(q4_0: Path, llama_bpe: Path, tmp_path: Path, pm: Plugins) -> None:
    reference = tmp_path / "gptq"
    quantize(llama_bpe, reference, {"group_size": 32}, plugins=pm)  # the same codes in the GPTQ format
    ours = load_quantized(reference, dtype=torch.float32, kernel="dequant")
    reader = gguf.GGUFReader(str(q4_0 / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for block in range(2):
        for module, name in LINEARS.items():
            t = tensors[f"blk.{block}.{name}.weight"]
            weight = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # gguf-py's reading, not ours
            if name in ("attn_q", "attn_k"):
                weight = _rope_order_undone(weight, 4 if name == "attn_q" else 2)
            expected = ours.get_submodule(f"model.layers.{block}.{module}").dequantize()
            assert np.array_equal(weight, expected.numpy()), f"blk.{block}.{name}"


def test_llmquants_runtime_reads_its_gguf_back_exactly(q4_0: Path, tmp_path: Path, llama_bpe: Path, pm: Plugins) -> None:
    out = tmp_path / "f32-embedding"
    quantize(llama_bpe, out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32, "gguf_embedding_type": "f32"}, plugins=pm)
    reference = tmp_path / "gptq"
    quantize(llama_bpe, reference, {"group_size": 32}, plugins=pm)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_quantized(out, dtype=torch.float32, kernel="dequant")(ids).logits
        expected = load_quantized(reference, dtype=torch.float32, kernel="dequant")(ids).logits
    assert torch.equal(ours, expected)


def test_transformers_gguf_loader_reproduces_llmquants_logits(q4_0: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    theirs = AutoModelForCausalLM.from_pretrained(q4_0, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = load_quantized(q4_0, dtype=torch.float32, kernel="dequant")(ids).logits
        got = theirs(ids).logits
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    assert cosine >= 0.9999 and torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("settings,error,match", [
    ({"gguf_type": "q4_0", "symmetric": False}, ConfigError, "q4_1, q5_0, q8_0"),
    ({"gguf_type": "q8_0", "bits": 8, "symmetric": False}, ConfigError, "none"),
    ({"gguf_type": "q3_k"}, ConfigError, "auto, q4_0"),
    ({"gguf_type": "q4_k", "group_size": 64}, ConfigError, "--group-size 32"),
    ({"gguf_type": "q4_k", "symmetric": False}, ConfigError, "drop --asym"),
    ({"bits": 8, "symmetric": False}, ConfigError, "fit none"),
    ({"algo": "gptq", "desc_act": True, "calib": "unused.txt"}, ConfigError, "act-order"),
])
def test_settings_gguf_cannot_hold_are_refused_before_any_work(llama_bpe: Path, tmp_path: Path, settings: dict,
                                                                 error: type, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        quantize(llama_bpe, out, {"format": "gguf", "group_size": 32, **settings})
    assert not out.exists()


def test_models_gguf_cannot_describe_are_refused_before_any_work(tiny_model_factory: object, tmp_path: Path) -> None:
    opt = tiny_model_factory("opt")  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="not 'opt'"):
        quantize(opt, tmp_path / "a", {"format": "gguf", "group_size": 32})
    word_level = tiny_model_factory("llama")  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="writes BPE tokenizers"):
        quantize(word_level, tmp_path / "b", {"format": "gguf", "group_size": 32})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def gemma3_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("gemma3_bpe") / "m", "gemma3_text", layers=6, vocab=512)


def test_gemma3_norms_carry_their_one_and_read_back_exactly(gemma3_bpe: Path, tmp_path: Path, pm: Plugins) -> None:
    from safetensors import safe_open

    out = tmp_path / "gemma3"
    quantize(gemma3_bpe, out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32, "gguf_embedding_type": "f32"}, plugins=pm)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    field = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
    assert field["general.architecture"] == "gemma3" and field["gemma3.attention.sliding_window"] == 16
    assert (field["gemma3.attention.key_length"], field["gemma3.attention.value_length"]) == (32, 32)
    assert field["gemma3.rope.freq_base"] == 1_000_000.0 and "gemma3.vocab_size" not in field  # as llama.cpp's converter
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied
    with safe_open(str(next(gemma3_bpe.glob("*.safetensors"))), framework="pt") as f:
        for key, name in [("model.norm.weight", "output_norm.weight"), ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                          ("model.layers.5.self_attn.q_norm.weight", "blk.5.attn_q_norm.weight"),
                          ("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight")]:
            assert np.array_equal(tensors[name], f.get_tensor(key).float().numpy() + 1), name
    reference = tmp_path / "gptq"
    quantize(gemma3_bpe, reference, {"group_size": 32}, plugins=pm)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_quantized(out, dtype=torch.float32, kernel="dequant")(ids).logits
        expected = load_quantized(reference, dtype=torch.float32, kernel="dequant")(ids).logits
    assert torch.equal(ours, expected)
    from transformers import AutoModelForCausalLM

    # transformers' GGUF reader leaves query_pre_attn_scalar at its default (256); llama.cpp uses head_dim, as here
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32, query_pre_attn_scalar=32)
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("change,match", [
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    ({"layer_types": ["full_attention"] * 6}, "every 6th"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                          "sliding_attention": {"rope_theta": 5e4, "rope_type": "default"}}}, "base 10000"),
])
def test_gemma3_settings_llama_cpp_fixes_are_refused(gemma3_bpe: Path, tmp_path: Path, change: dict, match: str) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(gemma3_bpe, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=match):
        quantize(folder, tmp_path / "out", {"format": "gguf", "group_size": 32})
    assert not (tmp_path / "out").exists()


def test_cli_flags_and_a_killed_run_resumed_give_the_same_file(llama_bpe: Path, tmp_path: Path, q4_0: Path) -> None:
    args = ["--format", "gguf", "--gguf-type", "q4_0", "--group-size", "32"]

    def run(out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LLMQUANT_KILL_AT"} | ({"LLMQUANT_KILL_AT": kill_at} if kill_at else {})
        return subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", str(llama_bpe), "-o", str(out), *args, *extra],
                              capture_output=True, text=True, env=env)

    out = tmp_path / "out"
    assert run(out, kill_at="block-1").returncode == -9 and not out.exists()
    done = run(out, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    digest = lambda p: hashlib.sha256((p / "model.gguf").read_bytes()).hexdigest()  # noqa: E731
    assert digest(out) == digest(q4_0)


def test_a_run_whose_gguf_writing_fails_resumes_without_requantizing(llama_bpe: Path, tmp_path: Path, q4_0: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume state outlives the format's finish step: a failure while writing model.gguf (found when Qwen2.5's
    head failed to encode after a 40-minute GPTQ run) loses no block, and --resume gives the same file."""
    import llmquant.io.gguf_model as gguf_model
    from llmquant.host import runner

    out = tmp_path / "out"
    write = gguf_model.write_gguf
    monkeypatch.setattr("llmquant_plugins.gguf_format.write_gguf", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        quantize(llama_bpe, out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32})
    partial = next(tmp_path.glob(".out*partial*"))
    assert json.loads((partial / "stream.json").read_text())["writer"] == {"closed": True}  # every block is in the shards
    monkeypatch.setattr("llmquant_plugins.gguf_format.write_gguf", write)
    quantized = []
    block = runner.uncalibrated_block
    monkeypatch.setattr(runner, "uncalibrated_block", lambda job, item: quantized.append(item[0]) or block(job, item))
    quantize(llama_bpe, out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32}, resume=True)
    assert quantized == []  # both blocks were done: nothing quantized again
    assert (out / "model.gguf").read_bytes() == (q4_0 / "model.gguf").read_bytes()


def test_q4_k_holds_the_algorithms_grid_codes_and_falls_back_where_rows_do_not_fill_super_blocks(
        llama_bpe: Path, tmp_path: Path, pm: Plugins) -> None:
    from safetensors.torch import load_file

    from llmquant_plugins.rtn import RTN, RTNConfig

    out = tmp_path / "q4_k"
    quantize(llama_bpe, out, {"format": "gguf", "gguf_type": "q4_k", "group_size": 32,
                              "overrides": [{"pattern": r"layers\.1\.mlp\.down_proj", "bits": 6, "group_size": 16}]}, plugins=pm)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    # down_proj reads 256 inputs: one super-block; the rest read 128, where llama.cpp falls back too (here: exact Q4_0)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_K" and tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q6_K"
    assert {tensors[f"blk.0.{n}.weight"].tensor_type.name for n in LINEARS.values() if n != "ffn_down"} == {"Q4_0"}
    assert reader.fields["general.file_type"].contents() == 14  # MOSTLY_Q4_K_S
    source = {k: v for shard in llama_bpe.glob("*.safetensors") for k, v in load_file(shard).items()}
    for block, bits, group, levels in ((0, 4, 32, 63), (1, 6, 16, 127)):
        t = tensors[f"blk.{block}.ffn_down.weight"]
        config = RTNConfig(bits=bits, group_size=group, scale_grid=(256, levels))
        expected = RTN().quantize_weight(source[f"model.layers.{block}.mlp.down_proj.weight"], config, None).dequantize()
        assert np.array_equal(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), expected.numpy())
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ours = load_quantized(out, dtype=torch.float32, kernel="dequant")(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_inspect_reads_the_sizes_from_model_gguf(q4_0: Path) -> None:
    from llmquant.describe import describe_output

    described = describe_output(q4_0)
    q_proj = next(m for m in described["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["format"] == "gguf" and q_proj["bytes"] == 128 * 128 // 32 * 18  # Q4_0: 18 bytes per 32 weights
    assert described["total_bytes"] > described["linear_bytes"] > 0
