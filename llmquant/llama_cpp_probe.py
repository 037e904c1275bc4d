"""Run inside an environment that has llama-cpp-python: load a GGUF file, score prompts, write JSON.

    python llama_cpp_probe.py MODEL.gguf REQUEST.json RESULT.json
    python llama_cpp_probe.py --quantize IN.gguf OUT.gguf FTYPE [--pure]

This file imports nothing from llmquant (only numpy, which llama-cpp-python needs), so `llmquant
verify` and the benchmarks can run it with the Python of a separate environment. The request holds
token-id prompts (``prompts``), ``top_k`` and ``new_tokens``, and optionally ``windows``: token-id
windows whose perplexity to compute (the mean negative log-likelihood of tokens 1..n-1 of each),
and ``texts`` to tokenize (``token_ids``, with the BOS the file asks for). The result holds, per prompt and position, the logprob llama.cpp gives the actual next token, its
top-1 token and ``top_k`` most likely tokens, greedy continuations, and ``nll``/``tokens`` for the
windows; or the error llama.cpp raised.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def _cores() -> int:
    """The cores this process may run on: llama.cpp's threads spin while they wait, so one more thread
    than cores (``taskset``, a container's CPU set) slows it down by orders of magnitude."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _logprobs(llm: Any, ids: list[int]) -> Any:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _window_nll(llm: Any, ids: list[int], chunk: int = 256) -> float:
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1, from llama.cpp's logits, a few hundred rows at a time."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    total = 0.0
    for start in range(0, len(ids) - 1, chunk):
        rows = np.asarray(llm.scores[start:min(start + chunk, len(ids) - 1)], dtype=np.float64)
        targets = np.asarray(ids[start + 1:start + 1 + rows.shape[0]])
        top = rows.max(axis=1)
        total += float((np.log(np.exp(rows - top[:, None]).sum(axis=1)) + top - rows[np.arange(rows.shape[0]), targets]).sum())
    return total


def probe(model: str, request: dict[str, Any]) -> dict[str, Any]:
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError as exc:
        return {"error": f"llama-cpp-python is not installed in {sys.executable} ({exc}): pass --llama-cpp-python of an "
                         "environment made with `CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install llama-cpp-python==0.3.36`"}
    prompts, windows = request.get("prompts", []), request.get("windows", [])
    n_ctx = max([len(p) + int(request.get("new_tokens", 16)) for p in prompts] + [len(w) for w in windows] + [64])
    threads = int(request.get("threads") or _cores())
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, n_threads=threads, seed=0,
                verbose=False)
    top_k = int(request.get("top_k", 20))
    positions, greedy = [], []
    for ids in prompts:
        logprobs = _logprobs(llm, ids)
        rows = []
        for t in range(1, len(ids)):
            row = logprobs[t - 1]
            top = row.argsort()[::-1][:top_k]
            rows.append({"logprob": float(row[ids[t]]), "top1": int(top[0]), "top": [[int(k), float(row[k])] for k in top]})
        positions.append(rows)
        llm.reset()
        tokens: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if token == llm.token_eos() or len(tokens) >= int(request.get("new_tokens", 16)):
                break
            tokens.append(int(token))
        greedy.append(tokens)
    nll, counted = 0.0, 0
    for ids in windows:
        nll += _window_nll(llm, ids)
        counted += len(ids) - 1
    return {"llama_cpp_version": llama_cpp.__version__, "positions": positions, "greedy": greedy,
            "greedy_text": [llm.detokenize(g).decode("utf-8", errors="replace") for g in greedy],
            "nll": nll, "tokens": counted,
            "token_ids": [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in request.get("texts", [])]}


def quantize(source: str, target: str, ftype: int, pure: bool) -> None:
    """llama.cpp's own quantizer (``llama-quantize``) from an F16/F32 GGUF: ftype 2 is Q4_0, 15 Q4_K_M; `pure`
    keeps every tensor, the output head too, at that type instead of llama.cpp's mix."""
    import ctypes

    try:
        import llama_cpp
    except ImportError as exc:
        sys.exit(f"llama-cpp-python is not installed in {sys.executable} ({exc}): run this with the llama.cpp environment's Python")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = _cores()
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_model_quantize failed on {source}")


def main() -> None:
    if sys.argv[1] == "--quantize":
        return quantize(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--pure" in sys.argv[5:])
    model, request_path, result_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)
    try:
        result = probe(model, request)
    except Exception as exc:  # report llama.cpp's refusal to the caller instead of a traceback
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
