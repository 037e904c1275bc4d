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
