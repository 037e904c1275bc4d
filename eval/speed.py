"""Tokens per second: prefill (prompt tokens/s) and decode (new tokens/s), measured separately.

Prefill is one forward pass over a batch of fixed-length prompts. Decode then generates a fixed
number of tokens greedily, one forward pass per token with the KV cache, so decode speed is the
per-token cost a chat user sees. Each measurement is repeated after warm-up runs; the median and
the spread (min, max) are reported, with the thread count and device, since single timings on a
shared CPU are noisy.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SpeedResult", "measure_speed"]


@dataclass(frozen=True)
class SpeedResult:
    """Tokens per second of one batch size, over `runs` timed repetitions."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    warmup: int
    prefill_tokens_per_s: float
    prefill_spread: tuple[float, float]
    decode_tokens_per_s: float
    decode_spread: tuple[float, float]
    threads: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: nn.Module) -> str:
    """transformers 5.20+ names the KV cache ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _one_run(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Return (prefill seconds, decode seconds) of one prompt batch and `new_tokens` greedy steps."""
    device = prompt.device
    _synchronize(device)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    _synchronize(device)
    prefill = time.perf_counter() - start
    name = _cache_argument(model)
    cache, token = out[name], out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, **{name: cache}, use_cache=True)
        cache, token = out[name], out.logits[:, -1:].argmax(-1)
    _synchronize(device)
    return prefill, time.perf_counter() - start


def measure_speed(model: nn.Module, *, batch_size: int = 1, prompt_tokens: int = 128, new_tokens: int = 32,
                  runs: int = 5, warmup: int = 1, vocab_size: int | None = None, seed: int = 0) -> SpeedResult:
    """Time prefill and decode of `model` on random prompts (token ids only matter for their count).

    Args:
        batch_size: sequences per forward pass.
        prompt_tokens: prompt length of each sequence.
        new_tokens: tokens generated per sequence after the prompt.
        runs: timed repetitions; warmup: untimed ones before them.
    """
    if min(batch_size, prompt_tokens, new_tokens, runs) < 1 or warmup < 0:
        raise ValueError("batch_size, prompt_tokens, new_tokens and runs must be >= 1, warmup >= 0")
    device = next(model.parameters()).device
    vocab = vocab_size or int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (batch_size, prompt_tokens), generator=generator).to(device)
    for _ in range(warmup):
        _one_run(model, prompt, min(new_tokens, 4))
    times = [_one_run(model, prompt, new_tokens) for _ in range(runs)]
    prefill = [batch_size * prompt_tokens / p for p, _ in times]
    decode = [batch_size * new_tokens / d for _, d in times]
    return SpeedResult(
        batch_size=batch_size, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=warmup,
        prefill_tokens_per_s=statistics.median(prefill), prefill_spread=(min(prefill), max(prefill)),
        decode_tokens_per_s=statistics.median(decode), decode_spread=(min(decode), max(decode)),
        threads=torch.get_num_threads(), device=str(device),
    )
