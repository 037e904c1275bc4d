"""Mixture-of-experts models: every routed expert quantized under its per-expert name, calibrated per
expert by either policy, with a fallback, in chunks that do not change the output; the router and
gates kept in float and counted; llmquant's runtime computing what transformers computes."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import MOE_HOST_ARCHS, calibration_file, save_tiny_moe
from llmquant.api import quantize
from llmquant.errors import CheckpointError
from llmquant.host.arch import find_blocks
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.moe import ExpertLinears, defused_skeleton, weight_shapes
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

QWEN_NAMES = ("mlp", ("gate_proj", "up_proj", "down_proj"))
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")), "qwen2_moe": QWEN_NAMES, "qwen3_moe": QWEN_NAMES,
                "deepseek_v3": QWEN_NAMES}
SPARSE_LAYERS = {"deepseek_v3": (1, 2)}  # its first layer is dense
# per sparse layer: attention Linears, shared-expert Linears
LAYER_LINEARS = {"mixtral": (4, 0), "qwen2_moe": (4, 3), "qwen3_moe": (4, 0), "deepseek_v3": (5, 3)}
GPTQ = {"algo": "gptq", "bits": 4, "group_size": 32, "calib_samples": 16, "calib_seqlen": 64}


@pytest.fixture(scope="module", params=MOE_HOST_ARCHS)
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibration_file(tmp_path_factory.mktemp("calib"))


def _held_out() -> torch.Tensor:
    rng = random.Random(7)  # the calibration text's distribution (words t3..t511), other draws
    return torch.tensor([[rng.randrange(3, 512) for _ in range(48)] for _ in range(4)])


def _defused(folder: Path) -> Any:
    """The skeleton with its experts as per-expert Linears, loaded with the checkpoint's float weights."""
    checkpoint = Checkpoint(folder)
    model, keys, replaced = defused_skeleton(AutoConfig.from_pretrained(folder), checkpoint, weight_shapes(checkpoint.infos))
    model.load_state_dict({keys.model(k): checkpoint[k] for k in checkpoint}, strict=False, assign=True)
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    return model.eval(), replaced


def test_defused_experts_compute_what_transformers_computes(moe: Path) -> None:
    ours, replaced = _defused(moe)
    layers = SPARSE_LAYERS.get(AutoConfig.from_pretrained(moe).model_type, (0, 1))
    assert replaced == [f"model.layers.{i}.mlp.experts" for i in layers]
    assert all(isinstance(ours.get_submodule(p), ExpertLinears) and len(ours.get_submodule(p)) == 8 for p in replaced)
    reference = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_held_out()).logits, reference(_held_out()).logits, rtol=1e-4, atol=1e-5)


def test_every_expert_is_quantized_under_its_per_expert_name(moe: Path, tmp_path: Path, pm: Plugins) -> None:
    arch = AutoConfig.from_pretrained(moe).model_type
    report = quantize(moe, tmp_path / "out", {"bits": 4, "group_size": 32}, plugins=pm)
    source, out = Checkpoint(moe), Checkpoint(tmp_path / "out")
    parent, projections = EXPERT_NAMES[arch]
    layers = SPARSE_LAYERS.get(arch, (0, 1))
    for layer in layers:
        for e in range(8):
            for projection in projections:
                name = f"model.layers.{layer}.{parent}.experts.{e}.{projection}"
                assert {f"{name}.qweight", f"{name}.scales", f"{name}.qzeros", f"{name}.g_idx"} <= set(out), name
    assert not [k for k in out if k.endswith(("gate_up_proj", "experts.down_proj"))]
    matrices = [k for k, i in source.infos.items() if k.startswith("model.layers.") and len(i.shape) == 2]
    kept = report.kept()
    assert report.quantized + sum(kept.values()) == len(matrices) == len(report.modules)
    attention, shared = LAYER_LINEARS[arch]
    dense_layers = 1 if arch == "deepseek_v3" else 0
    assert report.quantized == 2 * (attention + 8 * 3 + shared) + dense_layers * (attention + 3)
    assert kept == ({"router gate": 2, "not an nn.Linear": 2} if arch == "qwen2_moe" else {"not an nn.Linear": 2})
    assert report.unasked_float_share() < 0.01
    for layer in layers:  # the router is copied bit for bit
        key = f"model.layers.{layer}.{parent}.gate.weight"
        assert torch.equal(out[key].float(), source[key].float())
    with torch.no_grad():
        ours = load_quantized(tmp_path / "out", dtype=torch.float32, kernel="dequant", plugins=pm)(_held_out()).logits
        reference = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)(_held_out()).logits
    # 4-bit groups of 32 on random weights; DeepSeek's low-rank attention (MLA) loses the most
    assert torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0) > (0.85 if arch == "deepseek_v3" else 0.97)


