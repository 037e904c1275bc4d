"""The algorithm interface: what an algorithm receives and what it returns.

An algorithm is a small class over pure tensor functions. The host hands it one weight at a
time, `W: (out_features, in_features)`, with the algorithm's own frozen config and, when the
algorithm asks for it, calibration statistics of that layer's input. It returns a declared
result type; output formats consume these results and never an algorithm's internals.

Result types:

* `UniformQuantized`: integer codes of an affine quantizer with per-group scales and zeros,
  and the group of every input channel (`g_idx`). RTN, GPTQ and groupwise searches return it.
* `CodebookQuantized`: indices into a fixed codebook with a per-block absmax (NF4, FP4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Algorithm",
    "CalibrationStats",
    "CodebookQuantized",
    "NestedAbsmax",
    "QuantResult",
    "UniformQuantized",
]


@dataclass(frozen=True)
class UniformQuantized:
    """Codes of a uniform affine quantizer: ``W[o, i] ~ scales[o, g] * (codes[o, i] - zeros[o, g])``
    with ``g = g_idx[i]``.

    Attributes:
        codes: (out, in) uint8, values in ``[0, 2**bits - 1]``.
        scales: (out, G) float32, one per output row and group.
        zeros: (out, G) int32, values in ``[0, 2**bits - 1]``; symmetric codes use ``2**(bits-1)``.
        g_idx: (in,) int32, the group of each input channel (``i // group_size`` unless the
            algorithm reorders columns, as GPTQ's act-order does).
        bits: bits per code.
        group_size: input channels per group; None means one group per output row.
        symmetric: whether zeros are fixed at ``2**(bits-1)``.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.codes.shape
        return int(out_features), int(in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Return the float weight (out, in) these codes stand for."""
        g = self.g_idx.long()
        W = (self.codes.float() - self.zeros[:, g].float()) * self.scales[:, g].float()
        return W.to(dtype)


@dataclass(frozen=True)
class NestedAbsmax:
    """Block scales stored in 8 bits, as bitsandbytes' double quantization does:
    ``absmax[k] = code_map[codes[k]] * scales[k // blocksize] + offset``.

    Attributes:
        codes: (n_blocks,) uint8 indices into `code_map`.
        scales: (ceil(n_blocks / blocksize),) float32 absmax of each block of ``absmax - offset``.
        code_map: (256,) float32, bitsandbytes' signed dynamic map.
        offset: the mean of the original block scales, subtracted before quantizing them.
        blocksize: block scales per nested block (256).
    """

    codes: Tensor
    scales: Tensor
    code_map: Tensor
    offset: float
    blocksize: int = 256

    def dequantize(self) -> Tensor:
        """Return the float32 block scales (n_blocks,)."""
        values = self.code_map[self.codes.long()]
        pad = -values.numel() % self.blocksize
        blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, self.blocksize) * self.scales.view(-1, 1)
        return blocks.flatten()[: values.numel()] + torch.tensor(self.offset, dtype=torch.float32)


@dataclass(frozen=True)
class CodebookQuantized:
    """Indices into a codebook, scaled per block of consecutive row-major elements.

    ``W.flatten()[k] ~ codebook[codes.flatten()[k]] * absmax[k // blocksize]``.

    Attributes:
        codes: (out, in) uint8 indices into `codebook`.
        absmax: (out * in // blocksize,) float32 scale of each block (the dequantized values when
            `nested` is set).
        codebook: (16,) float32, normalized to [-1, 1].
        blocksize: elements per absmax block.
        name: the codebook's name ("nf4", "fp4").
        nested: how `absmax` is stored in 8 bits (double quantization), or None for float32.
    """

    codes: Tensor
    absmax: Tensor
    codebook: Tensor
    blocksize: int
    name: str
    nested: NestedAbsmax | None = None

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.codes.shape
        return int(out_features), int(in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Return the float weight (out, in) these codes stand for (float32 products, then `dtype`,
        as bitsandbytes computes them)."""
        values = self.codebook[self.codes.long()].flatten()
        blocks = values.view(-1, self.blocksize) * self.absmax.view(-1, 1)
        return blocks.view(self.shape).to(dtype)


QuantResult = Union[UniformQuantized, CodebookQuantized]


@dataclass(frozen=True)
class CalibrationStats:
    """What the host measured about one layer's input on calibration data.

    Attributes:
        H: (in, in) float32, ``2/n * sum(x x^T)`` over the n calibration tokens (GPTQ's Hessian).
        nsamples: number of tokens accumulated into `H`.
        dXXT: (in, in) float32, ``2/n * sum((x_float - x) x^T)``, where ``x_float`` is the layer's input
            in the float model and ``x`` its input in the model quantized so far (GPTAQ's asymmetric
            term); only for algorithms whose ``wants_float_inputs(config)`` is true, else None.
    """

    H: Tensor
    nsamples: int
    dXXT: Tensor | None = None


@runtime_checkable
class Algorithm(Protocol):
    """A quantization algorithm, registered through `llmquant_register_algorithms`.

    Class attributes:
        name: the name users pass as ``--algo``; unique across installed plugins.
        description: one line for ``llmquant algorithms``.
        config_type: a frozen dataclass of the algorithm's settings; its fields become config
            keys and CLI flags, and its ``__post_init__`` validates them with `ConfigError`.
        result_type: `UniformQuantized` or `CodebookQuantized`; formats declare which they accept.
        needs_calibration: when True the host collects `CalibrationStats` for every layer and
            refuses to run without calibration data.

    Optional class method:
        wants_float_inputs(config) -> bool: when true for a module's config, the host also runs
            the float model alongside the quantized one and fills `CalibrationStats.dXXT` (GPTAQ).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_type: ClassVar[type[Any]]
    result_type: ClassVar[type[Any]]
    needs_calibration: ClassVar[bool]

    def quantize_weight(self, W: Tensor, config: Any, stats: CalibrationStats | None) -> QuantResult:
        """Quantize one weight.

        Args:
            W: (out_features, in_features) float tensor, on the device the host chose; not modified.
            config: an instance of `config_type`.
            stats: calibration statistics of this layer's input, or None when
                `needs_calibration` is False, or when calibration did not reach this weight (a
                routed expert that too few calibration tokens were sent to): a calibrated
                algorithm then returns its calibration-free result (GPTQ: round-to-nearest on
                its grid), which the host records as a fallback.

        Returns:
            An instance of `result_type`, on `W`'s device.

        Raises:
            ShapeError: when the weight's shape does not fit the config (e.g. group size).
        """
        ...
