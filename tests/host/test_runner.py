from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TOKENIZER_FILES, dir_hash
from llmquant.api import quantize
from llmquant.errors import CheckpointError, LlmquantError, ShapeError
from llmquant.host.checkpoint import Checkpoint
from llmquant.plugins import Plugins
from llmquant.runtime import QuantLinear, load_quantized
from llmquant.uniform import minmax_quantize

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def dequantized_reference(source: Path, bits: int, group_size: int | None, symmetric: bool, skip: str = "^$") -> torch.nn.Module:
    """The float model with every block Linear replaced by its RTN dequantization, computed independently."""
    import re

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not re.search(skip, name):
            module.weight.data = minmax_quantize(module.weight.data, bits, group_size, symmetric).dequantize()
    return model.eval()


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, True), (4, 32, False), (8, None, True), (3, 128, True), (2, 64, False)],
                         ids=["w4g64sym", "w4g32asym", "w8perchannel", "w3g128", "w2g64asym"])
def test_output_loads_and_matches_the_dequantized_model(
    tiny_llama: Path, tmp_path: Path, pm: Plugins, bits: int, group_size: int | None, symmetric: bool
) -> None:
    before = dir_hash(tiny_llama)
    out = tmp_path / "out"
    report = quantize(tiny_llama, out, {"bits": bits, "group_size": group_size, "symmetric": symmetric}, plugins=pm)
    assert dir_hash(tiny_llama) == before
    assert report.quantized == 14 and report.output_bytes < report.input_bytes
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "sym": symmetric, "desc_act": False,
        "checkpoint_format": "gptq"}
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()
    tensors = Checkpoint(out)
    q = "model.layers.1.mlp.down_proj"
    assert tensors.infos[f"{q}.qweight"].shape == (256 * bits // 32, 128)
    assert tensors.infos[f"{q}.scales"].dtype == torch.float16
    assert f"{q}.weight" not in tensors and "model.embed_tokens.weight" in tensors
    ours = load_quantized(out)
    assert isinstance(ours.get_submodule(q), QuantLinear)
    torch.testing.assert_close(logits(ours), logits(dequantized_reference(tiny_llama, bits, group_size, symmetric)),
                               rtol=1e-4, atol=1e-4)


def test_ignore_and_overrides(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    out = tmp_path / "out"
    settings: dict[str, Any] = {"bits": 4, "group_size": 64, "ignore": [r"layers\.0\.self_attn\.q_proj$"],
                                "overrides": [{"pattern": r"down_proj$", "bits": 8}]}
    report = quantize(tiny_llama, out, settings, plugins=pm)
    records = {r.name: r for r in report.modules}
    assert records["model.layers.0.self_attn.q_proj"].bits is None
    assert records["model.layers.1.mlp.down_proj"].bits == 8 and records["model.layers.1.mlp.up_proj"].bits == 4
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert dynamic[r"-:^model\.layers\.0\.self_attn\.q_proj$"] == {}
    assert dynamic[r"+:^model\.layers\.0\.mlp\.down_proj$"] == {"bits": 8, "group_size": 64, "sym": True}
    ours = load_quantized(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    kept = ours.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(kept, torch.nn.Linear) and torch.equal(kept.weight, original.model.layers[0].self_attn.q_proj.weight)
    assert ours.get_submodule("model.layers.0.mlp.down_proj").qweight.shape == (256 * 8 // 32, 128)


def test_small_shards_get_an_index(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    out = tmp_path / "out"
    quantize(tiny_llama, out, {"max_shard_size": "100KB", "group_size": 64}, plugins=pm)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    for f in files:  # under the cap, unless one tensor alone is larger (as save_pretrained does)
        names = [k for k, v in index["weight_map"].items() if v == f]
        assert len(names) == 1 or (out / f).stat().st_size < 100_000 + 8192
    assert logits(load_quantized(out)).isfinite().all()


def test_sharded_input_and_dtype_cast(tiny_model_factory: Callable[..., Path], tmp_path: Path, pm: Plugins) -> None:
    source = tiny_model_factory(max_shard_size="200KB")
    assert (source / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    quantize(source, out, {"dtype": "bfloat16", "group_size": 64}, plugins=pm)
    tensors = Checkpoint(out)
    assert tensors.infos["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_quantized(out).model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text", "opt"])
def test_other_architectures(arch: str, tiny_model_factory: Callable[..., Path], tmp_path: Path, pm: Plugins) -> None:
    source = tiny_model_factory(arch)
    out = tmp_path / "out"
    report = quantize(source, out, {"bits": 8, "group_size": 64}, plugins=pm)
    assert report.quantized == (12 if arch == "opt" else 14)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    cos = torch.nn.functional.cosine_similarity(logits(load_quantized(out)).flatten(), logits(original).flatten(), dim=0)
    assert cos > 0.999


def test_existing_output_is_refused_unless_overwrite(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LlmquantError, match="already exists: choose another path or pass --overwrite"):
        quantize(tiny_llama, out, {"group_size": 64}, plugins=pm)
    quantize(tiny_llama, out, {"group_size": 64}, plugins=pm, overwrite=True)
    assert (out / "config.json").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_at_or_inside_input_is_refused(tiny_model_factory: Callable[..., Path], pm: Plugins, where: str) -> None:
    source = tiny_model_factory()
    before = dir_hash(source)
    with pytest.raises(LlmquantError, match="is the input folder or inside it"):
        quantize(source, source if where == "same" else source / "q", {"group_size": 64}, plugins=pm, overwrite=True)
    assert dir_hash(source) == before


def test_bad_group_size_fails_before_any_output(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.self_attn\.q_proj has shape \(128, 128\): in_features 128 is not a multiple of group_size 96"):
        quantize(tiny_llama, tmp_path / "out", {"group_size": 96}, plugins=pm)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage,message", [
    ("no-config", "has no config.json"),
    ("missing-shard", "names shard"),
    ("truncated", "truncated"),
    ("garbage", "corrupt or truncated"),
], ids=lambda v: v)
def test_broken_checkpoints_are_named(tiny_model_factory: Callable[..., Path], tmp_path: Path, pm: Plugins, damage: str, message: str) -> None:
    source = tiny_model_factory(max_shard_size="200KB" if damage == "missing-shard" else "2GB")
    if damage == "no-config":
        (source / "config.json").unlink()
    elif damage == "missing-shard":
        sorted(source.glob("model-*.safetensors"))[-1].unlink()
    else:
        shard = source / "model.safetensors"
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    with pytest.raises(CheckpointError, match=message):
        quantize(source, tmp_path / "out", {"group_size": 64}, plugins=pm)


def test_missing_path_is_named(tmp_path: Path, pm: Plugins) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        quantize(tmp_path / "nope", tmp_path / "out", plugins=pm)


def test_a_failing_plugin_is_named_and_nothing_is_written(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    import types
    from dataclasses import dataclass
    from typing import ClassVar

    from llmquant import hookimpl
    from llmquant.algorithm import UniformQuantized
    from llmquant.errors import PluginError
    from llmquant.uniform import UniformConfig

    @dataclass(frozen=True, kw_only=True)
    class Config(UniformConfig):
        pass

    class Exploding:
        name: ClassVar[str] = "exploding"
        description: ClassVar[str] = "raises on the third weight"
        config_type: ClassVar[type] = Config
        result_type: ClassVar[type] = UniformQuantized
        needs_calibration: ClassVar[bool] = False
        calls = 0

        def quantize_weight(self, W: torch.Tensor, config: Any, stats: Any) -> UniformQuantized:
            Exploding.calls += 1
            if Exploding.calls == 3:
                raise ZeroDivisionError("boom")
            return minmax_quantize(W, 4, 64, True)

    @hookimpl
    def llmquant_register_algorithms(register: Any) -> None:
        register(Exploding)

    pm.register(types.SimpleNamespace(llmquant_register_algorithms=llmquant_register_algorithms), "boom-plugin", "boom-dist")
    with pytest.raises(PluginError, match=r"algorithm 'exploding' from plugin 'boom-plugin' \(boom-dist\) failed on "
                                          r"model\.layers\.0\.mlp\.up_proj \(256, 128\): ZeroDivisionError: boom"):
        # one worker: with several, blocks run at once and the third call is not the third weight
        quantize(tiny_llama, tmp_path / "out", {"algo": "exploding", "group_size": 64, "workers": 1}, plugins=pm)
    assert not (tmp_path / "out").exists()


def test_output_parent_folders_are_created(tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    out = tmp_path / "not" / "yet" / "there" / "w4"
    quantize(tiny_llama, out, {"bits": 4, "group_size": 64}, plugins=pm)
    assert (out / "config.json").exists() and not any(p.name.startswith(".") for p in out.parent.iterdir())