def test_gptq_beats_rtn_on_held_out_ids_with_both_policies(moe: Path, calib: Path, tmp_path: Path, pm: Plugins) -> None:
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)(_held_out()).logits
    errors = {}
    for name, settings in {"rtn": {"bits": 4, "group_size": 32}, "routed": {**GPTQ, "calib": str(calib)},
                           "all": {**GPTQ, "calib": str(calib), "moe_calibration": "all"}}.items():
        quantize(moe, tmp_path / name, settings, plugins=pm)
        with torch.no_grad():
            logits = load_quantized(tmp_path / name, dtype=torch.float32, kernel="dequant", plugins=pm)(_held_out()).logits
        errors[name] = float(((logits - reference) ** 2).mean())
    assert errors["routed"] < 0.95 * errors["rtn"] and errors["all"] < 0.95 * errors["rtn"], errors
    assert _hashes(tmp_path / "routed") != _hashes(tmp_path / "all")


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_modes_and_expert_chunks_do_not_change_the_output(arch: str, calib: Path, tmp_path: Path, pm: Plugins) -> None:
    moe = save_tiny_moe(tmp_path / "model", arch)
    outputs = {}
    for name, extra in {"single-pass": {"calib_mode": "single-pass"}, "replay": {"calib_mode": "replay"},
                        "one-expert-chunks": {"calib_mode": "replay", "moe_memory": "1KB"}}.items():
        quantize(moe, tmp_path / name, {**GPTQ, "calib": str(calib), **extra}, plugins=pm)
        outputs[name] = _hashes(tmp_path / name)
    assert outputs["single-pass"] == outputs["replay"] == outputs["one-expert-chunks"]


def test_an_expert_with_too_few_routed_tokens_falls_back_and_is_recorded(calib: Path, tmp_path: Path, pm: Plugins) -> None:
    from llmquant.cli import main

    moe = save_tiny_moe(tmp_path / "model", "qwen3_moe")
    quantize(moe, tmp_path / "out", {**GPTQ, "calib": str(calib), "moe_min_tokens": 0.3}, plugins=pm)
    quantize(moe, tmp_path / "rtn", {"bits": 4, "group_size": 32}, plugins=pm)
    modules = json.loads((tmp_path / "out" / "llmquant.json").read_text())["modules"]
    fallbacks = [m for m in modules if "calibration" in m]
    assert fallbacks and all(m["calibration"].startswith("fallback: ") and ".experts." in m["name"] for m in fallbacks)
    assert len(fallbacks) % 3 == 0 and len(fallbacks) < 2 * 8 * 3  # whole experts, not all of them
    gptq, rtn = Checkpoint(tmp_path / "out"), Checkpoint(tmp_path / "rtn")
    for m in fallbacks:  # GPTQ's calibration-free result is round-to-nearest on its grid
        assert torch.equal(gptq[f"{m['name']}.qweight"], rtn[f"{m['name']}.qweight"])
    calibrated = next(m for m in modules if ".experts." in m["name"] and "calibration" not in m and m["bits"])
    assert not torch.equal(gptq[f"{calibrated['name']}.qweight"], rtn[f"{calibrated['name']}.qweight"])
    assert main(["inspect", str(tmp_path / "out")]) == 0


def test_quantize_moe_gates_on_request(tmp_path: Path, pm: Plugins) -> None:
    moe = save_tiny_moe(tmp_path / "model", "qwen2_moe")
    report = quantize(moe, tmp_path / "out", {"algo": "nf4", "keep_moe_gates": False}, plugins=pm)
    assert report.kept() == {"not an nn.Linear": 2}  # the shared-expert gates are quantized; the raw router cannot be


