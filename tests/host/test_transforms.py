"""Block transforms: the structure the host proves, float equivalence of awq and rotate on real
transformers architectures, the host's equivalence check, refusals, and quantized runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmquant import hookimpl
from llmquant.api import quantize
from llmquant.errors import LlmquantError, PluginError
from llmquant.host.block_graph import find_structure
from llmquant.host.float_transform import transformed_state_dict
from llmquant.host.transforms import TransformStep
from llmquant.plugins import Plugins
from llmquant.transform import BlockContext, ModelContext, ModelEdit
from llmquant.uniform import minmax_quantize
from llmquant_plugins.awq import AWQ, AWQConfig
from llmquant_plugins.rotate import Rotate, RotateConfig, hadamard, rotation_matrix
from tests.conftest import _with_bpe_tokenizer, calibration_file, save_tiny_model


def _model(folder: Path, arch: str = "llama", tied: bool | None = None, outliers: bool = False, bpe: bool = False,
           **kw: Any) -> Path:
    """A tiny model whose norms are not ones (so folding them matters), optionally with outlier channels
    and a byte-level BPE tokenizer (which GGUF output needs)."""
    save_tiny_model(folder, arch, **kw)
    if bpe:
        _with_bpe_tokenizer(folder, {})
    if tied is not None:
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = tied
        (folder / "config.json").write_text(json.dumps(config))
    path = folder / "model.safetensors"
    state = load_file(path)
    if tied:
        state.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(1)
    offset = 1.0 if arch.startswith("gemma") else 0.0
    for key, value in state.items():
        if value.dim() == 1 and "norm" in key:
            gamma = torch.rand(value.shape, generator=generator) + 0.5
            if outliers and "layernorm" in key:
                gamma[:4] *= 20  # a few channels carry large activations, as in real LLMs
            state[key] = (gamma - offset).to(value.dtype)
    save_file(state, path, metadata={"format": "pt"})
    return folder


def _logits(folder: Path, state: dict[str, torch.Tensor] | None = None, untie: bool = False) -> torch.Tensor:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    if untie:
        config.tie_word_embeddings = False
    model = transformers.AutoModelForCausalLM.from_config(config).eval().float()
    model.load_state_dict(state if state is not None else load_file(folder / "model.safetensors"), strict=False)
    if state is not None and not untie and "lm_head.weight" not in state:
        model.tie_weights()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def _rtn(module: str, W: torch.Tensor) -> torch.Tensor:
    return minmax_quantize(W, 4, 32, True).dequantize()


def _samples() -> torch.Tensor:
    return torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(3))


def _steps(*transforms: tuple[Any, Any]) -> list[TransformStep]:
    return [TransformStep(cls(), config, "test") for cls, config in transforms]


ARCHS = [("llama", None), ("llama", True), ("qwen2", None), ("gemma3_text", True)]


@pytest.mark.parametrize("arch,tied", ARCHS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in ARCHS])
def test_awq_leaves_the_float_model_unchanged(tmp_path: Path, arch: str, tied: bool | None) -> None:
    folder = _model(tmp_path / "m", arch, tied, outliers=True)
    state, untied = transformed_state_dict(folder, _steps((AWQ, AWQConfig(awq_grid=5))), _samples(), _rtn)
    assert not untied
    reference, result = _logits(folder), _logits(folder, state)
    assert (result - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert not torch.equal(state["model.layers.0.input_layernorm.weight"], load_file(folder / "model.safetensors")[
        "model.layers.0.input_layernorm.weight"]), "awq found nothing to scale"


@pytest.mark.parametrize("arch,tied", ARCHS[:3], ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in ARCHS[:3]])
def test_rotate_leaves_the_float_model_unchanged(tmp_path: Path, arch: str, tied: bool | None) -> None:
    folder = _model(tmp_path / "m", arch, tied)
    state, untied = transformed_state_dict(folder, _steps((Rotate, RotateConfig())), _samples(), _rtn)
    assert untied == bool(tied)
    reference, result = _logits(folder), _logits(folder, state, untie=untied)
    assert (result - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert torch.allclose(state["model.norm.weight"], torch.ones(128))


def test_awq_then_rotate_compose(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", "qwen2", outliers=True)
    steps = _steps((AWQ, AWQConfig(awq_grid=4)), (Rotate, RotateConfig(rotate_seed=3)))
    state, _ = transformed_state_dict(folder, steps, _samples(), _rtn)
    reference, result = _logits(folder), _logits(folder, state)
    assert (result - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_rotate_refuses_gemma3_post_norms_in_one_line(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", "gemma3_text", True)
    with pytest.raises(LlmquantError, match=r"post_attention_layernorm normalizes a Linear's output.*--transform awq") as info:
        transformed_state_dict(folder, _steps((Rotate, RotateConfig())), _samples(), _rtn)
    assert "\n" not in str(info.value)


def _structure(arch: str, **kw: Any) -> Any:
    import transformers

    from tests.conftest import ARCHS as CONFIGS

    class_name, extra = CONFIGS[arch]
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                  num_key_value_heads=kw.pop("kv", 2))
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**common, **{**extra, **kw})).eval()
    captured: dict[str, Any] = {}

    def stop(module: Any, args: Any, kwargs: Any) -> None:
        captured.update(args=args, kwargs=kwargs)
        raise RuntimeError

    block = model.model.layers[0]
    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    with pytest.raises(RuntimeError):
        model(torch.randint(0, 64, (2, 8)), use_cache=False)
    handle.remove()

    def run() -> torch.Tensor:
        out = block(*captured["args"], **captured["kwargs"])
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]

    return find_structure(block, run)


def test_structure_of_a_llama_block() -> None:
    found = _structure("llama")
    assert [(p.producer, p.kind, p.readers, p.scope) for p in found.scale_points] == [
        ("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
    ]  # grouped-query attention: v_proj is narrower than o_proj's input, so no v -> o point
    assert found.residual_writers == ("self_attn.o_proj", "mlp.down_proj")
    assert found.post_norms == ()


def test_structure_finds_v_to_o_when_shapes_allow_and_gemma_offsets() -> None:
    assert ("self_attn.v_proj", ("self_attn.o_proj",)) in [(p.producer, p.readers) for p in _structure("qwen2", kv=4).scale_points]
    gemma = _structure("gemma3_text")
    assert [p.offset for p in gemma.scale_points if p.kind == "norm"] == [1.0, 1.0]
    assert gemma.post_norms == ("post_attention_layernorm", "post_feedforward_layernorm")
    assert gemma.residual_writers == ()


@pytest.mark.parametrize("n", [12, 20, 36, 64, 576, 640, 1536])
def test_hadamard_orders_of_real_models(n: int) -> None:
    H = hadamard(n)
    assert H is not None and H.shape == (n, n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    Q = rotation_matrix(n, "hadamard", 0).double()
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-5)


def test_random_rotation_when_no_hadamard_is_known() -> None:
    assert hadamard(44 * 2) is None or hadamard(88) is not None  # 88 = 8 * 11: no Paley order divides it to a power of 2
    Q = rotation_matrix(90, "hadamard", 0).double()
    assert torch.allclose(Q @ Q.T, torch.eye(90, dtype=torch.float64), atol=1e-5)


@dataclass(frozen=True, kw_only=True)
class _BreakConfig:
    break_scale: float = 2.0


class _Break:
    """A transform that changes the block's function: the host must catch it."""

    name: ClassVar[str] = "break"
    description: ClassVar[str] = "scales q_proj, which changes attention"
    config_type: ClassVar[type[_BreakConfig]] = _BreakConfig
    needs_calibration: ClassVar[bool] = False

    def prepare(self, model: ModelContext, config: _BreakConfig) -> ModelEdit:
        return ModelEdit()

    def transform_block(self, block: BlockContext, config: _BreakConfig) -> None:
        block.weights["mlp.down_proj.weight"] = block.weights["mlp.down_proj.weight"] * config.break_scale


