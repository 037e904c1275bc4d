"""GGUF, the file llama.cpp, Ollama and LM Studio run: one ``model.gguf`` with the tokenizer inside.

Uniform codes go into GGUF blocks as they are (`llmquant.io.gguf_blocks`), so a GPTQ result
reaches llama.cpp without the dequantize-and-requantize step of llama.cpp's own converter. The
host writes its usual shards with each Linear as block rows; `finish` then streams them into
``model.gguf`` (`llmquant.io.gguf_model`) and adds an Ollama ``Modelfile``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from llmquant import hookimpl
from llmquant.algorithm import UniformQuantized
from llmquant.errors import ConfigError, ShapeError
from llmquant.formats import ModuleRecord, OutputFormat, quantizer_name
from llmquant.io.gguf_blocks import BLOCK, LOSSLESS, decode_blocks, encode_blocks, fitting_types, uniform_fit
from llmquant.io.gguf_model import QUANTIZED_MARK, check_convertible, write_gguf
from llmquant.io.gguf_read import GGUFTensors

__all__ = ["GGUFFormat", "GGUFOptions"]

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
GGUF_TYPES = ("auto", *LOSSLESS, "f16")
EMBEDDING_TYPES = ("auto", "q4_0", "q4_1", "q5_0", "q8_0", "f16", "f32")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8}  # gguf.LlamaFileType


@dataclass(frozen=True)
class GGUFOptions:
    """Settings of the GGUF format (``--gguf-type``, ``--gguf-embedding-type``; the same keys in TOML).

    Attributes:
        gguf_type: the block type of the quantized Linears: auto (the smallest that holds each
            result exactly), q4_0, q4_1, q5_0, q8_0, or f16 (the weights dequantized).
        gguf_embedding_type: the token embedding's and output head's type: auto (llama.cpp's
            choice: Q8_0 or Q6_K for the head and a tied embedding, the base type for an untied one).
    """

    gguf_type: str = "auto"
    gguf_embedding_type: str = "auto"

    def __post_init__(self) -> None:
        if self.gguf_type not in GGUF_TYPES:
            raise ConfigError("gguf_type", self.gguf_type, f"one of {', '.join(GGUF_TYPES)}")
        if self.gguf_embedding_type not in EMBEDDING_TYPES:
            raise ConfigError("gguf_embedding_type", self.gguf_embedding_type, f"one of {', '.join(EMBEDDING_TYPES)}")


class GGUFFormat:
    """llama.cpp's GGUF: Q4_0/Q4_1/Q5_0/Q8_0 blocks from uniform codes, or F16."""

    name: ClassVar[str] = "gguf"
    description: ClassVar[str] = "GGUF model.gguf, Q4_0/Q4_1/Q5_0/Q8_0 blocks or F16 (llama.cpp, Ollama, LM Studio)"
    accepts: ClassVar[tuple[type, ...]] = (UniformQuantized,)
    default_for: ClassVar[tuple[type, ...]] = ()
    options_type: ClassVar[type] = GGUFOptions

    def __init__(self, options: GGUFOptions | None = None) -> None:
        self.options = options or GGUFOptions()

    def check_model(self, folder: Path) -> None:
        """Refuse, before any work, a model whose architecture, rope or tokenizer GGUF output does not cover."""
        check_convertible(folder)

    def check_module(self, name: str, shape: tuple[int, int], config: Any) -> None:
        """Refuse, before any work, a Linear whose result could not be written as the chosen type."""
        bits, symmetric = getattr(config, "bits", 4), getattr(config, "symmetric", True)
        group = getattr(config, "group_size", None) or shape[1]
        if shape[1] % BLOCK or group % BLOCK:
            raise ShapeError(f"{name} {shape} with group size {group}: GGUF blocks hold groups of a multiple of {BLOCK} "
                             f"inputs; use --group-size 32, 64 or 128, or leave it in float with --ignore")
        if getattr(config, "desc_act", False) and not getattr(config, "static_groups", False):
            raise ConfigError("desc_act", True, "false for GGUF (act-order scatters the groups over the inputs, and GGUF's "
                              "blocks are contiguous), or static_groups = true")
        wanted = self.options.gguf_type
        if wanted == "auto" and not fitting_types(bits, symmetric):
            raise ConfigError("bits", bits, f"a width a GGUF block type holds (2-8 bits; {bits}-bit "
                              f"{'symmetric' if symmetric else 'asymmetric'} codes fit none)")
        if wanted in LOSSLESS and not uniform_fit(LOSSLESS[wanted], bits, symmetric):
            fit = fitting_types(bits, symmetric)
            raise ConfigError("gguf_type", wanted, f"a type that holds {bits}-bit {'symmetric' if symmetric else 'asymmetric'} "
                              f"codes: {', '.join(fit) or 'none'}" + (" (or --sym for q4_0)" if wanted == "q4_0" and bits == 4 else ""))

    def block_type(self, result: UniformQuantized) -> str:
        """The type `result` is written as: the chosen one, or the smallest that holds it exactly."""
        if self.options.gguf_type != "auto":
            return self.options.gguf_type
        return fitting_types(result.bits, result.symmetric)[0]

    def tensors(self, result: UniformQuantized, dtype: torch.dtype) -> dict[str, Tensor]:
        kind = self.block_type(result)
        if kind == "f16":
            return {"weight": result.dequantize(torch.float16)}
        return {f"{QUANTIZED_MARK[1:]}{kind}": encode_blocks(result, LOSSLESS[kind])}

    def quantization_config(self, records: list[ModuleRecord], algo_params: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        return {"quant_method": "gguf", "gguf_file": GGUF_FILE, "gguf_type": self.options.gguf_type,
                "gguf_embedding_type": self.options.gguf_embedding_type,
                "bits": max((r.bits for r in records if r.bits), default=16), "quantizer": quantizer_name()}

    def recognizes(self, quantization_config: Mapping[str, Any]) -> bool:
        return quantization_config.get("quant_method") == "gguf"

    def quantized_module(self, key: str) -> str | None:
        module, mark, _ = key.partition(QUANTIZED_MARK)
        return module if mark else None

    def read(self, tensors: Mapping[str, Tensor], quantization_config: Mapping[str, Any]) -> UniformQuantized:
        (key, rows), = ((k, t) for k, t in tensors.items() if k.startswith(QUANTIZED_MARK[1:]))
        kind = LOSSLESS[key.removeprefix(QUANTIZED_MARK[1:])]
        return decode_blocks(rows, kind, rows.shape[1] // kind.block_bytes * BLOCK)

    def open(self, folder: Path) -> Mapping[str, Tensor]:
        """``model.gguf``'s tensors under the checkpoint's names, Linears as the rows `read` decodes."""
        return GGUFTensors(folder / GGUF_FILE)

    def finish(self, folder: Path, records: list[ModuleRecord]) -> None:
        """Turn the finished output in `folder` into ``model.gguf`` plus an Ollama ``Modelfile``."""
        types = Counter(key.partition(QUANTIZED_MARK)[2] for key in _tensor_keys(folder) if QUANTIZED_MARK in key)
        base = types.most_common(1)[0][0] if types else "f16"
        record = json.loads((folder / "llmquant.json").read_text()) if (folder / "llmquant.json").exists() else {}
        partial = folder / (GGUF_FILE + ".partial")
        write_gguf(folder, partial, embedding_type=self.options.gguf_embedding_type, base_type=base,
                   file_type=FILE_TYPES.get(base, 1), name=str(record.get("base_model") or folder.name))
        partial.replace(folder / GGUF_FILE)
        for shard in [*folder.glob("*.safetensors"), *folder.glob("model.safetensors.index.json")]:
            shard.unlink()
        (folder / "Modelfile").write_text(modelfile(folder))
        log.info("wrote %s (%s blocks: %s)", folder / GGUF_FILE, base.upper(),
                 ", ".join(f"{n} {k.upper()}" for k, n in types.most_common()) or "none")


def _tensor_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


# Ollama templates are Go templates, not Jinja: the two chat formats our architectures use, by their markers
CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
          ["<|im_start|>", "<|im_end|>"])


def modelfile(folder: Path) -> str:
    """An Ollama Modelfile for ``model.gguf``: ``ollama create NAME -f Modelfile`` in this folder."""
    template = ""
    jinja = folder / "chat_template.jinja"
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    text = jinja.read_text() if jinja.exists() else str(config.get("chat_template") or "")
    lines = [f"FROM ./{GGUF_FILE}"]
    if "<|im_start|>" in text:
        template, stops = CHATML
        lines.append(f'TEMPLATE """{template}"""')
        lines.extend(f'PARAMETER stop "{stop}"' for stop in stops)
    elif text:
        lines.append("# the chat template is in model.gguf (tokenizer.chat_template); Ollama reads it from there")
    return "\n".join(lines) + "\n"


@hookimpl
def llmquant_register_formats(register: Callable[[type[OutputFormat]], None]) -> None:
    register(GGUFFormat)
