"""Calibration samples: token windows cut from text, through the `datasets` library.

A source is a text file (.txt, .json, .jsonl, .parquet), a folder of such files, or anything
``datasets.load_dataset`` opens (``name``, with a config name and split). Documents are
shuffled with the seed, tokenized, joined with the tokenizer's EOS token, and the first
``samples * seqlen`` tokens are cut into ``samples`` windows of ``seqlen``, so short documents
(Wikipedia leads) and long ones (books) both give full windows.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmquant.errors import ConfigError, LlmquantError
from llmquant.io.shards import parse_size

__all__ = ["CalibrationConfig", "load_calibration", "read_texts"]

log = logging.getLogger(__name__)

_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DTYPES = ("float16", "bfloat16", "float32")
_MODES = ("auto", "single-pass", "replay")


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Where calibration text comes from and how the host stores activations.

    Attributes:
        calib: a text/json/jsonl/parquet file, a folder of them, or a `datasets` name; None means none.
        calib_samples: number of windows.
        calib_seqlen: tokens per window.
        calib_split: dataset split (named datasets and data files).
        calib_column: text column; None picks ``text``, ``extract`` or the first string column.
        calib_config: the dataset's config name (e.g. ``wikitext-2-raw-v1``).
        calib_chat_template: wrap each document as a user turn with the tokenizer's chat template.
        calib_batch_size: windows per forward pass.
        calib_dtype: dtype activations are stored and blocks run in while calibrating.
        calib_memory: budget for calibration activations, e.g. "1GB": block inputs and outputs spill
            to disk past it, and the single-pass mode is used only when it fits (see `calib_mode`).
        calib_mode: "auto" (single-pass when its activations fit in `calib_memory`, else replay),
            "single-pass" (one forward per block, all batches in flight: fastest) or "replay" (one
            pass per sequential group: about twice the forward compute, one batch in flight).
        seed: seed for document order.
        moe_calibration: how routed experts get their Hessians: "routed" (the tokens the router sends
            each expert) or "all" (every token through every expert; see `host.expert_calibration`).
        moe_min_tokens: with "routed", the share of calibration tokens below which an expert is
            quantized without calibration.
        moe_memory: budget for one chunk of experts' Hessians, e.g. "1GB".
    """

    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    calib_split: str = "train"
    calib_column: str | None = None
    calib_config: str | None = None
    calib_chat_template: bool = False
    calib_batch_size: int = 8
    calib_dtype: str = "bfloat16"
    calib_memory: str = "1GB"
    calib_mode: str = "auto"
    seed: int = 0
    moe_calibration: str = "routed"
    moe_min_tokens: float = 0.005
    moe_memory: str = "1GB"

    def __post_init__(self) -> None:
        for field in ("calib_samples", "calib_seqlen", "calib_batch_size"):
            if getattr(self, field) <= 0:
                raise ConfigError(field, getattr(self, field), "a positive int")
        try:
            parse_size(self.calib_memory)
        except ValueError as exc:
            raise ConfigError("calib_memory", self.calib_memory, "a size such as 4GB or 500MiB") from exc
        try:
            parse_size(self.moe_memory)
        except ValueError as exc:
            raise ConfigError("moe_memory", self.moe_memory, "a size such as 1GB or 500MiB") from exc
        if self.moe_calibration not in ("routed", "all"):
            raise ConfigError("moe_calibration", self.moe_calibration, "one of routed, all")
        if not 0 <= self.moe_min_tokens < 1:
            raise ConfigError("moe_min_tokens", self.moe_min_tokens, "a share of the calibration tokens in [0, 1)")
        if self.calib_mode not in _MODES:
            raise ConfigError("calib_mode", self.calib_mode, f"one of {', '.join(_MODES)}")
        if self.calib_dtype not in _DTYPES:
            raise ConfigError("calib_dtype", self.calib_dtype, f"one of {', '.join(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.calib_dtype)
        return dtype


def read_texts(config: CalibrationConfig) -> list[str]:
    """Return the documents of the configured source, as strings."""
    if config.calib is None:
        raise LlmquantError("no calibration source: pass --calib SOURCE")
    path = Path(config.calib)
    if path.is_file() and path.suffix == ".json":
        records = _json_records(path)
        return _column(records, config.calib_column, str(path))
    dataset = _load_dataset(config, path)
    return _column(dataset, config.calib_column, config.calib)


def _json_records(path: Path) -> list[dict[str, Any]]:
    """Read a .json file: a list of records, or an object whose values are records (title -> record)."""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        return list(data.values())
    if isinstance(data, list):
        return [r if isinstance(r, dict) else {"text": r} for r in data]
    raise LlmquantError(f"{path}: expected a JSON list of records or an object of records")


def _load_dataset(config: CalibrationConfig, path: Path) -> Any:
    import datasets

    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
        if path.is_dir():
            skipped = sorted(p.name for p in path.rglob("*") if p.is_file() and p.suffix not in _BUILDERS)
            if skipped:
                log.warning("calibration folder %s: ignoring files that are not .txt/.json/.jsonl/.parquet: %s", path, skipped[:10])
        kinds = {_BUILDERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) > 1:
            raise LlmquantError(
                f"calibration source {path}: expected .txt, .json, .jsonl or .parquet files of one kind, found "
                f"{sorted({p.suffix for p in files}) or 'none'}; split them into folders of one kind"
            )
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    try:
        return datasets.load_dataset(config.calib, config.calib_config, split=config.calib_split)
    except Exception as exc:  # datasets raises many types for unknown or offline datasets
        raise LlmquantError(
            f"could not open calibration dataset {config.calib!r} ({type(exc).__name__}: {exc}); "
            f"pass a local .txt/.jsonl/.parquet file or folder, or a dataset name with --calib-config/--calib-split"
        ) from exc


def _column(rows: Any, column: str | None, where: str) -> list[str]:
    names = list(rows[0].keys()) if isinstance(rows, list) and rows else list(getattr(rows, "column_names", []))
    if column is None:
        strings = [n for n in names if isinstance((rows[0] if rows else {}).get(n), str)]
        column = next((n for n in ("text", "extract", "content") if n in strings), strings[0] if strings else None)
    if column is None or column not in names:
        raise LlmquantError(f"calibration source {where}: no text column {column!r}; columns are {names}; pass --calib-column")
    return [r[column] for r in rows if isinstance(r[column], str) and r[column].strip()]


def load_calibration(config: CalibrationConfig, tokenizer: Any) -> Tensor:
    """Return ``(calib_samples, calib_seqlen)`` int64 token ids.

    Raises:
        LlmquantError: the source has fewer tokens than the windows need.
    """
    texts = read_texts(config)
    random.Random(config.seed).shuffle(texts)
    needed = config.calib_samples * config.calib_seqlen
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if config.calib_chat_template:
            ids.extend(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, return_dict=False))
        else:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise LlmquantError(
            f"calibration source {config.calib} has {len(ids)} tokens, fewer than the {needed} that "
            f"{config.calib_samples} samples of {config.calib_seqlen} need; lower --calib-samples/--calib-seqlen or add text"
        )
    log.info("calibration: %d samples x %d tokens from %s (%d documents)", config.calib_samples, config.calib_seqlen,
             config.calib, len(texts))
    return torch.tensor(ids[:needed], dtype=torch.int64).view(config.calib_samples, config.calib_seqlen)
