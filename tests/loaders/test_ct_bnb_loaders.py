"""The real clients of the other formats: transformers + compressed-tensors, and transformers +
bitsandbytes on CPU, load our output; their logits must match llmquant's own dequantization.

The tiny model's dimensions are multiples of 128, as the loaders' kernels want.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmquant.api import quantize
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 17, 99, 123, 4]])

CT_CASES: dict[str, dict[str, Any]] = {
    "rtn-w4-g64-sym": {"bits": 4, "group_size": 64},
    "groupwise-w4-g64-asym": {"algo": "groupwise-int4", "bits": 4, "group_size": 64, "symmetric": False},
    "rtn-w8-channel-asym": {"bits": 8, "group_size": None, "symmetric": False},
    "gptq-w4-static-groups": {"algo": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "static_groups": True,
                              "act_group_aware": False},
    "rtn-w4-ignore-q_proj": {"bits": 4, "group_size": 128, "ignore": [r"self_attn\.q_proj$"]},
    "awq-rtn-w4": {"bits": 4, "group_size": 64, "transforms": ["awq"]},
    "rotate-gptq-w4": {"algo": "gptq", "bits": 4, "group_size": 64, "transforms": ["rotate"]},
}

BNB_CASES: dict[str, dict[str, Any]] = {
    "nf4-bs64": {"algo": "nf4"},
    "nf4-bs64-double-quant": {"algo": "nf4", "double_quant": True},
    "fp4-bs128-double-quant": {"algo": "nf4", "codebook": "fp4", "blocksize": 128, "double_quant": True},
    "nf4-ignore-down_proj": {"algo": "nf4", "ignore": [r"mlp\.down_proj$"]},
    "awq-nf4": {"algo": "nf4", "transforms": ["awq"]},
}


def _cosine(ours: Any, theirs: Any) -> float:
    with torch.no_grad():
        expected = ours(IDS).logits.float().flatten()
        got = theirs(IDS).logits.float().flatten()
    return torch.nn.functional.cosine_similarity(expected, got, dim=0).item()


def _quantize(case: dict[str, Any], source: Path, out: Path, tmp_path: Path, pm: Plugins) -> None:
    settings = dict(case)
    if settings.get("algo") == "gptq" or "awq" in settings.get("transforms", ()):
        from conftest import calibration_file

        settings.update(calib=str(calibration_file(tmp_path)), calib_samples=16, calib_seqlen=64)
    quantize(source, out, settings, plugins=pm)


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_logits_match_ours(case: str, tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    pytest.importorskip("compressed_tensors", reason="needs `pip install -e .[dev]` (compressed-tensors)")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / case
    _quantize({**CT_CASES[case], "format": "compressed-tensors"}, tiny_llama, out, tmp_path, pm)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] is None and not any(k.endswith("weight_g_idx") for k in _keys(out))
    # transformers 5.24 + compressed-tensors 0.20 cannot run asymmetric checkpoints compressed;
    # decompressing on load (run_compressed=False) is the documented path and checks the same bytes.
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    if "ignore" in CT_CASES[case]:
        q_proj = theirs.get_submodule("model.layers.1.self_attn.q_proj").weight
        assert torch.equal(q_proj, load_quantized(out).get_submodule("model.layers.1.self_attn.q_proj").weight)
    cosine = _cosine(load_quantized(out, dtype=torch.float32), theirs)
    assert cosine >= 0.9999, f"{case}: cosine {cosine:.6f}"


def _keys(folder: Path) -> list[str]:
    from llmquant.host.checkpoint import Checkpoint

    return list(Checkpoint(folder))


def test_compressed_tensors_act_order_writes_g_idx_that_0_20_refuses(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    """Act-order with arbitrary groups needs ``weight_g_idx`` + ``actorder: "group"``, which vLLM's
    compressed-tensors integration reads; compressed-tensors 0.20 (transformers) removed it. We
    write the layout, read it back exactly, and check that the current library's refusal is the
    one our warning names, so a change upstream shows up here."""
    pytest.importorskip("compressed_tensors", reason="needs `pip install -e .[dev]` (compressed-tensors)")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForCausalLM

    from llmquant.host.checkpoint import Checkpoint

    out = tmp_path / "act-order"
    _quantize({"algo": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "act_group_aware": False,
               "format": "compressed-tensors", "symmetric": False}, tiny_llama, out, tmp_path, pm)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    checkpoint = Checkpoint(out)
    p = "model.layers.0.mlp.down_proj"
    g_idx = checkpoint[f"{p}.weight_g_idx"]
    assert not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // 64), "act-order produced a trivial g_idx"
    q = unpack_from_int32(checkpoint[f"{p}.weight_packed"], 4, torch.Size(checkpoint[f"{p}.weight_shape"].tolist()))
    zp = unpack_from_int32(checkpoint[f"{p}.weight_zero_point"], 4, torch.Size(checkpoint[f"{p}.weight_scale"].shape),
                           packed_dim=0)
    scale = checkpoint[f"{p}.weight_scale"].float()
    theirs = (q.float() - zp.float()[:, g_idx.long()]) * scale[:, g_idx.long()]
    ours = load_quantized(out).get_submodule(p).dequantize()
    assert torch.equal(theirs, ours)
    with pytest.raises(Exception, match="actorder='group' has been removed"):
        AutoModelForCausalLM.from_pretrained(out, device_map="cpu")


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_bitsandbytes_logits_match_ours(case: str, tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    pytest.importorskip("bitsandbytes", reason="needs `pip install -e .[dev]` (bitsandbytes)")
    from transformers import AutoModelForCausalLM

    out = tmp_path / case
    _quantize(BNB_CASES[case], tiny_llama, out, tmp_path, pm)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    layer = theirs.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer).__name__ == "Linear4bit", f"transformers loaded {type(layer).__name__}, not bitsandbytes' Linear4bit"
    ours = load_quantized(out, dtype=torch.float32)
    # The loader's weight is bit-identical to ours, not merely close.
    import bitsandbytes.functional as F

    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(weight, ours.get_submodule("model.layers.0.self_attn.q_proj").dequantize())
    cosine = _cosine(ours, theirs)
    assert cosine >= 0.9999, f"{case}: cosine {cosine:.6f}"
