"""The real client: transformers + optimum + gptqmodel load our GPTQ output on CPU.

Their logits must match llmquant's own dequantized model. The tiny model's dimensions are
multiples of 128, as the loaders' kernels want.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmquant.api import quantize
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

pytest.importorskip("gptqmodel", reason="the GPTQ loader tests need `pip install -e .[dev]` (gptqmodel)")
pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 17, 99, 123, 4]])

CASES: dict[str, dict[str, Any]] = {
    "w4-g64-sym": {"bits": 4, "group_size": 64, "symmetric": True},
    "w4-g64-asym": {"bits": 4, "group_size": 64, "symmetric": False},
    "w8-g128-sym": {"bits": 8, "group_size": 128, "symmetric": True},
    "w3-g128-sym": {"bits": 3, "group_size": 128, "symmetric": True},
    "w4-ignore-q_proj": {"bits": 4, "group_size": 64, "ignore": [r"self_attn\.q_proj$"]},
    "gptq-w4": {"algo": "gptq", "bits": 4, "group_size": 64},
    "gptq-w4-desc-act": {"algo": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "act_group_aware": False},
    "gptq-w4-static-groups": {"algo": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "static_groups": True,
                              "act_group_aware": False},
    "gptq-w4-asym-desc-act": {"algo": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "desc_act": True,
                              "act_group_aware": False},
    # block transforms: the same architecture with new weights, which the loaders take unchanged
    "awq-gptq-w4": {"algo": "gptq", "bits": 4, "group_size": 64, "transforms": ["awq"]},
    "rotate-rtn-w4": {"bits": 4, "group_size": 64, "transforms": ["rotate"]},
    "rotate-gptaq-w4": {"algo": "gptq", "bits": 4, "group_size": 64, "transforms": ["rotate"], "gptaq": True},
}


@pytest.fixture(scope="module")
def skewed_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama where one group holds only positive weights, so asymmetric zeros get clamped to 1."""
    from conftest import save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("skewed"))
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key][:4, :64] = tensors[key][:4, :64].abs() + 0.01
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_gptqmodel_logits_match_ours(case: str, skewed_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / case
    settings = dict(CASES[case])
    if settings.get("algo") == "gptq" or "awq" in settings.get("transforms", ()):
        from conftest import calibration_file

        settings.update(calib=str(calibration_file(tmp_path)), calib_samples=16, calib_seqlen=64)
    quantize(skewed_llama, out, settings, plugins=pm)
    if settings.get("desc_act") and not settings.get("static_groups"):
        import json

        assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    assert any("gptqmodel" in type(m).__module__ for m in theirs.modules()), "transformers did not use gptqmodel's kernel"
    if case == "w4-ignore-q_proj":  # the same Linear kept in float in every block: modules_in_block_to_quantize
        assert type(theirs.get_submodule("model.layers.1.self_attn.q_proj")) is torch.nn.Linear
    ours = load_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        expected = ours(IDS).logits.float().flatten()
        got = theirs(IDS).logits.float().flatten()
    cosine = torch.nn.functional.cosine_similarity(expected, got, dim=0).item()
    assert cosine >= 0.9999, f"{case}: cosine {cosine:.6f}"


def test_gptqmodel_native_loader_honours_per_module_rules(skewed_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    """Per-layer ignores and 8-bit overrides are gptqmodel `dynamic` rules (vLLM reads the same)."""
    from gptqmodel import GPTQModel

    out = tmp_path / "mixed"
    settings = {"bits": 4, "group_size": 64, "ignore": [r"layers\.0\.self_attn\.q_proj$"],
                "overrides": [{"pattern": r"down_proj$", "bits": 8}]}
    quantize(skewed_llama, out, settings, plugins=pm)
    theirs = GPTQModel.load(str(out), device="cpu", dtype=torch.float16).model
    assert type(theirs.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert theirs.get_submodule("model.layers.1.self_attn.q_proj").bits == 4
    assert theirs.get_submodule("model.layers.1.mlp.down_proj").bits == 8
    ours = load_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(ours(IDS).logits.flatten(), theirs(IDS).logits.float().flatten(), dim=0)
    assert cosine.item() >= 0.9999
