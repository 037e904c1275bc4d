"""The rows of the peers benchmark and the settings they share: what `bench_peers` runs and `peers_report` reports.

A row is a name mapped to a tool and that tool's settings. Both the driver (which quantizes and
scores rows) and the report (which orders rows, compares each with GPTQModel at the same bits and
predicts llmquant's peak memory) read them from here, so neither imports the other for them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CALIB_SAMPLES", "CALIB_SEQLEN", "LLMQUANT_RUNTIME", "PEERS", "ROWS", "decode_runtime", "llmquant_reads",
           "needs_samples", "row_bits"]

# GPTQ rows of every tool calibrate on the same CALIB_SAMPLES windows of CALIB_SEQLEN token ids.
CALIB_SAMPLES, CALIB_SEQLEN = 64, 512
# name: (tool, settings). Tools: llmquant (settings go to llmquant.api.quantize), gptqmodel,
# llmcompressor (GPTQModifier or QuantizationModifier, W4A16, "awq": AWQModifier before it), bitsandbytes
# (transformers on CPU).
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn-w4": ("llmquant", {"algo": "rtn", "bits": 4}),
    "groupwise-w4": ("llmquant", {"algo": "groupwise-int4", "bits": 4}),
    "gptq-w4": ("llmquant", {"algo": "gptq", "bits": 4}),  # our default: min-max scales, as the peers' defaults
    "gptq-w4-mse": ("llmquant", {"algo": "gptq", "bits": 4, "mse": True}),  # clipping search weighted as GPTQ's objective
    "gptq-w4-mse-unweighted": ("llmquant", {"algo": "gptq", "bits": 4, "mse": True, "mse_weight": "none"}),  # the reference's
    "gptq-w4-desc-act-mse": ("llmquant", {"algo": "gptq", "bits": 4, "mse": True, "desc_act": True, "act_group_aware": False}),
    "gptq-w4-no-act-order-mse": ("llmquant", {"algo": "gptq", "bits": 4, "mse": True, "act_group_aware": False}),
    "nf4": ("llmquant", {"algo": "nf4"}),
    "gptq-w3-mse": ("llmquant", {"algo": "gptq", "bits": 3, "mse": True}),
    "gptq-w4-desc-act": ("llmquant", {"algo": "gptq", "bits": 4, "desc_act": True, "act_group_aware": False}),
    "gptq-w4-no-act-order": ("llmquant", {"algo": "gptq", "bits": 4, "act_group_aware": False}),
    "gptq-w3": ("llmquant", {"algo": "gptq", "bits": 3}),
    "gptq-w4-moe-all": ("llmquant", {"algo": "gptq", "bits": 4, "moe_calibration": "all"}),  # every token through every expert
    # block transforms (#21): activation-aware scaling and residual rotation, before RTN or GPTQ
    "awq-rtn-w4": ("llmquant", {"algo": "rtn", "bits": 4, "transforms": ["awq"]}),
    "awq-gptq-w4": ("llmquant", {"algo": "gptq", "bits": 4, "transforms": ["awq"]}),
    "rotate-rtn-w4": ("llmquant", {"algo": "rtn", "bits": 4, "transforms": ["rotate"]}),
    "rotate-gptq-w4": ("llmquant", {"algo": "gptq", "bits": 4, "transforms": ["rotate"]}),
    "awq-gptq-w3": ("llmquant", {"algo": "gptq", "bits": 3, "transforms": ["awq"]}),
    "rotate-gptq-w3": ("llmquant", {"algo": "gptq", "bits": 3, "transforms": ["rotate"]}),
    "gptqmodel-gptq-w4": ("gptqmodel", {"bits": 4}),  # its default order: act_group_aware, as our gptq-w4
    "gptqmodel-gptq-w4-no-act-order": ("gptqmodel", {"bits": 4, "act_group_aware": False}),
    "gptqmodel-gptq-w4-mse": ("gptqmodel", {"bits": 4, "mse": 2.0}),  # its clipping search, squared error as ours
    "gptqmodel-gptq-w3": ("gptqmodel", {"bits": 3}),  # the same settings as our gptq-w3
    # its AWQ (scale search, then clipping, then round to nearest) against our awq-rtn-w4; writes AWQ's GEMM format
    "gptqmodel-awq-w4": ("gptqmodel", {"bits": 4, "method": "awq"}),
    "gptqmodel-awq-w3": ("gptqmodel", {"bits": 3, "method": "awq"}),
    "llmcompressor-gptq-w4": ("llmcompressor", {"modifier": "GPTQModifier"}),  # its default order: actorder "static"
    "llmcompressor-gptq-w4-no-act-order": ("llmcompressor", {"modifier": "GPTQModifier", "actorder": None}),
    "llmcompressor-rtn-w4": ("llmcompressor", {"modifier": "QuantizationModifier"}),
    "llmcompressor-awq-gptq-w4": ("llmcompressor", {"modifier": "GPTQModifier", "awq": True}),  # AWQModifier first: our awq-gptq-w4
    "bitsandbytes-nf4": ("bitsandbytes", {}),
}
PEERS = ("gptqmodel", "llmcompressor", "bitsandbytes")  # the tools that are not llmquant (row names start with them)
LLMQUANT_RUNTIME = "llmquant int4 kernel"


def needs_samples(row: str) -> bool:
    """Return whether `row` calibrates (and so needs the shared calibration token ids)."""
    tool, settings = ROWS[row]
    return (settings.get("algo") == "gptq" or tool == "gptqmodel" or settings.get("modifier") == "GPTQModifier"
            or "awq" in settings.get("transforms", ()))


def row_bits(row: str) -> int:
    """Return the bits a row quantizes to (4 for rows that do not say: NF4 and the W4A16 peers)."""
    return int(ROWS.get(row, ("", {}))[1].get("bits", 4))


def llmquant_reads(row: str) -> bool:
    """Return whether the benchmark scores the row's output with ``llmquant.load_quantized``.

    Transformers reads the others: the float original, bitsandbytes' own files and GPTQModel's AWQ
    files (AWQ's GEMM layout, which no llmquant format reads).
    """
    if row == "fp32":
        return False
    tool, settings = ROWS[row]
    return tool != "bitsandbytes" and settings.get("method") != "awq"


def decode_runtime(row: str) -> str:
    """Return the runtime a CPU user of this output would decode with.

    llmquant's own int4 kernel for its 4-bit GPTQ files, and the loader the format was written for
    otherwise (our NF4 files are bitsandbytes files; 3-bit GPTQ files are what GPTQModel's torch
    kernel serves). ``"fp32"`` is the float original.
    """
    if row == "fp32":
        return "transformers"
    tool, settings = ROWS[row]
    if tool == "llmquant":
        if settings["algo"] == "nf4":
            return "transformers + bitsandbytes"
        return LLMQUANT_RUNTIME if settings.get("bits") == 4 else "transformers + gptqmodel"
    return {"gptqmodel": "transformers + gptqmodel", "llmcompressor": "transformers + compressed-tensors",
            "bitsandbytes": "transformers + bitsandbytes"}[tool]
