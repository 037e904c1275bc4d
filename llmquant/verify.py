"""``llmquant verify``: will the servers take this output, and compute what llmquant computes?

Every real loader that is installed scores the same fixed prompts as llmquant's own runtime
(float32 dequantization, the reference): transformers with the format's integration, in this
process, and vLLM in a subprocess, either this Python when it can import vllm or the Python of a
separate vLLM environment (``--vllm-python``; vLLM pins its own transformers).

A loader passes when its next-token distributions match the reference's: the mean KL divergence
per position is at most `max_kl`, and its top-1 token is among the reference's top 2 on at least
`min_top2` of the positions. Exact top-1 agreement is reported but does not decide: a loader that
computes in float16 flips near-ties (two tokens within a few hundredths of a logprob), which a good
checkpoint has at a few positions in a hundred. A wrong layout moves whole distributions and
fails both measures by orders of magnitude. The KL is taken over the reference's top-20 tokens
plus one bin for the rest (vLLM reports the top 20 logprobs per position; a token outside a
loader's top 20 is given its 20th probability, an upper bound).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmquant.errors import LlmquantError

__all__ = ["PROMPTS", "TOP_K", "LoaderCheck", "position_kl", "verify_output"]

TOP_K = 20  # logprobs kept per position: vLLM's default ceiling for prompt logprobs
MAX_KL = 0.01  # mean KL per position a loader may show; the measurements that chose it are in docs/serving.md
MIN_TOP2 = 0.99  # share of positions whose top-1 must be inside our top 2

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
    kl_mean: float = 0.0
    kl_max: float = 0.0
    top1_in_top2: float = 0.0
    top1_agreement: float = 0.0
    max_abs_delta_logprob: float = 0.0
    message: str = ""
    greedy_text: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt_ids(path: Path, prompts: tuple[str, ...]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [list(tokenizer(p).input_ids) for p in prompts]


Position = dict[str, Any]  # {"logprob": of the actual next token, "top1": token, "top": [[token, logprob], ...]}


@torch.no_grad()
def _score(model: Any, prompts: list[list[int]]) -> list[list[Position]]:
    """Per prompt and position t >= 1: the logprob of token t, and the TOP_K most likely tokens."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:], device=device)
        actual = logprobs.gather(1, target[:, None])[:, 0].tolist()
        values, tokens = logprobs.topk(TOP_K, dim=-1)
        out.append([{"logprob": a, "top1": row_t[0], "top": [[t, v] for t, v in zip(row_t, row_v)]}
                    for a, row_t, row_v in zip(actual, tokens.tolist(), values.tolist())])
    return out


def position_kl(reference: list[list[float]], theirs: list[list[float]]) -> float:
    """KL(reference || theirs) of one position over the reference's listed tokens plus a bin for the rest.

    Args:
        reference, theirs: ``[token, logprob]`` pairs, most likely first; a reference token that
            `theirs` does not list gets the smallest probability `theirs` lists (an upper bound).
    """
    listed = {int(t): lp for t, lp in theirs}
    floor = min(listed.values())
    p = [math.exp(lp) for _, lp in reference]
    q = [math.exp(listed.get(int(t), floor)) for t, _ in reference]
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
    p_rest, q_rest = 1.0 - sum(p), max(1.0 - sum(q), 1e-12)
    if p_rest > 1e-12:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)


