"""Import a GGUF file into a float32 Hugging Face folder: ``python -m llmquant.host.gguf_import SRC DST``.

Run as a child process by `llmquant.host.source.import_gguf`; the folder appears at DST only
when complete. Beside the checkpoint it writes ``llmquant-import.json``: the GGUF file, the base
model its metadata names, its license, and the dtype quantized outputs store float tensors in.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any


def gguf_record(path: Path) -> dict[str, Any]:
    """Describe a GGUF file for the import record: base model, license, and the float dtype of its
    outputs (bfloat16 when the GGUF stored its embedding in bfloat16, else float16)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str) -> str | None:
        found = reader.fields.get(key)
        return str(found.contents()) if found is not None else None

    url = field("general.base_model.0.repo_url") or field("general.source.huggingface.repository")
    if url:
        base = url.removeprefix("https://huggingface.co/")
    else:  # "SmolLM2-135M-Instruct.Q4_1.gguf" with organization "HuggingFaceTB"
        stem = re.sub(r"[.-](I?Q\d.*|F16|BF16|F32)$", "", path.stem, flags=re.I)
        organization = field("general.organization")
        base = f"{organization}/{stem}" if organization else stem
    embedding = next((t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight"), "")
    return {"gguf": str(path.resolve()), "base_model": base, "license": field("general.license"),
            "float_dtype": "bfloat16" if embedding == "BF16" else "float16"}


def main(source: str, target: str) -> None:
    import torch

    from llmquant.io.shards import ShardWriter, parse_size
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(source), Path(target)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained, so the
    # float tensors and the config are written directly.
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    writer = ShardWriter(tmp, parse_size("2GB"))
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(tensor.data_ptr())
        writer.add(name, tensor.to(torch.float32))
    writer.close()
    (tmp / "llmquant-import.json").write_text(json.dumps(gguf_record(src), indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
