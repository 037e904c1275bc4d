"""The conformance suite passes the built-ins and catches a broken plugin."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from llmquant.algorithm import UniformQuantized
from llmquant.testing import CHECKS, check_bad_config_and_shape, check_determinism_and_input_untouched
from llmquant.uniform import minmax_quantize


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("module,cls", [("rtn", "RTN"), ("gptq", "GPTQ"), ("nf4", "NF4"), ("groupwise_int4", "GroupwiseInt4")])
def test_builtins_conform(check: Any, module: str, cls: str, tmp_path: Path) -> None:
    check(getattr(importlib.import_module(f"llmquant_plugins.{module}"), cls), tmp_path)


@dataclass(frozen=True, kw_only=True)
class _Loose:
    bits: int = 4
    group_size: int = 64


class Sloppy:
    name: ClassVar[str] = "sloppy"
    description: ClassVar[str] = "modifies its input, validates nothing"
    config_type: ClassVar[type] = _Loose
    result_type: ClassVar[type] = UniformQuantized
    needs_calibration: ClassVar[bool] = False

    def quantize_weight(self, W: torch.Tensor, config: Any, stats: Any) -> UniformQuantized:
        W.add_(torch.rand_like(W) * 1e-3)
        return minmax_quantize(W, 4, 64, True)


def test_a_sloppy_plugin_fails_with_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="sloppy modified the weight it was given"):
        check_determinism_and_input_untouched(Sloppy, tmp_path)
    with pytest.raises(AssertionError, match=r"sloppy: bits=7 was accepted; raise ConfigError"):
        check_bad_config_and_shape(Sloppy, tmp_path)



@pytest.mark.parametrize("name", ["awq", "rotate"])
def test_builtin_transforms_pass_the_transform_kit(name: str, tmp_path: Path) -> None:
    from llmquant.plugins import get_plugin_manager
    from llmquant.testing import check_transform

    check_transform(get_plugin_manager().transform(name).cls, tmp_path)


def test_transform_kit_catches_a_transform_that_changes_the_model(tmp_path: Path) -> None:
    from llmquant.testing import check_transform_keeps_the_function
    from tests.host.test_transforms import _Break

    with pytest.raises(Exception, match="changed what model.layers.0 computes"):
        check_transform_keeps_the_function(_Break, tmp_path)
