"""``llmquant verify``: will the servers take this output, and compute what llmquant computes?

Every real loader that is installed scores the same fixed prompts as llmquant's own runtime
(float32 dequantization, the reference): transformers with the format's integration, in this
process, and vLLM in a subprocess, either this Python when it can import vllm or the Python of a
separate vLLM environment (``--vllm-python``; vLLM pins its own transformers). A loader passes
when its top-1 next token agrees with the reference on at least `min_top1` of the prompt
positions; the largest difference in the logprob of the actual next token is reported too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["PROMPTS", "LoaderCheck", "verify_output"]

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of 100 degrees Celsius at sea level, and it freezes at",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are red, blue and",
    "In 1969, Neil Armstrong became the first person to walk on the",
)


@dataclass
class LoaderCheck:
    """One loader's verdict on an output."""

    loader: str
    status: str  # "ok", "disagrees", "refused", "not installed"
    positions: int = 0
    top1_agreement: float = 0.0
    max_abs_delta_logprob: float = 0.0
    message: str = ""
    greedy_text: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt_ids(path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [list(tokenizer(p).input_ids) for p in PROMPTS]


@torch.no_grad()
def _score(model: Any, prompts: list[list[int]]) -> list[list[dict[str, float]]]:
    """Per prompt and position t >= 1: logprob of token t and the top-1 prediction for it."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:], device=device)
        actual = logprobs.gather(1, target[:, None])[:, 0]
        out.append([{"logprob": float(a), "top1": int(t)} for a, t in zip(actual, logprobs.argmax(-1))])
    return out


def _compare(loader: str, reference: list[list[dict[str, float]]], theirs: list[list[dict[str, float]]],
             min_top1: float) -> LoaderCheck:
    pairs = [(r, t) for rp, tp in zip(reference, theirs) for r, t in zip(rp, tp)]
    agree = sum(r["top1"] == t["top1"] for r, t in pairs) / max(len(pairs), 1)
    delta = max((abs(r["logprob"] - t["logprob"]) for r, t in pairs), default=0.0)
    status = "ok" if pairs and agree >= min_top1 else "disagrees"
    message = "" if status == "ok" else f"top-1 agreement {agree:.1%} < {min_top1:.0%}"
    return LoaderCheck(loader, status, len(pairs), agree, delta, message)


def _transformers(path: Path, prompts: list[list[int]], dtype: torch.dtype) -> tuple[list[list[dict[str, float]]], str]:
    from transformers import AutoModelForCausalLM

    quant = json.loads((path / "config.json").read_text()).get("quantization_config", {})
    kwargs: dict[str, Any] = {}
    note = ""
    if quant.get("quant_method") == "compressed-tensors" and any(
            not g.get("weights", {}).get("symmetric", True) for g in quant.get("config_groups", {}).values()):
        from transformers.utils.quantization_config import CompressedTensorsConfig

        # transformers 5.24 + compressed-tensors 0.20 cannot run asymmetric checkpoints compressed
        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        note = "asymmetric compressed-tensors loaded with run_compressed=False"
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    return _score(model.eval(), prompts), note


def _vllm(path: Path, prompts: list[list[int]], python: str, timeout: int) -> dict[str, Any]:
    probe = Path(__file__).with_name("vllm_probe.py")
    with tempfile.TemporaryDirectory(prefix="llmquant-verify-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"prompts": prompts, "dtype": "float16", "new_tokens": 16}))
        env = {**os.environ, "VLLM_CACHE_ROOT": str(Path(tmp) / "vllm-cache")}
        done = subprocess.run([python, str(probe), str(path), str(request), str(result)], capture_output=True,
                              text=True, timeout=timeout, env=env)
        if not result.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"error": f"the vLLM probe exited with {done.returncode}: {' | '.join(tail)}"}
        data: dict[str, Any] = json.loads(result.read_text())
        return data


def verify_output(path: str | os.PathLike[str], *, loaders: tuple[str, ...] = ("transformers", "vllm"),
                  vllm_python: str | None = None, min_top1: float = 0.99, timeout: int = 600) -> list[LoaderCheck]:
    """Score the fixed prompts with every requested loader that is installed and compare each with
    llmquant's runtime. A loader that raises while loading or scoring is "refused", with its message."""
    from llmquant.runtime import load_quantized

    folder = Path(path)
    prompts = _prompt_ids(folder)
    reference = _score(load_quantized(folder, dtype=torch.float32, kernel="dequant"), prompts)
    checks: list[LoaderCheck] = []
    if "transformers" in loaders:
        try:
            theirs, note = _transformers(folder, prompts, torch.float32)
            check = _compare("transformers", reference, theirs, min_top1)
            check.message = "; ".join(m for m in (check.message, note) if m)
        except Exception as exc:  # a loader's refusal is the answer, whatever its type
            check = LoaderCheck("transformers", "refused", message=f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        checks.append(check)
    if "vllm" in loaders:
        python = vllm_python or os.environ.get("LLMQUANT_VLLM_PYTHON") or (sys.executable if importlib.util.find_spec("vllm") else None)
        if python is None:
            checks.append(LoaderCheck("vllm", "not installed", message="pass --vllm-python PATH to a Python with vllm installed"))
        else:
            data = _vllm(folder, prompts, python, timeout)
            if "error" in data:
                checks.append(LoaderCheck("vllm", "refused", message=" ".join(str(data["error"]).split())[:400]))
            else:
                check = _compare(f"vllm {data.get('vllm_version', '')}".strip(), reference, data["positions"], min_top1)
                check.greedy_text = data.get("greedy_text")
                checks.append(check)
    return checks
