"""Every module the product imports is a declared dependency, or goes through `llmquant.deps.require`,
which names the extra to install in one line: a plain `pip install .` never ends in a traceback."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from llmquant.deps import EXTRAS, INTEGRATIONS, MissingDependency, require
from llmquant.errors import LlmquantError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIRST_PARTY = {"llmquant", "llmquant_plugins", "llmquant_eval", "eval", "plugins"}
# Files that run in another environment's Python, never in llmquant's: the vLLM and llama.cpp probes are
# started by `llmquant verify` with that environment's interpreter and report any failure as JSON.
OTHER_ENVIRONMENT = {("llmquant/vllm_probe.py", "vllm"), ("llmquant/llama_cpp_probe.py", "llama_cpp")}
SOURCES = sorted(p for folder in ("llmquant", "plugins", "eval") for p in (ROOT / folder).rglob("*.py"))


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


DECLARED = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
DISTRIBUTIONS = {module: {_name(d) for d in dists} for module, dists in packages_distributions().items()}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import in a file, inside functions too: (line, top-level module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _requires(path: Path) -> list[tuple[int, str, str | None]]:
    """Every ``require("module", extra=...)`` call in a file: (line, module, extra)."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require":
            if node.args and isinstance(node.args[0], ast.Constant):
                extra = next((k.value.value for k in node.keywords if k.arg == "extra" and isinstance(k.value, ast.Constant)), None)
                calls.append((node.lineno, str(node.args[0].value), extra))
    return calls


def test_the_scan_sees_the_product() -> None:
    scanned = {str(p.relative_to(ROOT)) for p in SOURCES}
    assert {"llmquant/cli.py", "plugins/gptq.py", "eval/perplexity.py", "eval/benchmarks/bench_peers.py"} <= scanned
    assert ("llmquant/host/calibration_data.py" in scanned
            and any(m == "datasets" for _, m in _imports(ROOT / "llmquant/host/calibration_data.py")))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_is_declared(path: Path) -> None:
    where = str(path.relative_to(ROOT))
    undeclared = []
    for line, module in _imports(path):
        if module in sys.stdlib_module_names or module in FIRST_PARTY or (where, module) in OTHER_ENVIRONMENT:
            continue
        distributions = DISTRIBUTIONS.get(module, {re.sub(r"[-_.]+", "-", module).lower()})
        if not distributions & DECLARED:
            undeclared.append(f"{where}:{line} imports {module} ({', '.join(sorted(distributions))})")
    assert not undeclared, ("not in [project.dependencies]; declare it, or import it with llmquant.deps.require(..., extra=...): "
                            + "; ".join(undeclared))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_require_names_an_extra_that_installs_it(path: Path) -> None:
    extras = {name: {_name(r) for r in reqs} for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
    for line, module, extra in _requires(path):
        if extra is None:
            continue  # a peer installed in its own environment: `install=` says how
        assert extra in extras, f"{path.name}:{line}: require({module!r}) names extra {extra!r}, not in pyproject"
        distributions = DISTRIBUTIONS.get(module.split(".")[0], {re.sub(r"[-_.]+", "-", module.split(".")[0]).lower()})
        assert distributions & extras[extra], f"{path.name}:{line}: extra {extra!r} does not install {module}"


def test_deps_extras_match_pyproject() -> None:
    declared = {name: {_name(r) for r in reqs} for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
    for extra, distributions in EXTRAS.items():
        assert {_name(d) for d in distributions} == declared[extra]
    assert "llmquant[loaders,ray]" in PYPROJECT["project"]["optional-dependencies"]["dev"]  # dev tests every extra
    for modules in INTEGRATIONS.values():
        for module in modules:
            assert DISTRIBUTIONS.get(module, set()) & declared["loaders"], module


def test_a_missing_module_is_one_line_naming_the_extra() -> None:
    with pytest.raises(MissingDependency) as info:
        require("llmquant_no_such_module", extra="loaders", purpose="a test")
    message = str(info.value)
    assert "\n" not in message and "pip install 'llmquant[loaders]'" in message and "llmquant_no_such_module" in message
    assert isinstance(info.value, LlmquantError)  # so the CLI prints it as one line, exit code 1
    with pytest.raises(MissingDependency, match="python3 -m venv peers"):
        require("llmquant_no_such_module", install="python3 -m venv peers && peers/bin/pip install it")
