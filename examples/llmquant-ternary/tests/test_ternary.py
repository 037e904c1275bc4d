"""The plugin's own tests: llmquant's conformance suite, and its error against plain 2-bit rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("llmquant_ternary", reason="install the example: pip install ./examples/llmquant-ternary")

from llmquant.testing import CHECKS
from llmquant.uniform import minmax_quantize
from llmquant_ternary import Ternary, ternary_quantize


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_conformance(check: Any, tmp_path: Path) -> None:
    check(Ternary, tmp_path)


def test_codes_are_ternary_and_beat_2bit_rounding() -> None:
    W = torch.randn(64, 256)
    result = ternary_quantize(W, 64)
    assert set(result.codes.unique().tolist()) <= {0, 1, 2}
    ternary_err = (result.dequantize() - W).pow(2).mean()
    rtn_err = (minmax_quantize(W, 2, 64, True).dequantize() - W).pow(2).mean()
    assert ternary_err < rtn_err
