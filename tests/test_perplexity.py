from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.perplexity import perplexity, windows


def test_windows_drop_the_tail() -> None:
    w = windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(torch.arange(10), 3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(torch.arange(2), 3)


def test_perplexity_equals_a_hand_computation(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    for start in (0, 32):  # two windows of 32; the last 6 tokens are dropped
        window = ids[start:start + 32]
        with torch.no_grad():
            probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        for t in range(31):
            nll -= probs[t, window[t + 1]].item()
            count += 1
    result = perplexity(model, ids, 32)
    assert result.windows == 2 and result.tokens_scored == 62
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
