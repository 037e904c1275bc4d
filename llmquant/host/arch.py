"""Find a model's decoder blocks and their Linear layers from its structure, not its names.

The decoder blocks are the longest `nn.ModuleList` whose entries contain `nn.Linear` layers
(``model.layers`` in Llama, Qwen2 and Gemma3, ``model.decoder.layers`` in OPT). The skeleton
they are found in is built with parameters on the meta device, so this costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from llmquant.errors import CheckpointError

__all__ = ["BlockLayout", "build_skeleton", "find_blocks"]


@dataclass(frozen=True)
class BlockLayout:
    """Where the decoder blocks are and which Linears each holds.

    Attributes:
        prefix: module path of the block list, e.g. ``"model.layers"``.
        linears: per block, the Linear layers' names relative to the block, in module order.
    """

    prefix: str
    linears: tuple[tuple[str, ...], ...]

    @property
    def count(self) -> int:
        return len(self.linears)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def build_skeleton(config: Any) -> nn.Module:
    """Build the causal-LM module tree for a transformers config with parameters on meta.

    Buffers (e.g. rotary frequencies) stay real, so the skeleton can later run once its
    parameters are assigned.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model: nn.Module = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
            return model
    except ValueError as exc:
        raise CheckpointError(
            f"transformers has no causal-LM class for model_type {getattr(config, 'model_type', '?')!r} ({exc}); "
            f"upgrade transformers or use a supported architecture"
        ) from exc


def find_blocks(model: nn.Module) -> BlockLayout:
    """Return the layout of the decoder blocks of `model`.

    Raises:
        CheckpointError: no ModuleList whose entries hold Linear layers.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise CheckpointError(
            f"{type(model).__name__} has no recognizable decoder blocks (a ModuleList of layers holding "
            f"nn.Linear); llmquant quantizes transformer decoders such as Llama, Qwen2, Gemma3 and OPT"
        )
    prefix, blocks = best
    linears = tuple(
        tuple(name for name, m in block.named_modules() if isinstance(m, nn.Linear)) for block in blocks
    )
    return BlockLayout(prefix=prefix, linears=linears)
