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


def test_sliding_windows_count_scored_tokens() -> None:
    from eval.perplexity import sliding_windows

    assert sliding_windows(10, 4) == [(0, 3), (4, 3)]  # non-overlapping, tail of 2 dropped
    assert sliding_windows(10, 4, stride=2) == [(0, 3), (2, 2), (4, 2), (6, 2)]
    assert sliding_windows(10, 4, stride=4) == sliding_windows(10, 4)
    assert sliding_windows(100, 8, stride=1, max_windows=3) == [(0, 7), (1, 1), (2, 1)]
    with pytest.raises(ValueError, match="stride must be in 1..seqlen"):
        sliding_windows(10, 4, stride=5)


def test_strided_perplexity_equals_a_hand_computation(tiny_llama: Path) -> None:
    """Windows start every 16 tokens; after the first, only the last 16 predictions of each count."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(1))
    nll, count = 0.0, 0
    for start in (0, 16, 32):  # windows [0,32) [16,48) [32,64); [48,80) would run past the end
        window = ids[start:start + 32]
        with torch.no_grad():
            probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        for t in range(31) if start == 0 else range(15, 31):
            nll -= probs[t, window[t + 1]].item()
            count += 1
    result = perplexity(model, ids, 32, stride=16)
    assert (result.windows, result.tokens_scored, result.stride) == (3, 31 + 16 + 16, 16)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_load_text_from_file_folder_and_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from eval.perplexity import load_text

    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_text(str(tmp_path / "a.txt")) == "first"
    assert load_text(str(tmp_path)) == "first\n\nsecond"
    table = datasets.Dataset.from_dict({"id": [1, 2], "body": ["one", "two"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: table)
    assert load_text("some/dataset", column="body") == "one\n\ntwo"
    with pytest.raises(FileNotFoundError, match="no column 'text'; its columns are id, body"):
        load_text("some/dataset", column="text")