def _compare(loader: str, reference: list[list[Position]], theirs: list[list[Position]], *, max_kl: float,
             min_top2: float) -> LoaderCheck:
    pairs = [(r, t) for rp, tp in zip(reference, theirs) for r, t in zip(rp, tp)]
    if not pairs:
        return LoaderCheck(loader, "disagrees", message="no positions were scored")
    kls = [position_kl(r["top"], t["top"]) for r, t in pairs]
    top2 = sum(int(t["top1"]) in {int(x) for x, _ in r["top"][:2]} for r, t in pairs) / len(pairs)
    check = LoaderCheck(loader, "ok", len(pairs), kl_mean=sum(kls) / len(kls), kl_max=max(kls), top1_in_top2=top2,
                        top1_agreement=sum(int(r["top1"]) == int(t["top1"]) for r, t in pairs) / len(pairs),
                        max_abs_delta_logprob=max(abs(r["logprob"] - t["logprob"]) for r, t in pairs))
    failures = []
    if check.kl_mean > max_kl:
        failures.append(f"mean KL {check.kl_mean:.4f} > {max_kl}")
    if top2 < min_top2:
        failures.append(f"top-1 inside our top 2 on {top2:.1%} < {min_top2:.0%}")
    if failures:
        check.status, check.message = "disagrees", "; ".join(failures)
    return check


def _transformers(path: Path, prompts: list[list[int]], dtype: torch.dtype) -> tuple[list[list[Position]], str]:
    from transformers import AutoModelForCausalLM

    from llmquant.deps import require
    from llmquant.host.checkpoint import Checkpoint
    from llmquant.host.moe import KeyMap, moe_rules

    quant = json.loads((path / "config.json").read_text()).get("quantization_config", {})
    kwargs: dict[str, Any] = {}
    note = ""
    if quant.get("quant_method") == "compressed-tensors" and any(
            not g.get("weights", {}).get("symmetric", True) for g in quant.get("config_groups", {}).values()):
        from transformers.utils.quantization_config import CompressedTensorsConfig

        # transformers 5.24 + compressed-tensors 0.20 cannot run asymmetric checkpoints compressed
        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        note = "asymmetric compressed-tensors loaded with run_compressed=False"
    config = json.loads((path / "config.json").read_text())
    rules = moe_rules(str(config.get("model_type")))
    if quant.get("quant_method") == "gptq" and rules.fused:
        if KeyMap.build(Checkpoint(path).infos, rules).to_model:
            raise LlmquantError("its experts are under the checkpoint's names (Mixtral's block_sparse_moe.experts.N.w1), which "
                                "gptqmodel's defuser does not load; quantize with --expert-names transformers for transformers "
                                "and GPTQModel (vLLM reads the checkpoint's names)")
        # transformers 5 fuses experts into 3-D tensors, which the GPTQ integration cannot replace; gptqmodel's
        # defuser gives it per-expert Linears back (it patches transformers' classes for this process)
        defuser = require("defuser", extra="loaders", purpose="loading quantized mixture-of-experts checkpoints in transformers")
        defuser.replace_fused_blocks(config["model_type"])
        note = "experts defused with gptqmodel's defuser"
    if quant.get("quant_method") == "gguf":  # transformers' GGUF loader dequantizes the file to float
        kwargs["gguf_file"] = quant.get("gguf_file", "model.gguf")
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    return _score(model.eval(), prompts), note


def _vllm(path: Path, prompts: list[list[int]], python: str, timeout: int) -> dict[str, Any]:
    context = json.loads((path / "config.json").read_text()).get("max_position_embeddings") or 512
    request = {"prompts": prompts, "dtype": "float16", "new_tokens": 16, "top_k": TOP_K, "max_model_len": min(512, int(context))}
    return run_probe("vllm_probe.py", path, request, python, timeout, "vLLM")


def run_probe(script: str, target: Path, request: dict[str, Any], python: str, timeout: int, name: str) -> dict[str, Any]:
    """Run one of llmquant's stand-alone probes (``vllm_probe.py``, ``llama_cpp_probe.py``) with `python` on `target`."""
    probe = Path(__file__).with_name(script)
    with tempfile.TemporaryDirectory(prefix="llmquant-verify-") as tmp:
        request_path, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        env = {**os.environ, "VLLM_CACHE_ROOT": str(Path(tmp) / "vllm-cache")}
        done = subprocess.run([python, str(probe), str(target), str(request_path), str(result)], capture_output=True,
                              text=True, timeout=timeout, env=env)
        if not result.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"error": f"the {name} probe exited with {done.returncode}: {' | '.join(tail)}"}
        data: dict[str, Any] = json.loads(result.read_text())
        return data


