"""GGUF output of mixture-of-experts models: a layer's experts merged per projection, as llama.cpp reads them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_bpe_moe
from llmquant.api import quantize
from llmquant.errors import CheckpointError, ConfigError
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

gguf = pytest.importorskip("gguf")

# per architecture: llama.cpp's name, and the checkpoint's (gate, up, down) projection names
ARCHS = {"mixtral": ("llama", ("w1", "w3", "w2")), "qwen2_moe": ("qwen2moe", ("gate_proj", "up_proj", "down_proj")),
         "qwen3_moe": ("qwen3moe", ("gate_proj", "up_proj", "down_proj")),
         "deepseek_v3": ("deepseek2", ("gate_proj", "up_proj", "down_proj"))}
MERGED = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(scope="module", params=list(ARCHS))
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Path]:
    """(arch, the model, its GGUF Q4_0 output with a float embedding and head, the same codes in the GPTQ format)."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = save_tiny_bpe_moe(root / "m", arch)
    quantize(model, root / "gguf", {"format": "gguf", "gguf_type": "q4_0", "group_size": 32, "gguf_embedding_type": "f32"})
    quantize(model, root / "gptq", {"group_size": 32})
    return arch, model, root / "gguf", root / "gptq"


def _metadata(reader: object, key: str) -> object:
    field = reader.fields[key]  # type: ignore[attr-defined]
    return field.contents()


def test_experts_merge_per_projection_bit_for_bit_with_llama_cpps_keys(moe: tuple[str, Path, Path, Path]) -> None:
    arch, model, out, reference = moe
    gguf_arch, projections = ARCHS[arch]
    config = json.loads((model / "config.json").read_text())
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert _metadata(reader, "general.architecture") == gguf_arch
    assert _metadata(reader, f"{gguf_arch}.expert_count") == 8 and _metadata(reader, f"{gguf_arch}.expert_used_count") == 2
    if arch != "mixtral":
        assert _metadata(reader, f"{gguf_arch}.expert_feed_forward_length") == config["moe_intermediate_size"]
    if arch == "deepseek_v3":  # a dense first layer, latent attention, grouped sigmoid routing with a score bias
        assert _metadata(reader, f"{gguf_arch}.leading_dense_block_count") == 1
        assert _metadata(reader, f"{gguf_arch}.attention.kv_lora_rank") == 32 and _metadata(reader, f"{gguf_arch}.attention.key_length") == 48
        assert _metadata(reader, f"{gguf_arch}.expert_gating_func") == 2 and _metadata(reader, f"{gguf_arch}.expert_group_count") == 2
        assert _metadata(reader, f"{gguf_arch}.expert_weights_scale") == pytest.approx(config["routed_scaling_factor"])
        assert tensors["blk.1.exp_probs_b.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    if arch == "qwen2_moe":
        assert _metadata(reader, f"{gguf_arch}.expert_shared_feed_forward_length") == 128
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    ours = load_quantized(reference, dtype=torch.float32, kernel="dequant")
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    for block in range(1, 3) if arch == "deepseek_v3" else range(2):
        router = tensors[f"blk.{block}.ffn_gate_inp.weight"]
        assert router.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(router.data), ours.get_submodule(f"model.layers.{block}.mlp.gate").weight.detach().numpy())
        for merged, projection in zip(MERGED, projections):
            t = tensors[f"blk.{block}.{merged}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            shape = (128, width) if merged != "ffn_down_exps" else (width, 128)
            assert [int(n) for n in t.shape] == [*shape, 8]  # ggml's order: (in, out, experts)
            weights = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # gguf-py's reading, not ours
            for e in range(8):
                expected = ours.get_submodule(f"model.layers.{block}.mlp.experts.{e}.{projection}").dequantize()
                assert np.array_equal(weights[e], expected.numpy()), f"blk.{block}.{merged}[{e}]"


def test_llmquants_runtime_reads_its_moe_gguf_back_exactly(moe: tuple[str, Path, Path, Path]) -> None:
    _, _, out, reference = moe
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_quantized(out, dtype=torch.float32, kernel="dequant")(ids).logits
        expected = load_quantized(reference, dtype=torch.float32, kernel="dequant")(ids).logits
    assert torch.allclose(ours, expected, rtol=0, atol=1e-5)  # the same weights; routed sums may differ in the last bit


def test_transformers_expert_names_and_a_missing_run_record_read_back(tmp_path: Path, pm: Plugins) -> None:
    model = save_tiny_bpe_moe(tmp_path / "m", "mixtral")
    out = tmp_path / "out"
    quantize(model, out, {"format": "gguf", "gguf_type": "q8_0", "bits": 8, "group_size": 32, "expert_names": "transformers"},
             plugins=pm)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_quantized(out, dtype=torch.float32, kernel="dequant", plugins=pm)(ids).logits
        (out / "llmquant.json").unlink()  # the experts' names then default to transformers' own
        again = load_quantized(out, dtype=torch.float32, kernel="dequant", plugins=pm)(ids).logits
    assert torch.equal(expected, again)


def test_an_expert_left_in_float_is_rounded_into_its_merged_tensor_with_a_warning(
        tmp_path: Path, pm: Plugins, caplog: pytest.LogCaptureFixture) -> None:
    model = save_tiny_bpe_moe(tmp_path / "m", "qwen3_moe")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        quantize(model, out, {"format": "gguf", "gguf_type": "q4_0", "group_size": 32, "ignore": [r"layers\.0\.mlp\.experts\.3\."]},
                 plugins=pm)
    assert "1 experts left in float are written as Q4_0" in caplog.text
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)[3]
    from safetensors import safe_open

    with safe_open(str(next(model.glob("*.safetensors"))), framework="pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.experts.3.up_proj.weight").float().numpy()
    blocks = np.abs(weight.reshape(-1, 32)).max(axis=1, keepdims=True)  # Q4_0's step is |max| / 8 per block of 32
    error = np.abs(got.reshape(-1, 32) - weight.reshape(-1, 32))
    assert (error <= blocks / 8 + 1e-4).all() and error.mean() < blocks.mean() / 24  # round-to-nearest: a quarter step on average


def test_experts_of_one_projection_planned_in_two_types_are_refused_before_any_work(tmp_path: Path, pm: Plugins) -> None:
    model = save_tiny_bpe_moe(tmp_path / "m", "qwen3_moe")
    settings = {"format": "gguf", "group_size": 32, "overrides": [{"pattern": r"experts\.5\.down_proj$", "bits": 8}]}
    with pytest.raises(ConfigError, match=r"the same bits and type for every expert of model\.layers\.0\.mlp\.experts\.N\.down_proj"):
        quantize(model, tmp_path / "out", settings, plugins=pm)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch,change,match", [
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob True"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob False"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "dense MLP layers"),
    ("qwen2_moe", {"tie_word_embeddings": True}, "tied output head"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave false"),
])
def test_moe_settings_llama_cpp_fixes_are_refused_before_any_work(arch: str, change: dict, match: str, tmp_path: Path,
                                                                   pm: Plugins) -> None:
    model = save_tiny_bpe_moe(tmp_path / "m", arch)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=match):
        quantize(model, tmp_path / "out", {"format": "gguf", "group_size": 32}, plugins=pm)
    assert not (tmp_path / "out").exists()
