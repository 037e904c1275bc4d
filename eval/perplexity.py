"""Perplexity by the standard protocol, so numbers compare with the GPTQ, AWQ and llama.cpp papers.

The text is read as one string and tokenized whole; it is cut into non-overlapping windows of
`seqlen` tokens, the partial tail dropped; each window is scored on its own (no context carried
over) and perplexity is ``exp`` of the mean next-token NLL over all scored tokens
(``seqlen - 1`` per window). GPTQ's reference scores ``nll * seqlen`` per window; with equal
windows the two means are the same.

With ``stride < seqlen`` (the sliding window of the transformers documentation), windows start
every `stride` tokens; the first window scores all its ``seqlen - 1`` predictions and every later
one only its last `stride` tokens, which now see ``seqlen - stride`` tokens of context. Windows
that would run past the end are dropped, as in the non-overlapping protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["PerplexityResult", "load_text", "perplexity", "sliding_windows", "windows"]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    seqlen: int
    tokens_scored: int
    stride: int | None = None


def windows(token_ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Return ``(n, seqlen)`` non-overlapping windows of a 1-D token tensor, tail dropped."""
    n = token_ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    return token_ids[: n * seqlen].view(n, seqlen)


def sliding_windows(length: int, seqlen: int, stride: int | None = None,
                    max_windows: int | None = None) -> list[tuple[int, int]]:
    """Return ``(start, scored)`` per window: the window is ``[start, start + seqlen)`` and its last
    `scored` next-token predictions count. ``stride`` None or ``seqlen`` is the non-overlapping protocol."""
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise ValueError(f"stride must be in 1..seqlen ({seqlen}), got {stride}")
    if length < seqlen:
        raise ValueError(f"the text has {length} tokens, fewer than one window of {seqlen}")
    starts = range(0, length - seqlen + 1, stride)
    spans = [(start, seqlen - 1 if i == 0 else min(stride, seqlen - 1)) for i, start in enumerate(starts)]
    return spans[:max_windows] if max_windows is not None else spans


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: Tensor, seqlen: int, max_windows: int | None = None,
               progress: bool = False, stride: int | None = None) -> PerplexityResult:
    """Return the perplexity of `model` on 1-D `token_ids`.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seqlen, vocab).
        seqlen: tokens per window.
        max_windows: score only the first windows, to bound the work.
        stride: tokens between window starts (sliding window); None scores non-overlapping windows.
    """
    spans = sliding_windows(token_ids.numel(), seqlen, stride, max_windows)
    device = next(model.parameters()).device
    total = 0.0
    scored = 0
    iterator: Any = spans
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(spans, desc="perplexity", unit="window")
    for start, count in iterator:
        window = token_ids[start: start + seqlen].to(device)
        logits = model(window[None]).logits[0, -count - 1:-1]
        total += float(_nll(logits, window[-count:]))
        scored += count
    return PerplexityResult(math.exp(total / scored), len(spans), seqlen, scored, stride)


def _nll(logits: Tensor, targets: Tensor, chunk: int = 512) -> Tensor:
    """Summed NLL in float32, a chunk of positions at a time (a 262k vocabulary makes the float32
    copy of all logits of a 2048-token window 2 GB)."""
    return sum((nn.functional.cross_entropy(logits[i:i + chunk].float(), targets[i:i + chunk], reduction="sum")
                for i in range(0, targets.numel(), chunk)), torch.zeros((), device=logits.device))


def load_text(source: str, *, split: str = "test", column: str | None = None, config: str | None = None) -> str:
    """Return evaluation text as one string: a text file, a folder of ``.txt`` files (sorted, joined
    by blank lines), or a `datasets` dataset whose `column` rows are joined by blank lines (as the
    GPTQ reference joins WikiText-2's rows).

    Raises:
        FileNotFoundError: `source` is neither a file, a folder with text, nor a dataset name.
    """
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(path.rglob("*.txt")) + sorted(path.rglob("*.raw"))
        if not files:
            raise FileNotFoundError(f"{path} has no .txt or .raw files to evaluate on")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return "\n\n".join(_dataset_rows(source, split, column, config))


def _dataset_rows(name: str, split: str, column: str | None, config: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise FileNotFoundError(f"{name!r} is not a file or folder, and `datasets` is not installed to load it") from exc
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for a missing or unreachable dataset
        raise FileNotFoundError(f"{name!r} is not a file or folder, and `datasets` could not load it: {exc}") from exc
    column = column or ("text" if "text" in data.column_names else data.column_names[0])
    if column not in data.column_names:
        raise FileNotFoundError(f"dataset {name!r} has no column {column!r}; its columns are {', '.join(data.column_names)}")
    yield from (str(row) for row in data[column])