class _BreakPlugin:
    @hookimpl
    def llmquant_register_transforms(self, register: Callable[[type[Any]], None]) -> None:
        register(_Break)


def test_host_rejects_a_transform_that_changes_the_block(pm: Plugins, tmp_path: Path) -> None:
    pm.register(_BreakPlugin(), "breaker", "breaker-dist", "1.0")
    folder = _model(tmp_path / "m")
    with pytest.raises(PluginError, match=r"transform 'break' from plugin 'breaker' changed what model.layers.0 computes"):
        quantize(folder, tmp_path / "out", {"transforms": ["break"]}, plugins=pm)
    assert not (tmp_path / "out").exists()


def test_awq_needs_calibration_and_unknown_transforms_are_named(pm: Plugins, tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    with pytest.raises(LlmquantError, match="transform 'awq' needs calibration data: pass --calib"):
        quantize(folder, tmp_path / "out", {"transforms": ["awq"]}, plugins=pm)
    with pytest.raises(PluginError, match="unknown transform 'spin': installed transforms are awq, rotate"):
        quantize(folder, tmp_path / "out", {"transforms": ["spin"]}, plugins=pm)


def _error(folder: Path, output: Path) -> float:
    from llmquant.runtime import load_quantized

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        result = load_quantized(output, dtype=torch.float32)(ids).logits
    return float((result - _logits(folder)).pow(2).mean())


def test_awq_lowers_rtn_error_on_outlier_channels(pm: Plugins, tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", outliers=True)
    calib = {"calib": str(calibration_file(tmp_path)), "calib_samples": 8, "calib_seqlen": 32}
    base = {"bits": 3, "group_size": 32}
    quantize(folder, tmp_path / "rtn", base, plugins=pm)
    quantize(folder, tmp_path / "awq", {**base, **calib, "transforms": ["awq"]}, plugins=pm)
    assert _error(folder, tmp_path / "awq") < 0.8 * _error(folder, tmp_path / "rtn")
    record = json.loads((tmp_path / "awq" / "llmquant.json").read_text())
    assert record["config"]["transforms"] == ["awq"] and record["config"]["awq_grid"] == 20


def test_rotate_with_gptq_writes_an_untied_head(pm: Plugins, tmp_path: Path) -> None:
    folder = _model(tmp_path / "m", tied=True)
    settings = {"algo": "gptq", "bits": 4, "group_size": 32, "transforms": ["rotate"], "calib": str(calibration_file(tmp_path)),
                "calib_samples": 8, "calib_seqlen": 32}
    quantize(folder, tmp_path / "out", settings, plugins=pm)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    error = _error(folder, tmp_path / "out")
    assert error < 0.1 * float(_logits(folder).pow(2).mean())
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])


