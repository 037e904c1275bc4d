"""llmquant: a plugin-based, layer-by-layer weight quantizer for Hugging Face LLMs."""

from __future__ import annotations

from llmquant.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "load_quantized", "quantize"]


def __getattr__(name: str) -> object:
    # The API pulls in transformers; keep `import llmquant` (and plugin imports of hookimpl) light.
    if name == "quantize":
        from llmquant.api import quantize

        return quantize
    if name == "load_quantized":
        from llmquant.runtime import load_quantized

        return load_quantized
    raise AttributeError(name)
