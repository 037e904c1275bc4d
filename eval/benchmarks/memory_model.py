"""Predicted peak memory of an llmquant run, from the checkpoint's shapes alone.

The terms are those of ``llmquant.host.calibrate`` (calibrated algorithms) and
``llmquant.host.runner`` (every algorithm), with B the measured baseline of a process that has
imported torch, transformers and llmquant::

    uncalibrated (RTN, groupwise-int4, NF4):
        P = B + max(w * s + 4 * 4 * |W|,       one block's tensors in the source dtype (s bytes)
                                                 plus the float32 working copies of its largest weight
                    t * s)                       the largest tensor outside the blocks (embedding, lm_head)
    calibrated (GPTQ), N calibration tokens, activations in b bytes:
        P = B + max(v * d * b + 2 * N * d * b,   capture: the embedding in the activation dtype, inputs
                    w * b + w * s                 a block in the activation dtype (and its source tensors)
                    + 2 * N * d * b               the block's inputs and outputs
                    + A                           in-flight activations: one batch (replay) or all (single-pass)
                    + 2 * 4 * i**2                one Hessian and GPTQ's working copy of it
                    + 4 * 4 * |W|,                the weight being quantized and GPTQ's working copies
                    t * s)

w: parameters of one decoder block; |W|: the largest Linear weight in it; i: the widest Linear
input; d: hidden size; v: vocabulary; t: elements of the largest tensor outside the blocks.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Shapes", "predict_peak_mb", "shapes_of", "single_pass_chosen"]

MB = 1024 * 1024
IN_FLIGHT_WIDTHS = 16  # llmquant.host.calibrate.IN_FLIGHT_WIDTHS


@dataclass(frozen=True)
class Shapes:
    block_params: int
    largest_weight: int
    widest_input: int
    hidden: int
    vocab: int
    largest_outside: int
    source_bytes: int
    layers: int
    params: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shapes_of(folder: Path) -> Shapes:
    """Read the sizes the formula needs from a checkpoint folder's config and safetensors headers."""
    from llmquant.host.checkpoint import Checkpoint

    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    infos = Checkpoint(folder).infos
    block = re.compile(r"\.layers\.(\d+)\.")
    first = [info for key, info in infos.items() if (m := block.search(key)) and m.group(1) == "0"]
    outside = [info for key, info in infos.items() if not block.search(key)]
    matrices = [info for info in first if len(info.shape) == 2]
    elements = [_count(i.shape) for i in infos.values()]
    return Shapes(
        block_params=sum(_count(i.shape) for i in first),
        largest_weight=max(_count(i.shape) for i in matrices),
        widest_input=max(i.shape[1] for i in matrices),
        hidden=config["hidden_size"],
        vocab=config["vocab_size"],
        largest_outside=max(_count(i.shape) for i in outside),
        source_bytes=first[0].nbytes // _count(first[0].shape),
        layers=config["num_hidden_layers"],
        params=sum(elements),
    )


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def single_pass_chosen(shapes: Shapes, calibration_tokens: int, activation_bytes: int = 2, calib_memory: int = 10**9) -> bool:
    """The host's ``--calib-mode auto`` rule: single pass when all its activations fit in ``--calib-memory``."""
    return calibration_tokens * shapes.hidden * activation_bytes * (2 + IN_FLIGHT_WIDTHS) <= calib_memory


def predict_peak_mb(shapes: Shapes, baseline_mb: float, *, calibration_tokens: int = 0, batch_tokens: int = 0,
                    activation_bytes: int = 2, single_pass: bool = False) -> float:
    """Predicted peak resident memory in MiB (calibration_tokens=0 for uncalibrated algorithms)."""
    s, w, W = shapes.source_bytes, shapes.block_params, shapes.largest_weight
    outside = shapes.largest_outside * s
    if not calibration_tokens:
        return baseline_mb + max(w * s + 16 * W, outside) / MB
    N, d, b = calibration_tokens, shapes.hidden, activation_bytes
    in_flight = IN_FLIGHT_WIDTHS * (N if single_pass else batch_tokens) * d * b
    capture = shapes.vocab * d * b + 2 * N * d * b
    block = w * b + w * s + 2 * N * d * b + in_flight + 8 * shapes.widest_input**2 + 16 * W
    return baseline_mb + max(capture, block, outside) / MB
