"""Evaluate one model (an original checkpoint or an llmquant output) and describe it for the report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .memory import disk_bytes, model_bytes, peak_rss_mb, reset_peak
from .perplexity import perplexity
from .speed import measure_speed

__all__ = ["ModelEval", "PerplexitySettings", "SpeedSettings", "bits_per_weight", "evaluate_model", "load_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexitySettings:
    """Which text and windows to score (see `eval.perplexity`)."""

    token_ids: torch.Tensor
    source: str
    seqlen: int | None = None
    stride: int | None = None
    max_windows: int | None = None


@dataclass(frozen=True)
class SpeedSettings:
    batch_sizes: tuple[int, ...] = (1,)
    prompt_tokens: int = 128
    new_tokens: int = 32
    runs: int = 5
    warmup: int = 1


@dataclass
class ModelEval:
    """Every number measured for one model, and what it is."""

    name: str
    path: str
    role: str
    loader: str
    dtype: str
    device: str
    quantization: dict[str, Any]
    bits_per_weight: float
    disk_bytes: int
    memory_bytes: int = 0
    load_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_rss_reset: bool = False
    peak_cuda_mb: float | None = None
    perplexity: dict[str, Any] | None = None
    speed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(path: Path, *, loader: str, dtype: torch.dtype, device: str) -> Any:
    """Load `path` for evaluation: llmquant's own runtime for llmquant outputs (``loader="llmquant"``),
    or transformers with the format's own integration (``"transformers"``; gptqmodel,
    compressed-tensors, bitsandbytes) to cross-check; an original checkpoint loads with transformers."""
    from transformers import AutoModelForCausalLM

    from llmquant.deps import require_integration

    quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    if quant is not None and loader == "llmquant":
        from llmquant.runtime import load_quantized

        return load_quantized(path, dtype=dtype).to(device).eval()
    require_integration(quant.get("quant_method") if quant else None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()


def bits_per_weight(path: Path) -> tuple[float, dict[str, Any]]:
    """Return (bits per Linear weight in the blocks, quantization summary) of a checkpoint folder.

    For llmquant outputs the bits are the stored bytes of every block Linear's tensors (codes,
    scales, zeros, g_idx, absmax) over its weight count; for float checkpoints the dtype's width.
    """
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if (path / "llmquant.json").exists():
        from llmquant.describe import describe_output

        info = describe_output(path)
        weights = sum(m["shape"][0] * m["shape"][1] for m in info["modules"])
        summary = {"method": quant.get("quant_method"), "algo": info["config"].get("algo"), "format": info["config"].get("format"),
                   "bits": quant.get("bits") or quant.get("config_groups", {}).get("group_0", {}).get("weights", {}).get("num_bits") or 4,
                   "group_size": quant.get("group_size") or quant.get("bnb_4bit_quant_type")}
        return 8 * info["linear_bytes"] / weights, summary
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    width = torch.finfo(getattr(torch, name, torch.float32)).bits
    return float(width), ({"method": quant.get("quant_method")} if quant else {})


def evaluate_model(path: Path, *, name: str, role: str, loader: str, dtype: torch.dtype, device: str,
                   ppl: PerplexitySettings | None, speed: SpeedSettings | None) -> ModelEval:
    """Load `path` and measure what was asked: perplexity, tokens/s, memory."""
    bpw, summary = bits_per_weight(path)
    reset = reset_peak()
    start = time.perf_counter()
    model = load_model(path, loader=loader, dtype=dtype, device=device)
    result = ModelEval(name=name, path=str(path), role=role, loader=loader, dtype=str(dtype).removeprefix("torch."),
                       device=device, quantization=summary, bits_per_weight=bpw, disk_bytes=disk_bytes(path),
                       memory_bytes=model_bytes(model), load_seconds=time.perf_counter() - start)
    if ppl is not None:
        seqlen = ppl.seqlen or min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)
        log.info("%s: perplexity on %s, windows of %d tokens", name, ppl.source, seqlen)
        p = perplexity(model, ppl.token_ids, seqlen, ppl.max_windows, progress=True, stride=ppl.stride)
        result.perplexity = {**asdict(p), "source": ppl.source}
    for batch_size in speed.batch_sizes if speed is not None else ():
        assert speed is not None
        log.info("%s: speed at batch %d", name, batch_size)
        s = measure_speed(model, batch_size=batch_size, prompt_tokens=speed.prompt_tokens, new_tokens=speed.new_tokens,
                          runs=speed.runs, warmup=speed.warmup)
        result.speed.append(s.to_dict())
    result.peak_rss_mb, result.peak_rss_reset = peak_rss_mb(), reset
    if device.startswith("cuda"):
        result.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
    del model
    return result
