"""The example third-party plugin (examples/llmquant-ternary), installed as a user would install
it, is found through its entry point and used through the CLI; its output loads in transformers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import in_ci

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llmquant_ternary") is None:
    if in_ci():
        raise RuntimeError("CI must install the example plugin: pip install ./examples/llmquant-ternary")
    pytest.skip("needs `pip install ./examples/llmquant-ternary`", allow_module_level=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmquant.cli", *args], capture_output=True, text=True)


def test_example_plugin_through_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    listed = cli("algorithms", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["ternary"]["distribution"] == "llmquant-ternary" and rows["ternary"]["status"] == "ok"

    out = tmp_path / "ternary"
    done = cli("quantize", str(tiny_llama), "-o", str(out), "--algo", "ternary", "--group-size", "64")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["sym"]) == (2, False)

    from transformers import AutoModelForCausalLM

    from llmquant.runtime import load_quantized

    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    ours = load_quantized(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(ours(ids).logits.flatten(), theirs(ids).logits.float().flatten(), dim=0)
    assert cosine.item() >= 0.9999
