"""The plugin guide's example runs and passes the conformance suite, so the docs cannot rot."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from llmquant.testing import CHECKS

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def guide_example() -> Any:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    source = next(b for b in blocks if "class MyAlgo" in b)
    module = types.ModuleType("guide_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, str(GUIDE), "exec"), module.__dict__)
    return module.MyAlgo


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_guide_example_conforms(check: Any, tmp_path: Path) -> None:
    check(guide_example(), tmp_path)


def test_guide_format_example_round_trips(tiny_llama: Path, tmp_path: Path, pm: Any) -> None:
    """The guide's format plugin writes a tiny model that llmquant's runtime reads back exactly."""
    import torch

    from llmquant.api import quantize
    from llmquant.runtime import load_quantized

    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    module = types.ModuleType("guide_format")
    exec(compile(next(b for b in blocks if "class CodesU8" in b), str(GUIDE), "exec"), module.__dict__)
    pm.register(module, "guide-format")
    assert pm.formats()["codes-u8"].cls is module.CodesU8
    quantize(tiny_llama, tmp_path / "u8", {"bits": 4, "group_size": 64, "format": "codes-u8"}, plugins=pm)
    quantize(tiny_llama, tmp_path / "gptq", {"bits": 4, "group_size": 64}, plugins=pm)
    ours = load_quantized(tmp_path / "u8", dtype=torch.float32, plugins=pm)
    reference = load_quantized(tmp_path / "gptq", dtype=torch.float32, plugins=pm)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(ours.get_submodule(name).dequantize(), reference.get_submodule(name).dequantize())
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():  # same weights; only the float summation order of the matmuls may differ
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
