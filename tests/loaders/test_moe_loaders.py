"""The real loaders take llmquant's mixture-of-experts outputs: GPTQModel.load and transformers +
gptqmodel (with gptqmodel's defuser, which transformers 5 needs to see per-expert Linears) load the
GPTQ format, transformers + compressed-tensors loads compressed-tensors; their logits match
llmquant's own runtime (cosine >= 0.9999 at every position but at most one, where a router near-tie may pick
another expert)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MOE_ARCHS, save_tiny_moe
from llmquant.api import quantize
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

pytest.importorskip("gptqmodel", reason="the loader tests need `pip install -e .[dev]` (the loaders extra)")
pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 17, 99, 123, 4, 250, 8, 61, 33]])

# transformers 5 fuses experts at load; gptqmodel's defuser puts per-expert Linears back so the
# GPTQ integration can replace them. It patches transformers' classes for the whole process (so does
# GPTQModel.load, through it), so each loader runs in a child process.
LOAD = """
import sys, json, torch
folder, ids = sys.argv[1], json.loads(sys.argv[2])
{load}
kernels = sum("gptqmodel" in type(m).__module__ for m in model.modules())
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.float()
torch.save({{"logits": logits, "kernels": kernels}}, sys.argv[3])
"""
LOADERS = {
    "gptqmodel": LOAD.format(load="""from gptqmodel import GPTQModel
model = GPTQModel.load(folder, device="cpu", dtype=torch.float16).model"""),
    "transformers": LOAD.format(load="""import defuser
from transformers import AutoConfig, AutoModelForCausalLM
defuser.replace_fused_blocks(AutoConfig.from_pretrained(folder).model_type)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cpu")"""),
}


def _ours(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = load_quantized(folder, dtype=torch.float32)(IDS).logits.float()
    return logits


def _assert_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Their logits match ours position by position. One position may go its own way: a router near-tie flips with the
    kernels' summation order (Mixtral's position 11 of IDS picks another expert under AVX2 kernels: cosine 0.98 there,
    0.99999 elsewhere); a wrongly loaded expert, which most positions meet, moves many."""
    cosines = torch.nn.functional.cosine_similarity(ours[0], theirs[0], dim=-1)
    print("cosine per position", [round(c, 6) for c in cosines.tolist()])
    assert int((cosines < 0.9999).sum()) <= 1 and cosines.min() >= 0.95, cosines.tolist()


@pytest.fixture(scope="module", params=MOE_ARCHS)
def gptq_moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import calibration_file

    folder = tmp_path_factory.mktemp(request.param)
    source = save_tiny_moe(folder / "model", request.param)
    # GPTQModel 7.6 and gptqmodel's defuser read Mixtral's experts only under transformers' names
    # (mlp.experts.N.gate_proj, not the checkpoint's block_sparse_moe.experts.N.w1); Qwen's are the same either way
    quantize(source, folder / "gptq", {"algo": "gptq", "bits": 4, "group_size": 32, "calib": str(calibration_file(folder)),
                                       "calib_samples": 16, "calib_seqlen": 64, "expert_names": "transformers"})
    return folder / "gptq"


@pytest.mark.parametrize("loader", ["gptqmodel", "transformers"])
def test_the_gptq_loaders_load_every_expert(loader: str, gptq_moe: Path, tmp_path: Path) -> None:
    result = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-c", LOADERS[loader], str(gptq_moe), json.dumps(IDS.tolist()), str(result)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(result)
    linears = 2 * (4 + 8 * 3 + (3 if "qwen2" in json.loads((gptq_moe / "config.json").read_text())["model_type"] else 0))
    assert theirs["kernels"] == linears
    _assert_agree(_ours(gptq_moe), theirs["logits"])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_transformers_loads_compressed_tensors_experts(arch: str, tmp_path: Path, pm: Plugins) -> None:
    from transformers import AutoModelForCausalLM

    source = save_tiny_moe(tmp_path / "model", arch)
    out = tmp_path / "ct"
    quantize(source, out, {"bits": 4, "group_size": 32, "format": "compressed-tensors"}, plugins=pm)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    with torch.no_grad():
        _assert_agree(_ours(out), theirs(IDS).logits.float())


def test_verify_loads_gptq_experts_through_the_defuser(gptq_moe: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "llmquant.cli", "verify", str(gptq_moe), "--loader", "transformers", "--json"],
                          capture_output=True, text=True)  # a child process: the defuser patches transformers' classes
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (check,) = json.loads(done.stdout)
    assert check["status"] == "ok" and "defuser" in check["message"] and check["kl_mean"] < 1e-3


def test_verify_names_the_fix_for_mixtral_experts_under_checkpoint_names(tmp_path: Path, pm: Plugins) -> None:
    out = tmp_path / "out"
    quantize(save_tiny_moe(tmp_path / "model", "mixtral"), out, {"bits": 4, "group_size": 32}, plugins=pm)
    done = subprocess.run([sys.executable, "-m", "llmquant.cli", "verify", str(out), "--loader", "transformers", "--json"],
                          capture_output=True, text=True)
    (check,) = json.loads(done.stdout)
    assert check["status"] == "refused" and "--expert-names transformers" in check["message"], check
