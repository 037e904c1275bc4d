"""CUDA runs match CPU runs. Skipped without a GPU; the CPU suite is complete without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import calibration_file
from llmquant.api import quantize
from llmquant.plugins import Plugins
from llmquant.runtime import load_quantized

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_cuda_output_matches_cpu(algo: str, tiny_llama: Path, tmp_path: Path, pm: Plugins) -> None:
    settings = {"algo": algo, "bits": 4, "group_size": 64, "calib_dtype": "float32"}
    if algo == "gptq":
        settings.update(calib=str(calibration_file(tmp_path)), calib_samples=16, calib_seqlen=64)
    quantize(tiny_llama, tmp_path / "cpu", {**settings, "device": "cpu"}, plugins=pm)
    quantize(tiny_llama, tmp_path / "cuda", {**settings, "device": "cuda"}, plugins=pm)
    ids = torch.tensor([[1, 5, 9, 42, 7, 300]])
    with torch.no_grad():
        cpu = load_quantized(tmp_path / "cpu")(ids).logits
        cuda = load_quantized(tmp_path / "cuda")(ids).logits
    assert torch.nn.functional.cosine_similarity(cpu.flatten(), cuda.flatten(), dim=0) > 0.999
