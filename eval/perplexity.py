"""Perplexity by the standard protocol, so numbers compare with the GPTQ, AWQ and llama.cpp papers.

The text is read as one string and tokenized whole; it is cut into non-overlapping windows of
`seqlen` tokens, the partial tail dropped; each window is scored on its own (no context carried
over) and perplexity is ``exp`` of the mean next-token NLL over all scored tokens
(``seqlen - 1`` per window). GPTQ's reference scores ``nll * seqlen`` per window; with equal
windows the two means are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PerplexityResult", "perplexity", "windows"]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    seqlen: int
    tokens_scored: int


def windows(token_ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Return ``(n, seqlen)`` non-overlapping windows of a 1-D token tensor, tail dropped."""
    n = token_ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    return token_ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: Tensor, seqlen: int, max_windows: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Return the perplexity of `model` on 1-D `token_ids`.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seqlen, vocab).
        seqlen: tokens per window.
        max_windows: score only the first windows, to bound the work.
    """
    batches = windows(token_ids, seqlen, max_windows)
    total = 0.0
    scored = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="perplexity", unit="window")
    for window in iterator:
        logits = model(window[None]).logits[0, :-1].float()
        nll = nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        total += float(nll)
        scored += seqlen - 1
    return PerplexityResult(math.exp(total / scored), len(batches), seqlen, scored)
