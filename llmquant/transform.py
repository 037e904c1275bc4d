"""The block-transform interface: equivalent rewrites of a decoder block before it is quantized.

A transform changes weights so that the float model computes the same function while its
weights quantize better: activation-aware scaling (AWQ) moves per-channel scales between a
norm or Linear and the Linears that read its output; a rotation turns the residual stream by an
orthogonal matrix folded into every weight that reads or writes it. Like an algorithm, a
transform sees tensors, never modules: the host finds the block's structure, hands the
transform the block's float32 weights with what it found (`ScalePoint`s, the Linears that read
and write the residual stream) and closures that run the block's parts on calibration data,
and applies what comes back. Before any weight is quantized the host checks that the
transformed float block computes what the original did on calibration inputs; a transform that
changes it beyond a tolerance is an error naming the plugin.

Transforms run in the order given (``--transform awq --transform rotate``), each on the previous
one's result. A transform that needs model-wide changes (the rotation's embeddings and head)
returns them once, before the first block, from `Transform.prepare`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["BlockContext", "ModelContext", "ModelEdit", "ScalePoint", "Transform"]


@dataclass(frozen=True)
class ScalePoint:
    """A tensor inside a block that can be divided per channel by ``s`` where it is produced and
    multiplied back in every Linear that reads it, leaving the block's function unchanged.

    The host finds scale points structurally and proves each one by perturbation: a norm whose
    output the readers take as it is (``x -> x / s`` by dividing its weight, or ``(1 + w)`` for
    Gemma's offset norms), or a Linear whose output rows reach the readers linearly (``v_proj`` ->
    ``o_proj`` through attention, ``up_proj`` -> ``down_proj`` through the gated product).

    Attributes:
        producer: the module that produces the tensor, relative to the block (``input_layernorm``).
        kind: ``"norm"`` (a 1-D weight, and bias) or ``"linear"`` (the rows of a weight, and bias).
        readers: the Linears that read it, relative to the block (``self_attn.q_proj``, ...).
        offset: a norm's weight offset: the norm multiplies by ``weight + offset`` (Gemma: 1).
        scope: the smallest module holding every reader (``self_attn``, ``mlp``, ``mlp.down_proj``):
            where a change of the readers' weights stops changing activations, for `BlockContext.error`.
    """

    producer: str
    kind: str
    readers: tuple[str, ...]
    offset: float = 0.0
    scope: str = ""

    def apply(self, weights: dict[str, Tensor], s: Tensor) -> None:
        """Divide the producer's output by `s: (channels,)` and multiply the readers' input
        columns by it, in `weights` (relative parameter name -> tensor), in place of the old tensors."""
        s = s.to(torch.float32)
        if self.kind == "norm":
            w = weights[f"{self.producer}.weight"]
            weights[f"{self.producer}.weight"] = (w + self.offset) / s - self.offset
        else:
            w = weights[f"{self.producer}.weight"]
            weights[f"{self.producer}.weight"] = w / s[:, None]
        if f"{self.producer}.bias" in weights:
            weights[f"{self.producer}.bias"] = weights[f"{self.producer}.bias"] / s
        for reader in self.readers:
            weights[f"{reader}.weight"] = weights[f"{reader}.weight"] * s[None, :]


@dataclass
class BlockContext:
    """One decoder block as a transform sees it.

    Attributes:
        name: the block's module path (``model.layers.3``).
        weights: every parameter of the block by relative name, float32; the transform replaces
            entries (``weights[k] = new``), the host loads what it finds here afterwards.
        scale_points: where per-channel scales can move (see `ScalePoint`), in execution order.
        residual_readers: Linears that read the residual stream through a norm (q/k/v, gate/up).
        residual_writers: Linears whose output is added to the residual stream (o_proj, down_proj).
        post_norms: norms that normalize a Linear's output before it joins the residual stream
            (Gemma-3's ``post_attention_layernorm`` after ``o_proj``).
        input_mean: ``input_mean(point)`` is the mean of ``|x|`` per channel, float32 ``(channels,)``,
            of the point's readers' input over the search tokens (calibrated transforms only).
        error: ``error(point, weights)`` is the mean squared error of the point's `scope` output
            with `weights` in place of the block's original ones (only the entries given), against
            the original block's, over the search tokens (calibrated transforms only).
        fake_quantize: ``fake_quantize(reader, W)`` is `W` quantized and dequantized the way the
            run's algorithm quantizes that Linear without calibration (its grid, its group size).
        search_tokens: how many calibration tokens (the first windows) `input_mean` and `error` use;
            a transform may change it before its first call to either.
    """

    name: str
    weights: dict[str, Tensor]
    scale_points: list[ScalePoint]
    residual_readers: tuple[str, ...]
    residual_writers: tuple[str, ...]
    post_norms: tuple[str, ...] = ()
    input_mean: Callable[[ScalePoint], Tensor] | None = None
    error: Callable[[ScalePoint, Mapping[str, Tensor]], float] | None = None
    fake_quantize: Callable[[str, Tensor], Tensor] | None = None
    search_tokens: int = 2048


@dataclass(frozen=True)
class ModelContext:
    """What a transform's `prepare` knows of the whole model (names are checkpoint keys).

    Attributes:
        hidden_size: width of the residual stream.
        embedding: the token embedding's weight key.
        head: the output head's weight key (``lm_head.weight``); when `tied`, the checkpoint has no
            such tensor until a transform unties the head (`ModelEdit.untie`).
        tied: whether the head is the embedding.
        final_norm: the weight key of the norm applied before the head.
        final_norm_offset: that norm's weight offset (Gemma: 1).
        model_type: ``config.json``'s ``model_type``.
        read: ``read(key)`` returns a checkpoint tensor in float32 (the final norm's weight, say).
    """

    hidden_size: int
    embedding: str
    head: str
    tied: bool
    final_norm: str | None
    final_norm_offset: float
    model_type: str
    read: Callable[[str], Tensor]


@dataclass
class ModelEdit:
    """Model-wide changes a transform asks for before the first block.

    Attributes:
        rotation: ``Q: (hidden, hidden)``, orthogonal: the residual stream becomes ``x @ Q``
            from the embedding on, so each block's input arrives rotated; the transform rotates
            the weights of the blocks it receives to match (the host checks that it did).
        tensors: checkpoint key -> function of the tensor's float32 value returning its new value,
            applied when the tensor is read (embedding, head, final norm), so nothing is held.
        untie: write the head as a tensor of its own (``tie_word_embeddings`` false), for a model
            whose head must differ from its embedding after the change.
    """

    rotation: Tensor | None = None
    tensors: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    untie: bool = False


@runtime_checkable
class Transform(Protocol):
    """A block transform, registered through `llmquant_register_transforms`.

    Class attributes:
        name: what users pass as ``--transform``; unique across installed plugins.
        description: one line for ``llmquant transforms``.
        config_type: a frozen dataclass of the transform's settings; its field names (prefixed with
            the transform's name, ``awq_grid``) are config keys.
        needs_calibration: when True the run needs calibration data, and `BlockContext.input_mean`
            and `BlockContext.error` are set.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_type: ClassVar[type[Any]]
    needs_calibration: ClassVar[bool]

    def prepare(self, model: ModelContext, config: Any) -> ModelEdit:
        """Return the model-wide changes (or an empty `ModelEdit`); raise `LlmquantError` for a
        model the transform cannot handle, in one line naming the model and the way out."""
        ...

    def transform_block(self, block: BlockContext, config: Any) -> None:
        """Rewrite `block.weights` into an equivalent block."""
        ...
