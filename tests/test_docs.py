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


def test_guide_transform_example_conforms(tmp_path: Path) -> None:
    """The guide's block transform passes the transform conformance kit."""
    from llmquant.testing import check_transform

    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    module = types.ModuleType("guide_transform")
    sys.modules[module.__name__] = module
    exec(compile(next(b for b in blocks if "class Halve" in b), str(GUIDE), "exec"), module.__dict__)
    check_transform(module.Halve, tmp_path)


ROOT = GUIDE.parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOCS = ("algorithms.md", "formats.md", "serving.md", "eval.md", "benchmarks.md", "writing-plugins.md", "distributed.md")


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def links(page: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page.read_text()))


def anchors(page: Path) -> set[str]:
    """The ids GitHub gives the page's headings: lowercased, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = 0
        while (candidate := slug if n == 0 else f"{slug}-{n}") in found:
            n += 1
        found.add(candidate)
    return found


def test_readme_is_a_short_product_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; move details into docs/"


def test_readme_links_every_docs_page() -> None:
    targets = set(links(README))
    assert not [name for name in DOCS if f"docs/{name}" not in targets]
    assert {path.name for path in (ROOT / "docs").glob("*.md")} <= set(DOCS)  # a new page gets a README link too


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading with that id in {target.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