COMBINATIONS = [("nf4", "awq", "auto"), ("groupwise-int4", "rotate", "auto"), ("rtn", "rotate", "gguf"), ("gptq", "awq", "gguf"),
                ("rtn", "awq", "compressed-tensors")]


@pytest.mark.parametrize("algo,transform,fmt", COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_transforms_compose_with_algorithms_and_formats(pm: Plugins, tmp_path: Path, algo: str, transform: str, fmt: str) -> None:
    folder = _model(tmp_path / "m", tied=True, outliers=True, bpe=fmt == "gguf")
    settings: dict[str, Any] = {"algo": algo, "format": fmt, "transforms": [transform], "calib": str(calibration_file(tmp_path)),
                                "calib_samples": 8, "calib_seqlen": 32}
    settings.update({"blocksize": 64} if algo == "nf4" else {"bits": 8 if fmt == "gguf" else 4, "group_size": 32})
    if fmt == "gguf":
        settings["gguf_type"] = "q8_0"
    quantize(folder, tmp_path / "out", settings, plugins=pm)
    quantize(folder, tmp_path / "plain", {**settings, "transforms": []}, plugins=pm)
    # a transform lost on the way (a tensor written untransformed, a head left tied) would wreck the logits
    assert _error(folder, tmp_path / "out") < 1.25 * _error(folder, tmp_path / "plain")
