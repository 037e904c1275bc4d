"""The sequential pass gives each Linear the Hessian of its true input: computed with every
earlier block, and every earlier group inside the block, already quantized."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import calibration_file
from llmquant import hookimpl
from llmquant.algorithm import CalibrationStats, UniformQuantized
from llmquant.api import quantize
from llmquant.errors import LlmquantError
from llmquant.plugins import Plugins
from llmquant.uniform import UniformConfig, minmax_quantize

SEEN: dict[str, CalibrationStats] = {}
ORDER: list[str] = []


@dataclass(frozen=True, kw_only=True)
class _Config(UniformConfig):
    pass


class RecordingRTN:
    """Records the statistics it is given, then rounds to nearest."""

    name: ClassVar[str] = "recording-rtn"
    description: ClassVar[str] = "test"
    config_type: ClassVar[type] = _Config
    result_type: ClassVar[type] = UniformQuantized
    needs_calibration: ClassVar[bool] = True

    def quantize_weight(self, W: torch.Tensor, config: Any, stats: CalibrationStats | None) -> UniformQuantized:
        assert stats is not None
        ORDER.append(f"{W.shape}")
        SEEN[f"{len(SEEN)}"] = stats
        return minmax_quantize(W, config.bits, config.group_size, config.symmetric)


@pytest.fixture
def recording(pm: Plugins) -> Plugins:
    @hookimpl
    def llmquant_register_algorithms(register: Any) -> None:
        register(RecordingRTN)

    pm.register(types.SimpleNamespace(llmquant_register_algorithms=llmquant_register_algorithms), "recording")
    SEEN.clear()
    ORDER.clear()
    return pm


def reference_inputs(source: Path, ids: torch.Tensor, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Inputs of every block Linear in a float32 model whose `quantized` Linears hold their RTN weights."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    captured: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            if name in quantized:
                module.weight.data = minmax_quantize(module.weight.data, 4, 64, True).dequantize()
            module.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(name, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    return captured


@pytest.mark.parametrize("mode", ["single-pass", "replay"])
def test_hessians_see_quantized_predecessors(tiny_llama: Path, tmp_path: Path, recording: Plugins, mode: str) -> None:
    calib = calibration_file(tmp_path)
    settings = {"algo": "recording-rtn", "group_size": 64, "calib": str(calib), "calib_samples": 8, "calib_seqlen": 32,
                "calib_batch_size": 3, "calib_dtype": "float32", "calib_mode": mode}
    quantize(tiny_llama, tmp_path / "out", settings, plugins=recording)
    names = [f"model.layers.{b}.{rel}" for b in range(2) for rel in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    stats = dict(zip(names, SEEN.values()))
    assert len(stats) == 14

    from transformers import AutoTokenizer

    from llmquant.host.calibration_data import CalibrationConfig, load_calibration
    ids = load_calibration(CalibrationConfig(calib=str(calib), calib_samples=8, calib_seqlen=32), AutoTokenizer.from_pretrained(tiny_llama))
    # the modules quantized before each one runs, in true-sequential order
    before = {n: set(names[:names.index(n)]) for n in names}
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        for b in range(2):
            first = f"model.layers.{b}.{group[0]}"
            for rel in group:
                before[f"model.layers.{b}.{rel}"] = before[first]
    for name in names:
        X = reference_inputs(tiny_llama, ids, before[name])[name]
        expected = 2 * X.t() @ X / X.shape[0]
        assert stats[name].nsamples == 8 * 32
        torch.testing.assert_close(stats[name].H, expected, rtol=2e-3, atol=2e-4, msg=name)


def test_auto_mode_follows_the_memory_budget(tiny_llama: Path, tmp_path: Path, recording: Plugins,
                                            caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="llmquant.host.calibrate")
    calib = calibration_file(tmp_path)
    base = {"algo": "recording-rtn", "group_size": 64, "calib": str(calib), "calib_samples": 8, "calib_seqlen": 32}
    quantize(tiny_llama, tmp_path / "big", {**base, "calib_memory": "1GB"}, plugins=recording)
    assert "calibration: single pass" in caplog.text
    caplog.clear()
    quantize(tiny_llama, tmp_path / "small", {**base, "calib_memory": "100KB"}, plugins=recording)
    assert "calibration: replay per group" in caplog.text


def test_activations_spill_to_disk_with_the_same_result(tiny_llama: Path, tmp_path: Path, recording: Plugins) -> None:
    calib = calibration_file(tmp_path)
    base = {"algo": "recording-rtn", "group_size": 64, "calib": str(calib), "calib_samples": 8, "calib_seqlen": 32,
            "calib_batch_size": 2, "calib_dtype": "float32"}
    quantize(tiny_llama, tmp_path / "in-memory", base, plugins=recording)
    in_memory = [s.H for s in SEEN.values()]
    SEEN.clear()
    quantize(tiny_llama, tmp_path / "spilled", {**base, "calib_memory": "1KB"}, plugins=recording)
    assert all(torch.equal(a, b.H) for a, b in zip(in_memory, SEEN.values()))
    assert not list(tmp_path.glob(".*activations*"))


def test_gptq_without_calibration_says_how_to_give_it(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    with pytest.raises(LlmquantError, match=r"needs calibration data: pass --calib SOURCE"):
        quantize(tiny_llama, tmp_path / "out", {"algo": "gptq"}, plugins=pm)


def test_too_little_calibration_text_is_named(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    calib = calibration_file(tmp_path, documents=2, words=10)
    with pytest.raises(LlmquantError, match=r"has \d+ tokens, fewer than the 4096"):
        quantize(tiny_llama, tmp_path / "out", {"algo": "gptq", "calib": str(calib), "calib_samples": 8, "calib_seqlen": 512}, plugins=pm)


@pytest.mark.parametrize("variant", [{}, {"desc_act": True}, {"desc_act": True, "static_groups": True}, {"mse": True}],
                         ids=["default", "desc-act", "static-groups", "mse"])
def test_gptq_end_to_end_beats_rtn_on_logits(tiny_llama: Path, tmp_path: Path, pm: Plugins, variant: dict[str, Any]) -> None:
    from llmquant.runtime import load_quantized

    calib = calibration_file(tmp_path, documents=300)
    common = {"bits": 3, "group_size": 64}
    quantize(tiny_llama, tmp_path / "rtn", common, plugins=pm)
    quantize(tiny_llama, tmp_path / "gptq", {**common, "algo": "gptq", "calib": str(calib), "calib_samples": 32,
                                             "calib_seqlen": 64, **variant}, plugins=pm)
    ids = torch.tensor([[int(w[1:]) for w in calib.read_text().split()[:64]]])
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = original(ids).logits
        err = {k: (load_quantized(tmp_path / k)(ids).logits - ref).pow(2).mean().item() for k in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"], err


@pytest.mark.parametrize("width", [100, 512, 1300], ids=lambda w: f"in{w}")
def test_tiled_hessian_equals_the_full_product(width: int) -> None:
    from llmquant.host.calibrate import accumulate_hessian

    x = torch.randn(3, 50, width, dtype=torch.float64).to(torch.bfloat16)
    total = torch.zeros(width, width)
    accumulate_hessian(total, x, tile=256)
    accumulate_hessian(total, x, tile=256)
    rows = x.reshape(-1, width).double()
    torch.testing.assert_close(total.double(), 2 * rows.t() @ rows, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch,expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_sequential_groups_follow_the_data_flow(arch: str, expected: list[list[str]], tiny_model_factory: Any,
                                                tmp_path: Path) -> None:
    """Groups are Linears reading the very same tensor; freed inputs whose memory the allocator
    reuses must not merge groups (o_proj and gate/up once did, on a real model)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmquant.host.arch import build_skeleton, find_blocks
    from llmquant.host.calibrate import SequentialCalibrator
    from llmquant.host.calibration_data import CalibrationConfig, load_calibration
    from llmquant.host.checkpoint import Checkpoint

    source = tiny_model_factory(arch)
    calib = calibration_file(tmp_path)
    samples = load_calibration(CalibrationConfig(calib=str(calib), calib_samples=4, calib_seqlen=32), AutoTokenizer.from_pretrained(source))
    skeleton = build_skeleton(AutoConfig.from_pretrained(source))
    layout = find_blocks(skeleton)
    calibrator = SequentialCalibrator(skeleton, layout, Checkpoint(source), samples, batch_size=2, dtype=torch.float32,
                                      device="cpu", memory=10**9, spill_dir=tmp_path)
    calibrator.capture_inputs()
    block = calibrator._materialize(0)
    prefix = layout.block_name(0) + "."
    linears = {prefix + rel: m for rel, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = calibrator._sequential_groups(0, block, linears)
    assert [[n[len(prefix):] for n in g] for g in groups] == expected
