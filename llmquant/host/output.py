"""The output folder: written under a temporary name beside the target, moved into place whole.

A run that stops half way leaves only ``.NAME.llmquant-partial`` beside the target, never a
folder at the target that could be mistaken for a finished checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from llmquant.config import QuantizeConfig
from llmquant.errors import LlmquantError
from llmquant.formats import ModuleRecord

__all__ = ["OutputFolder", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_WRITTEN = {"config.json", "model.safetensors.index.json", "quantize_config.json", "llmquant.json", "README.md",
            "llmquant-import.json"}


class OutputFolder:
    """Context manager yielding the temporary folder; on success it becomes `target`."""

    def __init__(self, target: Path, *, source: Path, overwrite: bool) -> None:
        self.target, self.source, self.overwrite = Path(target), Path(source), overwrite
        resolved, src = self.target.resolve(), self.source.resolve()
        if resolved == src or src in resolved.parents:
            raise LlmquantError(f"output {target} is the input folder or inside it: choose an output outside {source}")
        if self.target.exists() and not overwrite:
            raise LlmquantError(f"output {target} already exists: choose another path or pass --overwrite")
        self.tmp = self.target.parent / f".{self.target.name}.llmquant-partial"

    def __enter__(self) -> Path:
        """Return the temporary folder; whether earlier contents are kept is `PartialRun`'s call.
        The output's parent folders are created, as ``save_pretrained`` does."""
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            if self.tmp.exists():
                log.warning("run stopped; partial output kept in %s (rerun with --resume to continue)", self.tmp)
            return
        from llmquant.host.runner import fault_point

        fault_point("before-rename")
        if self.target.exists():
            shutil.rmtree(self.target)
        self.tmp.rename(self.target)

    def write_metadata(self, records: list[ModuleRecord], quantization_config: dict[str, Any], config: QuantizeConfig,
                       provenance: dict[str, Any], model_updates: dict[str, Any] | None = None) -> None:
        """Write config.json with `quantization_config`, quantize_config.json, llmquant.json, the model
        card (README.md) and the tokenizer.

        Args:
            provenance: ``base_model``, and the ``algorithm`` and ``format_plugin`` that ran
                (name, distribution, version; ``calibrated`` for the algorithm), for the run record.
            model_updates: config.json keys the run changed (``tie_word_embeddings`` false for a
                head a transform untied).
        """
        from llmquant import __version__
        from llmquant.card import write_card

        model_config = json.loads((self.source / "config.json").read_text())
        model_config.update(model_updates or {})
        model_config["quantization_config"] = quantization_config
        if config.dtype != "auto":
            model_config["dtype"] = config.dtype
            model_config.pop("torch_dtype", None)
        _write_json(self.tmp / "config.json", model_config)
        if quantization_config.get("quant_method") == "gptq":  # GPTQModel and AutoGPTQ read this file
            _write_json(self.tmp / "quantize_config.json", quantization_config)
        _write_json(self.tmp / "llmquant.json", {
            "format_version": FORMAT_VERSION,
            "llmquant_version": __version__,
            "source": str(self.source),
            **provenance,
            "config": config.to_dict(),
            "modules": [
                {"name": r.name, "shape": list(r.shape), "bits": r.bits, "group_size": r.group_size, "symmetric": r.symmetric,
                 **r.extra}
                for r in records
            ],
        })
        for path in sorted(self.source.iterdir()):
            if path.is_file() and path.name not in _WRITTEN and not path.name.endswith(_NOT_COPIED):
                shutil.copy2(path, self.tmp / path.name)
        write_card(self.tmp)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.target.rglob("*") if p.is_file())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
