"""The model card: a Hugging Face ``README.md`` in every output folder, written from its run record.

The card has YAML front matter (``base_model``, ``library_name``, ``tags``, ``quantized_by`` and an
``llmquant`` block with the settings) and a body stating the algorithm, bits, group size, format,
calibration data and versions, and how to load, serve and evaluate the output. Everything in it
is read from ``llmquant.json`` and ``config.json``, so it cannot disagree with them.
``llmquant eval OUT ... --update-card`` fills the "Measured" section between its markers with the
report's table; running it again replaces that section.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from llmquant.errors import CheckpointError

__all__ = ["CARD", "MEASURED_END", "MEASURED_START", "card_settings", "next_commands", "read_front_matter", "update_card",
           "write_card"]

CARD = "README.md"
FOLDER = "model-dir"  # what the card's commands call the output folder
MEASURED_START, MEASURED_END = "<!-- llmquant:measured:start -->", "<!-- llmquant:measured:end -->"

# what each format needs beside transformers to load in transformers, and which servers take it
_LOADERS = {
    "gptq": ("gptqmodel + optimum (`pip install 'llmquant[loaders]'`)", "vLLM, SGLang, TGI"),
    "gptq_v2": ("GPTQModel (`GPTQModel.load`)", "GPTQModel"),
    "compressed-tensors": ("compressed-tensors (`pip install 'llmquant[loaders]'`)", "vLLM, SGLang"),
    "bitsandbytes": ("bitsandbytes (`pip install 'llmquant[loaders]'`)", "vLLM (CUDA build), TGI"),
}


def next_commands(output: str, baseline: str, fmt: str) -> dict[str, str]:
    """Return the commands that evaluate, verify and serve an output folder, by purpose."""
    if fmt == "gguf":
        folder = output.rstrip("/")
        serve = f"llama-server -m {folder}/model.gguf   # Ollama: ollama create NAME -f {folder}/Modelfile"
    elif fmt in ("gptq", "compressed-tensors", "bitsandbytes"):
        serve = f"vllm serve {output}" + ("  # vLLM's CUDA build" if fmt == "bitsandbytes" else "")
    else:
        serve = f"# no vLLM support for this format: {output}"
    return {
        "eval": f"llmquant eval {output} --baseline {baseline} --ppl wikitext --ppl-config wikitext-2-raw-v1 --speed "
                f"-o {output.rstrip('/')}-eval.json --update-card",
        "verify": f"llmquant verify {output}",
        "serve": serve,
    }


def card_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """Return the card's settings block, computed from an ``llmquant.json`` record."""
    config = meta["config"]
    quantized = [m for m in meta["modules"] if m["bits"] is not None]
    bits = Counter(m["bits"] for m in quantized)
    groups = Counter(m["group_size"] for m in quantized)
    algorithm = meta.get("algorithm", {})
    calibration = None
    if algorithm.get("calibrated"):
        calibration = {"data": config.get("calib"), "samples": config.get("calib_samples"),
                       "seqlen": config.get("calib_seqlen"), "seed": config.get("seed")}
    return {
        "algorithm": config["algo"],
        "format": config["format"],
        "bits": bits.most_common(1)[0][0] if bits else None,
        "group_size": groups.most_common(1)[0][0] if groups else None,
        "symmetric": quantized[0]["symmetric"] if quantized else None,
        "linears_quantized": len(quantized),
        "linears_in_float": len(meta["modules"]) - len(quantized),
        "calibration": calibration,
        "llmquant_version": meta["llmquant_version"],
        "plugins": {role: f"{p['distribution']} {p['version']}" for role, p in
                    (("algorithm", algorithm), ("format", meta.get("format_plugin", {}))) if p},
    }


def _front_matter(meta: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    tags = ["llmquant", settings["algorithm"], settings["format"], "quantized"]
    if settings["bits"] is not None:
        tags.append(f"{settings['bits']}-bit")
    front: dict[str, Any] = {"base_model": meta.get("base_model") or Path(meta["source"]).name}
    if meta.get("license"):
        front["license"] = meta["license"]
    return {**front, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tags)),
            "quantized_by": "llmquant", "llmquant": settings}


