"""Memory: weight bytes on disk and in memory, and peak resident memory (and peak CUDA memory).

Peak RSS is the process's high-water mark (VmHWM). Linux lets a process reset it by writing
``5`` to ``/proc/self/clear_refs``, so one process can measure several models one after another;
where that is not allowed the peak is the process's lifetime peak and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["MemoryResult", "disk_bytes", "model_bytes", "peak_rss_mb", "reset_peak"]


@dataclass(frozen=True)
class MemoryResult:
    disk_bytes: int
    memory_bytes: int
    peak_rss_mb: float
    peak_rss_reset: bool
    peak_cuda_mb: float | None = None


def disk_bytes(folder: Path) -> int:
    """Return the bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.gguf``) in `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf"))


def model_bytes(model: nn.Module) -> int:
    """Return the bytes of every parameter and buffer, each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen and not tensor.is_meta:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def reset_peak() -> bool:
    """Reset the peak RSS (and CUDA peak) counters; return whether the RSS peak could be reset."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Return this process's peak resident memory since the last reset, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