def llama_cpp_python(given: str | None = None) -> str | None:
    """The Python that runs llama.cpp: `given`, $LLMQUANT_LLAMA_CPP_PYTHON, or this one when it has llama_cpp."""
    return given or os.environ.get("LLMQUANT_LLAMA_CPP_PYTHON") or (sys.executable if importlib.util.find_spec("llama_cpp") else None)


def verify_output(path: str | os.PathLike[str], *, loaders: tuple[str, ...] | None = None,
                  vllm_python: str | None = None, llama_cpp: str | None = None, max_kl: float = MAX_KL,
                  min_top2: float = MIN_TOP2, timeout: int = 600, prompts_text: tuple[str, ...] = PROMPTS) -> list[LoaderCheck]:
    """Score the fixed prompts with every requested loader that is installed and compare each with
    llmquant's runtime. A loader that raises while loading or scoring is "refused", with its message.

    `loaders` defaults to transformers and vLLM, or transformers and llama.cpp for a GGUF output
    (`llama_cpp`: the Python of an environment with llama-cpp-python). `prompts_text` are the texts scored
    (default `PROMPTS`, 82 positions on SmolLM2's tokenizer; a longer text gives the top-2 share a finer grain)."""
    from llmquant.deps import MissingDependency, require_integration
    from llmquant.runtime import load_quantized

    folder = Path(path)
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    gguf_file = quant.get("gguf_file") if quant.get("quant_method") == "gguf" else None
    loaders = loaders or (("transformers", "llama.cpp") if gguf_file else ("transformers", "vllm"))
    prompts = _prompt_ids(folder, prompts_text)
    reference = _score(load_quantized(folder, dtype=torch.float32, kernel="dequant"), prompts)
    checks: list[LoaderCheck] = []
    if "transformers" in loaders:
        quant_method = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
        try:
            with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints a banner on import; stdout is for the table/JSON
                require_integration(quant_method)
        except MissingDependency as exc:
            checks.append(LoaderCheck("transformers", "not installed", message=str(exc)))
            loaders = tuple(name for name in loaders if name != "transformers")
    if "transformers" in loaders:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints a banner; stdout is for the table/JSON
                theirs, note = _transformers(folder, prompts, torch.float32)
            check = _compare("transformers", reference, theirs, max_kl=max_kl, min_top2=min_top2)
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
            checks.append(_probe_check(f"vllm {data.get('vllm_version', '')}", data, reference, max_kl, min_top2))
    if "llama.cpp" in loaders:
        python = llama_cpp_python(llama_cpp)
        if gguf_file is None:
            checks.append(LoaderCheck("llama.cpp", "refused", message="llama.cpp reads GGUF only: quantize with --format gguf"))
        elif python is None:
            checks.append(LoaderCheck("llama.cpp", "not installed", message="pass --llama-cpp-python PATH to a Python with "
                                      "llama-cpp-python installed"))
        else:
            data = run_probe("llama_cpp_probe.py", folder / gguf_file, {"prompts": prompts, "top_k": TOP_K, "new_tokens": 16},
                             python, timeout, "llama.cpp")
            checks.append(_probe_check(f"llama.cpp {data.get('llama_cpp_version', '')}", data, reference, max_kl, min_top2))
    return checks


def _probe_check(loader: str, data: dict[str, Any], reference: list[list[Position]], max_kl: float, min_top2: float) -> LoaderCheck:
    """A probe's answer (`run_probe`) as a verdict: its refusal, or its positions compared with ours."""
    loader = loader.strip()
    if "error" in data:
        return LoaderCheck(loader.split()[0], "refused", message=" ".join(str(data["error"]).split())[:400])
    check = _compare(loader, reference, data["positions"], max_kl=max_kl, min_top2=min_top2)
    check.greedy_text = data.get("greedy_text")
    return check
