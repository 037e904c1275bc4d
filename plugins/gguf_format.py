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
from llmquant.io.gguf_kquants import KQUANTS, SUPER, decode_kquant, encode_kquant
from llmquant.io.gguf_model import EXPERT, QUANTIZED_MARK, check_convertible, write_gguf
from llmquant.io.gguf_read import GGUFTensors

__all__ = ["GGUFFormat", "GGUFOptions"]

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
GGUF_TYPES = ("auto", *LOSSLESS, *KQUANTS, "f16")
EMBEDDING_TYPES = ("auto", *LOSSLESS, *KQUANTS, "f16", "f32")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q4_k": 14, "q6_k": 18}  # gguf.LlamaFileType


@dataclass(frozen=True)
class GGUFOptions:
    """Settings of the GGUF format (``--gguf-type``, ``--gguf-embedding-type``; the same keys in TOML).

    Attributes:
        gguf_type: the block type of the quantized Linears: auto (the smallest that holds each
            result exactly), q4_0, q4_1, q5_0, q8_0; q4_k or q6_k (the algorithm fits its scales
            on the super-block grid; 4-bit Linears go to Q4_K and 6-bit ones to Q6_K, rows that are
            not a multiple of 256 to the smallest exact 32-block type); or f16 (dequantized).
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
    """llama.cpp's GGUF: Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K blocks from uniform codes, or F16."""

    name: ClassVar[str] = "gguf"
    description: ClassVar[str] = "GGUF model.gguf, Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K blocks or F16 (llama.cpp, Ollama, LM Studio)"
    accepts: ClassVar[tuple[type, ...]] = (UniformQuantized,)
    default_for: ClassVar[tuple[type, ...]] = ()
    options_type: ClassVar[type] = GGUFOptions

    def __init__(self, options: GGUFOptions | None = None) -> None:
        self.options = options or GGUFOptions()
        self.expert_types: dict[tuple[str, str], tuple[str, str]] = {}  # (experts, projection) -> (type, first expert)

    def check_model(self, folder: Path) -> None:
        """Refuse, before any work, a model whose architecture, rope or tokenizer GGUF output does not cover."""
        check_convertible(folder)

    def planned_type(self, in_features: int, bits: int, symmetric: bool) -> str:
        """The block type a Linear with `in_features` inputs and these codes is written as.

        A K-quant ``--gguf-type`` covers its family: 4-bit Linears go to Q4_K and 6-bit ones (a
        recipe's overrides) to Q6_K; rows that are not a multiple of 256 inputs, where llama.cpp
        falls back too, and other widths take the smallest exact 32-block type, as ``auto`` does."""
        wanted = self.options.gguf_type
        if wanted in KQUANTS:
            family = {kind.bits: kind.name for kind in KQUANTS.values()}
            if bits in family and symmetric and in_features % SUPER == 0:
                return family[bits]
            wanted = "auto"
        if wanted == "auto":
            fit = fitting_types(bits, symmetric)
            return fit[0] if fit else "none"
        return wanted

    def constraints(self, name: str, shape: tuple[int, int], config: Any) -> dict[str, Any]:
        """Settings the algorithm must honour for this Linear: a K-quant's scale grid; in a K-quant run, groups of
        32 for a Linear whose rows do not fill super-blocks (a recipe's Q6_K groups of 16 then go to Q8_0)."""
        group = getattr(config, "group_size", None)
        kind = self.planned_type(shape[1], getattr(config, "bits", 4), getattr(config, "symmetric", True))
        if kind in KQUANTS:
            return {"scale_grid": KQUANTS[kind].grid} if group == KQUANTS[kind].group else {}  # else check_module explains
        if self.options.gguf_type in KQUANTS and group is not None and group % BLOCK:
            return {"group_size": BLOCK}
        return {}

    def check_module(self, name: str, shape: tuple[int, int], config: Any) -> None:
        """Refuse, before any work, a Linear whose result could not be written as the chosen type."""
        bits, symmetric = getattr(config, "bits", 4), getattr(config, "symmetric", True)
        group = getattr(config, "group_size", None) or shape[1]
        if getattr(config, "desc_act", False) and not getattr(config, "static_groups", False):
            raise ConfigError("desc_act", True, "false for GGUF (act-order scatters the groups over the inputs, and GGUF's "
                              "blocks are contiguous), or static_groups = true")
        kind = self.planned_type(shape[1], bits, symmetric)
        self._check_expert_type(name, kind)
        codes = f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'} codes"
        if self.options.gguf_type in KQUANTS and not symmetric:
            raise ConfigError("symmetric", False, f"true for {self.options.gguf_type} (K-quants hold symmetric codes; drop --asym)")
        if kind in KQUANTS:
            if group != KQUANTS[kind].group:
                raise ConfigError("group_size", group, f"{KQUANTS[kind].group} for {name} in {kind.upper()} (its groups): "
                                  f"--group-size {KQUANTS[kind].group}")
            return
        if kind == "none":
            raise ConfigError("bits", bits, f"a width a GGUF block type holds ({codes} fit none)")
        if shape[1] % BLOCK or group % BLOCK:
            raise ShapeError(f"{name} {shape} with group size {group}: GGUF blocks hold groups of a multiple of {BLOCK} "
                             f"inputs; use --group-size 32, 64 or 128, or leave it in float with --ignore")
        if kind in LOSSLESS and not uniform_fit(LOSSLESS[kind], bits, symmetric):
            fit = fitting_types(bits, symmetric)
            raise ConfigError("gguf_type", kind, f"a type that holds {codes}: {', '.join(fit) or 'none'}"
                              + (" (or --sym for q4_0)" if kind == "q4_0" and bits == 4 else ""))

    def _check_expert_type(self, name: str, kind: str) -> None:
        """GGUF holds a layer's experts of one projection in one tensor, of one type: refuse experts planned otherwise."""
        expert = EXPERT.match(name)
        if expert is None:
            return
        first_kind, first = self.expert_types.setdefault((expert["prefix"], expert["proj"]), (kind, name))
        if kind != first_kind:
            raise ConfigError("overrides", name, f"the same bits and type for every expert of {expert['prefix']}.N."
                              f"{expert['proj']} ({first} is {first_kind}, this one {kind}): GGUF holds them in one tensor")

    def tensors(self, result: UniformQuantized, dtype: torch.dtype) -> dict[str, Tensor]:
        kind = self.planned_type(result.shape[1], result.bits, result.symmetric)
        if kind == "f16":
            return {"weight": result.dequantize(torch.float16)}
        rows = encode_kquant(result, KQUANTS[kind]) if kind in KQUANTS else encode_blocks(result, LOSSLESS[kind])
        return {f"{QUANTIZED_MARK[1:]}{kind}": rows}

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
        name = key.removeprefix(QUANTIZED_MARK[1:])
        if name in KQUANTS:
            return decode_kquant(rows, KQUANTS[name], rows.shape[1] // KQUANTS[name].block_bytes * SUPER)
        return decode_blocks(rows, LOSSLESS[name], rows.shape[1] // LOSSLESS[name].block_bytes * BLOCK)

    def open(self, folder: Path) -> Mapping[str, Tensor]:
        """``model.gguf``'s tensors under the checkpoint's names, Linears as the rows `read` decodes."""
        return GGUFTensors(folder / GGUF_FILE)

    def finish(self, folder: Path, records: list[ModuleRecord]) -> None:
        """Turn the finished output in `folder` into ``model.gguf`` plus an Ollama ``Modelfile``."""
        types = Counter(key.partition(QUANTIZED_MARK)[2] for key in _tensor_keys(folder) if QUANTIZED_MARK in key)
        chosen = self.options.gguf_type
        base = chosen if chosen in FILE_TYPES else types.most_common(1)[0][0] if types else "f16"
        record = json.loads((folder / "llmquant.json").read_text()) if (folder / "llmquant.json").exists() else {}
        partial = folder / (GGUF_FILE + ".partial")
        write_gguf(folder, partial, embedding_type=self.options.gguf_embedding_type, base_type=base,
                   file_type=FILE_TYPES.get(base, 1), name=str(record.get("base_model") or folder.name))
        partial.replace(folder / GGUF_FILE)
        for shard in [*folder.glob("*.safetensors"), *folder.glob("model.safetensors.index.json")]:
            shard.unlink()
        (folder / "Modelfile").write_text(modelfile(folder))
        log.info("wrote %s (%s: %s)", GGUF_FILE, base.upper(),
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
