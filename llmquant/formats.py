"""Output formats: the interface format plugins implement, and what the host records per module.

A format turns an algorithm's result into named tensors and a ``quantization_config`` that real
loaders understand, and reads its own tensors back (for llmquant's runtime and ``verify``).
Formats are registered through the `llmquant_register_formats` hook, exactly as algorithms are,
and declare which result types they accept, so an algorithm/format pair that cannot be
represented is refused before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from llmquant.algorithm import CodebookQuantized, QuantResult, UniformQuantized

__all__ = ["ModuleRecord", "OutputFormat", "has_act_order", "output_dtype", "quantizer_name", "record_for", "result_settings"]


@dataclass(frozen=True)
class ModuleRecord:
    """What was done to one Linear: quantized with these settings, or kept in float (bits None).

    ``group_size`` is the block size for codebook results; ``extra`` holds settings only some
    formats need (``{"codebook": "nf4", "double_quant": True}``).
    """

    name: str
    shape: tuple[int, int]
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def result_settings(result: QuantResult) -> dict[str, Any]:
    """Return the settings a format records for one result (bits, group size, symmetry, extras)."""
    if isinstance(result, UniformQuantized):
        return {"bits": result.bits, "group_size": result.group_size, "symmetric": result.symmetric,
                "extra": {"act_order": True} if has_act_order(result) else {}}
    if isinstance(result, CodebookQuantized):
        return {"bits": 4, "group_size": result.blocksize, "symmetric": None,
                "extra": {"codebook": result.name, "double_quant": result.nested is not None}}
    raise TypeError(f"unknown result type {type(result).__name__}")


def record_for(name: str, shape: tuple[int, int], result: QuantResult) -> ModuleRecord:
    """Return the record of a Linear quantized to `result`."""
    return ModuleRecord(name, shape, **result_settings(result))


def quantizer_name() -> str:
    """Return ``llmquant:VERSION``, for the quantizer fields formats record."""
    from llmquant import __version__

    return f"llmquant:{__version__}"


def output_dtype(model_config: Mapping[str, Any], cast: str = "auto") -> torch.dtype:
    """Return the float dtype of the output model: `cast` unless "auto", else config.json's dtype."""
    name = cast if cast != "auto" else model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def has_act_order(result: UniformQuantized) -> bool:
    """Return whether the groups are scattered over the input channels (g_idx not ``i // group_size``)."""
    in_features = result.shape[1]
    trivial = torch.arange(in_features) // (result.group_size or in_features)
    return not torch.equal(result.g_idx.cpu().long(), trivial)


@runtime_checkable
class OutputFormat(Protocol):
    """An on-disk layout, registered through `llmquant_register_formats`.

    Class attributes:
        name: what users pass as ``--format``; unique across installed plugins.
        description: one line for ``llmquant formats`` (what it is, which servers load it).
        accepts: the result types (`UniformQuantized`, `CodebookQuantized`) it can store.
        default_for: result types for which ``--format auto`` picks this format.

    The host creates one instance per run and calls, in order: `check_module` for every Linear
    before any work, `tensors` once per quantized Linear, `quantization_config` once at the end.

    Optional, for a format with settings or files of its own (GGUF has both):
        options_type: a frozen dataclass of the format's settings (flat keys in TOML and the
            API, e.g. ``gguf_type``); the host validates them and builds the format as
            ``cls(options_type(**values))``.
        constraints(name, shape, config): settings the algorithm must honour for this Linear,
            merged into its config before `check_module` (GGUF's K-quants: ``scale_grid``).
        check_model(folder): called with the source checkpoint folder before any work; raises
            CheckpointError for a model the format cannot describe (GGUF: its architecture).
        finish(folder, records): called once the temporary output folder holds the shards,
            config.json and tokenizer; turns them into the format's own files (``model.gguf``).
        open(folder): its files read back as a ``Mapping[str, Tensor]`` under the checkpoint's
            names, the Linears as the tensors `read` takes (llmquant's runtime uses it instead
            of the safetensors shards), with a ``sizes`` dict of each tensor's bytes on disk
            (for ``llmquant inspect``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    accepts: ClassVar[tuple[type, ...]]
    default_for: ClassVar[tuple[type, ...]]

    def check_module(self, name: str, shape: tuple[int, int], config: Any) -> None:
        """Raise ShapeError or ConfigError, naming `name` and the fix, when this Linear of `shape`
        quantized with the algorithm's `config` could not be stored."""
        ...

    def tensors(self, result: Any, dtype: torch.dtype) -> dict[str, Tensor]:
        """Return the tensors of one quantized Linear, named without the module prefix.

        Args:
            result: an instance of one of `accepts`.
            dtype: the float dtype of the output model (for scales and recorded dtypes).
        """
        ...

    def quantization_config(self, records: list[ModuleRecord], algo_params: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Return config.json's ``quantization_config`` for a model whose Linears are `records`."""
        ...

    def recognizes(self, quantization_config: Mapping[str, Any]) -> bool:
        """Return whether a checkpoint with this ``quantization_config`` is in this format."""
        ...

    def quantized_module(self, key: str) -> str | None:
        """Return the module name if tensor `key` marks a Linear stored in this format, else None."""
        ...

    def read(self, tensors: Mapping[str, Tensor], quantization_config: Mapping[str, Any]) -> QuantResult:
        """Read back one Linear from its tensors (named without the module prefix, bias excluded)."""
        ...
