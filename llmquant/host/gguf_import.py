"""Import a GGUF file into a float32 Hugging Face folder: ``python -m llmquant.host.gguf_import SRC DST``.

Run as a child process by `llmquant.host.source.import_gguf`; the folder appears at DST only
when complete.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


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
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
