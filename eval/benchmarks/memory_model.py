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

Block transforms (``llmquant.host.transforms``) run every algorithm through the calibrated path
(the data-free ``rotate`` on 4 windows of 64 random tokens when there is no --calib) and add to
the block stage, T being awq's search tokens (``awq_tokens``, 0 without awq)::

        + 4 * w                                   the block in float32 while it is transformed
        + 4 * T * (7 * d + i)                     awq: its scopes' inputs and outputs over T tokens
                                                  (attention, MLP, o_proj, down_proj)

GPTQ's ``--gptaq`` runs the float model beside the quantized one, in replay mode::

        + 2 * N * d * b + w * b + 4 * i**2        its activations, a float copy of the block, dXXT

A mixture-of-experts block (E routed experts of inner width I, ``llmquant.host.expert_calibration``)
adds a stage to the calibrated maximum, while its experts are calibrated from their kept inputs::

        w * b + w * s + 2 * N * d * b + A         the block, its inputs/outputs, in-flight activations
        + [replay] N * d * b + N * k * 8          the experts' inputs (hidden states, routing) kept
        + c * 4 * (I**2 + [routed] d**2)          one chunk of c experts' Hessians (c from --moe-memory)
        + [all] 4 * d**2                          the gate/up Hessian all experts share
        + n * (d * (b + 4) + I * (3 * b + 4))     one batch's rows through one expert, their float32 copy,
                                                  its gate, up and intermediate, and that in float32 (n = T,
                                                  the batch's tokens, with all; n = T * k / E with routed)
        + 4 * 4 * |We| + 4 * max(d, I)**2         GPTQ's working copies for one expert projection
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
    experts: int = 0  # routed experts per block (0: a dense model)
    expert_inner: int = 0  # their inner width I
    top_k: int = 0

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
        **_expert_shapes(config),
    )


def _expert_shapes(config: dict[str, Any]) -> dict[str, int]:
    experts = int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0)
    if not experts:
        return {}
    inner = config.get("moe_intermediate_size") or config["intermediate_size"]  # Mixtral's experts use intermediate_size
    return {"experts": experts, "expert_inner": int(inner), "top_k": int(config.get("num_experts_per_tok", 2))}


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def single_pass_chosen(shapes: Shapes, calibration_tokens: int, activation_bytes: int = 2, calib_memory: int = 10**9) -> bool:
    """The host's ``--calib-mode auto`` rule: single pass when all its activations fit in ``--calib-memory``."""
    return calibration_tokens * shapes.hidden * activation_bytes * (2 + IN_FLIGHT_WIDTHS) <= calib_memory


def predict_peak_mb(shapes: Shapes, baseline_mb: float, *, calibration_tokens: int = 0, batch_tokens: int = 0,
                    activation_bytes: int = 2, single_pass: bool = False, moe_calibration: str = "routed",
                    moe_memory: int = 2**30, transformed: bool = False, search_tokens: int = 0,
                    float_inputs: bool = False) -> float:
    """Predicted peak resident memory in MiB (calibration_tokens=0 for uncalibrated algorithms;
    `transformed`: block transforms ran, awq's with `search_tokens`; `float_inputs`: GPTAQ)."""
    s, w, W = shapes.source_bytes, shapes.block_params, shapes.largest_weight
    outside = shapes.largest_outside * s
    if not calibration_tokens:
        return baseline_mb + max(w * s + 16 * W, outside) / MB
    N, d, b = calibration_tokens, shapes.hidden, activation_bytes
    in_flight = IN_FLIGHT_WIDTHS * (N if single_pass else batch_tokens) * d * b
    capture = shapes.vocab * d * b + 2 * N * d * b * (2 if float_inputs else 1)
    block = w * b + w * s + 2 * N * d * b + in_flight + 8 * shapes.widest_input**2 + 16 * W
    if transformed:
        block += 4 * w + 4 * search_tokens * (7 * d + shapes.widest_input)
    if float_inputs:
        block += 2 * N * d * b + w * b + 4 * shapes.widest_input**2
    return baseline_mb + max(capture, block, outside, _experts_stage(shapes, N, batch_tokens, b, in_flight, single_pass,
                                                                     moe_calibration, moe_memory)) / MB


def _experts_stage(shapes: Shapes, N: int, T: int, b: int, in_flight: int, single_pass: bool, policy: str, budget: int) -> int:
    """Bytes held while a mixture-of-experts block's experts are calibrated (0 for a dense model)."""
    if not shapes.experts:
        return 0
    d, I, w, s = shapes.hidden, shapes.expert_inner, shapes.block_params, shapes.source_bytes
    per_expert = 4 * (I**2 + (d**2 if policy == "routed" else 0))
    chunk = min(shapes.experts, max(1, budget // per_expert)) * per_expert + (4 * d**2 if policy == "all" else 0)
    kept = 0 if single_pass else N * d * b + N * shapes.top_k * 8
    n = T if policy == "all" else T * shapes.top_k // shapes.experts  # one batch through an expert: every token, or its share
    rows = n * (d * (b + 4) + I * (3 * b + 4))
    return w * b + w * s + 2 * N * d * b + in_flight + kept + chunk + rows + 16 * d * I + 4 * max(d, I) ** 2