def _body(meta: dict[str, Any], s: dict[str, Any], size_mb: float) -> str:
    group = f"groups of {s['group_size']}" if s["group_size"] else "one scale per output channel"
    sym = {True: "symmetric", False: "asymmetric", None: "codebook"}[s["symmetric"]]
    cal = s["calibration"]
    calibration = (f"`{cal['data']}`: {cal['samples']} samples of {cal['seqlen']} tokens, seed {cal['seed']}" if cal
                   else "none (calibration-free)")
    needs, servers = _LOADERS.get(s["format"], ("the format's integration", "see the format's documentation"))
    base = meta.get("base_model") or meta["source"]
    name = FOLDER
    commands = next_commands(name, base, s["format"])
    mixed = "" if len({m["bits"] for m in meta["modules"] if m["bits"]}) <= 1 else " (most modules; see llmquant.json)"
    return f"""# {base}, {s['bits']}-bit `{s['algorithm']}` in `{s['format']}`

`{FOLDER}` below stands for this folder's path (or its hub id once uploaded).

`{base}` quantized by llmquant {s['llmquant_version']}: the decoder blocks'
Linear weights to {s['bits']} bits{mixed} with `{s['algorithm']}`, stored in the `{s['format']}` format.
Embeddings, norms and the output head stay in float.

| setting | value |
|---|---|
| algorithm | `{s['algorithm']}` ({s['plugins'].get('algorithm', '?')}) |
| bits | {s['bits']}{mixed} |
| group size | {s['group_size'] or 'per channel'} ({group}, {sym}) |
| format | `{s['format']}` ({s['plugins'].get('format', '?')}) |
| calibration | {calibration} |
| Linears | {s['linears_quantized']} quantized, {s['linears_in_float']} kept in float |
| size | {size_mb:.1f} MB |

## Load

```python
from transformers import AutoModelForCausalLM   # needs {needs}
model = AutoModelForCausalLM.from_pretrained("{name}", device_map="auto")

import llmquant                                   # llmquant's own runtime: any format, CPU, no extra kernels
model = llmquant.load_quantized("{name}")
```

## Serve

Loaded by {servers}, for example:

```bash
{commands['serve']}
```

## Evaluate

```bash
{commands['eval']}
{commands['verify']}
```

## Measured

{MEASURED_START}
Not measured yet: the `llmquant eval ... --update-card` command above writes perplexity and speed here.
{MEASURED_END}
"""


def write_card(folder: Path) -> Path:
    """Write ``README.md`` into an output folder from its ``llmquant.json``; return its path.

    The card does not depend on the folder's name or place (it says `FOLDER` where a command needs
    the path), so an output and a resumed or moved copy of it are byte-identical.
    """
    meta = json.loads((folder / "llmquant.json").read_text())
    settings = card_settings(meta)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    text = "---\n" + yaml.safe_dump(_front_matter(meta, settings), sort_keys=False) + "---\n\n"
    text += _body(meta, settings, size)
    path = folder / CARD
    path.write_text(text)
    return path


def read_front_matter(path: Path) -> dict[str, Any]:
    """Return the YAML front matter of a model card."""
    text = path.read_text()
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise CheckpointError(f"{path} has no YAML front matter (--- ... ---)")
    data: dict[str, Any] = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    return data


def update_card(folder: Path, measured_markdown: str) -> Path:
    """Replace the card's "Measured" section with `measured_markdown`; return the card's path.

    Raises:
        CheckpointError: the folder has no card written by llmquant (no markers to write between).
    """
    path = folder / CARD
    text = path.read_text() if path.exists() else ""
    if MEASURED_START not in text or MEASURED_END not in text:
        raise CheckpointError(f"{path} is not an llmquant model card: --update-card needs a folder written by `llmquant quantize`")
    head, rest = text.split(MEASURED_START, 1)
    tail = rest.split(MEASURED_END, 1)[1]
    path.write_text(f"{head}{MEASURED_START}\n{measured_markdown.strip()}\n{MEASURED_END}{tail}")
    return path