def test_fused_experts_on_disk_are_refused_in_one_line(tmp_path: Path, pm: Plugins) -> None:
    import transformers

    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    config = transformers.GptOssConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, num_local_experts=4, head_dim=16,
                                       layer_types=["full_attention", "full_attention"])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt-oss")
    with pytest.raises(CheckpointError, match=r"stores fused on disk, not per expert") as info:
        quantize(tmp_path / "gpt-oss", tmp_path / "out", {"bits": 4, "group_size": 32}, plugins=pm)
    assert "\n" not in str(info.value) and "gpt_oss" in str(info.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "opt"])
def test_dense_models_take_no_moe_path(arch: str, tiny_model_factory: Any) -> None:
    folder = tiny_model_factory(arch)
    checkpoint = Checkpoint(folder)
    model, keys, replaced = defused_skeleton(AutoConfig.from_pretrained(folder), checkpoint, weight_shapes(checkpoint.infos))
    assert keys.to_model == {} and replaced == []
    assert find_blocks(model).count == 2


def test_a_run_leaving_much_in_float_unasked_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from llmquant.formats import ModuleRecord
    from llmquant.host.runner import QuantizeReport, warn_float_share

    quantized = [ModuleRecord(f"model.layers.0.q{i}", (64, 64), bits=4, group_size=32, symmetric=True) for i in range(4)]
    mine = ModuleRecord("model.layers.0.mine", (64, 64))  # the user's ignore rule: never warned about
    router = ModuleRecord("model.layers.0.mlp.gate", (8, 64), extra={"kept": "not an nn.Linear: 2-D parameter of Router"})
    experts = ModuleRecord("model.layers.0.mlp.experts", (64, 64 * 8), extra={"kept": "not an nn.Linear: 3-D parameter"})
    with caplog.at_level("WARNING", logger="llmquant"):
        warn_float_share(QuantizeReport(Path("out"), Path("in"), "gptq", [*quantized, mine, router], 0, 0, 0.0))
        assert not caplog.records
        report = QuantizeReport(Path("out"), Path("in"), "gptq", [*quantized, mine, router, experts], 0, 0, 0.0)
        warn_float_share(report)
    assert report.kept() == {"ignore": 1, "not an nn.Linear": 2}
    assert len(caplog.records) == 1 and "STAYED IN FLOAT" in caplog.text and "2 not an nn.Linear" in caplog.text


@pytest.mark.parametrize("settings", [{"format": "compressed-tensors", "bits": 4, "group_size": 32, "symmetric": False},
                                      {"algo": "nf4"}, {"algo": "nf4", "double_quant": True}], ids=["ct-asym", "nf4", "nf4-dq"])
def test_every_format_holds_experts_and_llmquant_runs_them(settings: dict[str, Any], tmp_path: Path, pm: Plugins) -> None:
    moe = save_tiny_moe(tmp_path / "model", "qwen3_moe")
    report = quantize(moe, tmp_path / "out", settings, plugins=pm)
    assert report.quantized == 2 * (4 + 8 * 3) and report.kept() == {"not an nn.Linear": 2}
    with torch.no_grad():
        ours = load_quantized(tmp_path / "out", dtype=torch.float32, kernel="dequant", plugins=pm)(_held_out()).logits
        reference = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)(_held_out()).logits
    assert torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0) > 0.97


def _save(folder: Path, config: Any) -> Path:
    from conftest import save_tiny_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.05)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder, 512)
    return folder


@pytest.mark.parametrize("arch", ["phimoe", "afmoe"])
def test_routers_that_are_renamed_or_nested_stay_in_float(arch: str, tmp_path: Path, pm: Plugins) -> None:
    """PhiMoE renames its router's key (block_sparse_moe.gate -> mlp.router, a Linear subclass); AFMoE nests it
    (mlp.router.gate). Both are found, kept in float (even with --quantize-moe-gates for PhiMoE's), and the
    defused model computes what transformers computes."""
    import transformers

    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=2)
    config = (transformers.PhimoeConfig(**common, intermediate_size=64, num_local_experts=4) if arch == "phimoe" else
              transformers.AfmoeConfig(**common, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                                       num_dense_layers=0))
    source = _save(tmp_path / "model", config)
    ours, replaced = _defused(source)
    with torch.no_grad():
        torch.testing.assert_close(ours(_held_out()).logits, AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32)(_held_out()).logits, rtol=1e-4, atol=1e-5)
    report = quantize(source, tmp_path / "out", {"bits": 4, "group_size": 32, "keep_moe_gates": arch != "phimoe"}, plugins=pm)
    assert report.kept() == {"router gate": 2}
    assert report.quantized >= 2 * (4 + len(ours.get_submodule(replaced[0])) * 3)  # AFMoE adds a shared expert and gated attention


