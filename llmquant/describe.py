"""Describe an output folder: per-module settings and sizes, and the quantization config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmquant.errors import CheckpointError
from llmquant.host.checkpoint import Checkpoint

__all__ = ["describe_output"]


def _tensor_sizes(folder: Path, quantization_config: dict[str, Any]) -> dict[str, int]:
    """Bytes of every stored tensor by checkpoint name: the shards', or a format's own file (GGUF) read back."""
    from llmquant.plugins import get_plugin_manager

    entry = get_plugin_manager().format_of(quantization_config) if quantization_config else None
    opener = getattr(entry.cls(), "open", None) if entry is not None else None
    if opener is not None:
        return dict(opener(folder).sizes)
    return {key: info.nbytes for key, info in Checkpoint(folder).infos.items()}


def describe_output(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return per-module bits/group/format and sizes, totals, the config, and a text table under ``"text"``.

    Sizes "before" are the module's weight in float16, the usual serving dtype.
    """
    folder = Path(path)
    meta_path = folder / "llmquant.json"
    if not meta_path.exists():
        raise CheckpointError(f"{folder} has no llmquant.json: point at a folder written by `llmquant quantize`")
    meta = json.loads(meta_path.read_text())
    quantization_config = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    sizes = _tensor_sizes(folder, quantization_config)
    fmt = meta["config"].get("format") or quantization_config.get("quant_method", "?")
    modules = []
    for m in meta["modules"]:
        out_features, in_features = m["shape"]
        now = sum(size for key, size in sizes.items() if key.startswith(m["name"] + ".") and key != m["name"] + ".bias")
        modules.append({**m, "format": fmt if m["bits"] is not None else "float",
                        "bytes_fp16": out_features * in_features * 2, "bytes": now})
    total = sum(sizes.values())
    rows = [f"{'module':<44} {'bits':>4} {'group':>5} {'sym':>5} {'format':>18} {'fp16 KB':>9} {'now KB':>8}"]
    rows += [
        f"{m['name']:<44} {m['bits'] or '-':>4} {m['group_size'] or '-':>5} {str(m['symmetric'] if m['bits'] else '-'):>5} "
        f"{m['format']:>18} {m['bytes_fp16'] / 1024:>9.1f} {m['bytes'] / 1024:>8.1f}"
        + (f"  kept: {m['kept']}" if m.get("kept") else "") + (f"  {m['calibration']}" if m.get("calibration") else "")
        for m in modules
    ]
    kept: dict[str, int] = {}
    for m in modules:
        if m["bits"] is None:
            reason = str(m.get("kept", "your ignore rules")).split(":")[0]
            kept[reason] = kept.get(reason, 0) + 1
    fallbacks = sum(1 for m in modules if m.get("calibration"))
    rows.append(f"weight matrices in the blocks: {len(modules) - sum(kept.values())} quantized, {sum(kept.values())} kept in float"
                + (f" ({', '.join(f'{n} {r}' for r, n in kept.items())})" if kept else "")
                + (f"; {fallbacks} expert projections quantized without calibration (too few routed tokens)" if fallbacks else ""))
    before = sum(m["bytes_fp16"] for m in modules)
    after = sum(m["bytes"] for m in modules)
    rows.append(f"Linears: {before / 1e6:.2f} MB in fp16 -> {after / 1e6:.2f} MB ({before / max(after, 1):.2f}x); "
                f"all tensors now {total / 1e6:.2f} MB")
    rows.append(f"config: {json.dumps(meta['config'])}")
    return {"modules": modules, "linear_bytes_fp16": before, "linear_bytes": after, "total_bytes": total,
            "config": meta["config"], "quantization_config": quantization_config, "llmquant_version": meta["llmquant_version"],
            "text": "\n".join(rows)}
