"""Optional dependencies: import one, or fail with one line that says what to install.

Everything the quantizer itself needs is in ``[project.dependencies]`` and imported normally.
A module that only some paths need (the real loaders `llmquant verify` and
``llmquant eval --loader transformers`` run, the peers the benchmarks compare with) is imported
through `require`, never with a plain ``import``; ``tests/test_dependencies.py`` enforces this.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from llmquant.errors import LlmquantError

__all__ = ["EXTRAS", "INTEGRATIONS", "MissingDependency", "available", "require", "require_integration"]

# extra name -> the distributions it installs (kept equal to pyproject.toml by a test)
EXTRAS: dict[str, tuple[str, ...]] = {
    "loaders": ("gptqmodel", "optimum", "defuser", "compressed-tensors", "bitsandbytes"),
    "ray": ("ray",),
}


# quant_method in config.json -> the modules transformers' integration for it imports
INTEGRATIONS: dict[str, tuple[str, ...]] = {
    "gptq": ("gptqmodel", "optimum"),
    "compressed-tensors": ("compressed_tensors",),
    "bitsandbytes": ("bitsandbytes",),
}


class MissingDependency(LlmquantError):
    """An optional module is not installed."""


def available(module: str) -> bool:
    """Return whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, *, extra: str | None = None, install: str | None = None, purpose: str = "") -> ModuleType:
    """Import `module`, or raise `MissingDependency` naming what to install.

    Args:
        module: the import name, e.g. ``"gptqmodel"``.
        extra: the llmquant extra that installs it (``pip install 'llmquant[EXTRA]'``).
        install: the install command when no extra holds it (a peer in its own environment).
        purpose: what needs it, for the message ("loading GPTQ outputs in transformers").

    Example:
        >>> require("json").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if extra is not None:
            fix = f"pip install 'llmquant[{extra}]'"
        else:
            fix = install or f"pip install {module}"
        need = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{module} is needed{need} but is not installed ({exc}): run `{fix}`") from exc


def require_integration(quant_method: str | None) -> None:
    """Check that transformers' integration for `quant_method` is installed (a float checkpoint,
    None, needs nothing), or raise `MissingDependency` naming the ``loaders`` extra."""
    for module in INTEGRATIONS.get(quant_method or "", ()):
        require(module, extra="loaders", purpose=f"loading {quant_method} checkpoints in transformers")