def test_an_expert_no_token_reached_falls_back_even_with_no_threshold(tmp_path: Path, pm: Plugins) -> None:
    """--moe-min-tokens 0 must not calibrate an expert on an all-zero Hessian (GPTQ would zero its weight)."""
    from conftest import save_tiny_tokenizer

    moe = save_tiny_moe(tmp_path / "model", "qwen3_moe")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(["t5 t6 t7 t8"] * 200))  # four words: some experts see no token at all
    save_tiny_tokenizer(moe, 512)
    quantize(moe, tmp_path / "out", {**GPTQ, "calib": str(calib), "calib_samples": 4, "calib_seqlen": 32, "moe_min_tokens": 0},
             plugins=pm)
    modules = json.loads((tmp_path / "out" / "llmquant.json").read_text())["modules"]
    assert any(m.get("calibration") == "fallback: 0 routed tokens" for m in modules)
    out = Checkpoint(tmp_path / "out")
    assert all(out[f"{m['name']}.scales"].abs().min() > 0 for m in modules if m["bits"])


def test_layers_past_the_models_are_not_planned(tmp_path: Path, pm: Plugins) -> None:
    """DeepSeek-V3 and GLM-4.5 checkpoints carry a multi-token-prediction layer the model does not have."""
    from safetensors.torch import load_file, save_file

    moe = save_tiny_moe(tmp_path / "model", "deepseek_v3")
    tensors = load_file(moe / "model.safetensors")
    tensors.update({k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in tensors.items() if ".layers.2." in k})
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(128, 256)
    save_file(tensors, str(moe / "model.safetensors"), metadata={"format": "pt"})
    report = quantize(moe, tmp_path / "out", {"bits": 4, "group_size": 32}, plugins=pm)
    assert not [m.name for m in report.modules if ".layers.3." in m.name]


def test_expert_names_transformers_writes_what_gptqmodel_reads_and_computes_the_same(tmp_path: Path, pm: Plugins) -> None:
    """--expert-names transformers: Mixtral's block_sparse_moe.experts.N.w1/w3/w2 are written as
    mlp.experts.N.gate_proj/up_proj/down_proj (every other key under transformers' name too); the
    same codes, so llmquant's runtime computes the same logits; Qwen keeps its names byte for byte."""
    moe = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    quantize(moe, tmp_path / "checkpoint", {"bits": 4, "group_size": 32}, plugins=pm)
    quantize(moe, tmp_path / "transformers", {"bits": 4, "group_size": 32, "expert_names": "transformers"}, plugins=pm)
    theirs, ours = Checkpoint(tmp_path / "checkpoint"), Checkpoint(tmp_path / "transformers")
    renamed = {k.replace("block_sparse_moe", "mlp").replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.")
               .replace(".w2.", ".down_proj."): k for k in theirs}
    assert set(ours) == set(renamed) and any(".mlp.experts.7.down_proj.qweight" in k for k in ours)
    assert all(torch.equal(ours[k], theirs[renamed[k]]) for k in ours)
    records = {r["name"] for r in json.loads((tmp_path / "transformers" / "llmquant.json").read_text())["modules"]}
    assert "model.layers.1.mlp.experts.3.up_proj" in records and "model.layers.1.mlp.gate" in records
    with torch.no_grad():
        a, b = (load_quantized(tmp_path / n, dtype=torch.float32, kernel="dequant", plugins=pm)(_held_out()).logits
                for n in ("checkpoint", "transformers"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    qwen = save_tiny_moe(tmp_path / "qwen", "qwen3_moe")
    quantize(qwen, tmp_path / "q1", {"bits": 4, "group_size": 32}, plugins=pm)
    quantize(qwen, tmp_path / "q2", {"bits": 4, "group_size": 32, "expert_names": "transformers"}, plugins=pm)
    assert all((tmp_path / "q1" / f).read_bytes() == (tmp_path / "q2" / f).read_bytes() for f in ("model.safetensors",))
