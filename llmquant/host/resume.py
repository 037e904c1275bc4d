"""What makes an interrupted run resumable: per-block results in the temporary folder, the
calibration activations after the last finished block, and a fingerprint of everything the
output depends on.

Layout of ``.NAME.llmquant-partial/`` while a run is under way::

    fingerprint.json              model, config, calibration data, llmquant and plugin versions
    blocks/00007.safetensors      block 7's output tensors (quantized and copied), in write order
    blocks/00007.json             block 7's module records; written last, so its presence marks the block done
    stream.json                   for runs without calibration, whose blocks go straight into the final
                                  shards (shard-00001.partial, ...): the blocks done, their module records
                                  and the shard writer's state after the last of them
    activations.pt                calibration activations after the last finished block
    batches/inputs-00008/00003.pt the same, per calibration batch, where workers of `--executor ray`
                                  keep them (`llmquant.host.distributed`): block 8's inputs from batch 3

Each file is written under a temporary name and renamed, so a kill at any moment leaves either
the old state or the new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from llmquant.errors import LlmquantError
from llmquant.formats import ModuleRecord
from llmquant.host.checkpoint import Checkpoint, read_safetensors_header

__all__ = ["PartialRun", "fingerprint_run", "disk_full_error"]


def fingerprint_run(checkpoint: Checkpoint, settings: dict[str, Any], samples: Tensor | None, plugin: str) -> dict[str, str]:
    """Return short hashes of what the output depends on, by part, so a mismatch can say which."""
    from llmquant import __version__

    model = hashlib.sha256((checkpoint.folder / "config.json").read_bytes())
    for name, info in sorted(checkpoint.infos.items()):
        model.update(f"{name}|{info.path.name}|{info.dtype}|{info.shape}|{info.path.stat().st_size}|{info.path.stat().st_mtime_ns}".encode())
    stable = {k: v for k, v in settings.items() if k not in ("device",)}
    calibration = hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16] if samples is not None else "none"
    return {
        "model": model.hexdigest()[:16],
        "config": hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "calibration data": calibration,
        "llmquant version": __version__,
        "algorithm plugin": plugin,
    }


def disk_full_error(exc: OSError, where: Path) -> LlmquantError:
    """Turn ENOSPC into an error that says what to do; other OSErrors pass through unchanged."""
    if exc.errno != errno.ENOSPC:
        raise exc
    return LlmquantError(
        f"no space left on the device while writing {where}: free some space, then rerun the same command "
        f"with --resume to continue from the last finished block (the partial output is kept there)"
    )


class PartialRun:
    """The temporary folder of one run, fresh or resumed."""

    def __init__(self, folder: Path, fingerprint: dict[str, str], *, resume: bool) -> None:
        self.folder = folder
        self.blocks = folder / "blocks"
        self.batches = folder / "batches"
        saved = folder / "fingerprint.json"
        if resume and saved.exists():
            old = json.loads(saved.read_text())
            changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
            if changed:
                raise LlmquantError(
                    f"cannot resume from {folder}: the {', '.join(changed)} changed since that run; rerun without "
                    f"--resume to start over, or restore what changed"
                )
        else:
            shutil.rmtree(folder, ignore_errors=True)
            self.blocks.mkdir(parents=True)
            _write_atomic(saved, json.dumps(fingerprint, indent=2).encode())

    def done(self) -> list[int]:
        """Return the finished blocks, 0..k with no gap (a later block done out of order is redone)."""
        finished = {int(p.stem) for p in self.blocks.glob("*.json")}
        count = 0
        while count in finished:
            count += 1
        return list(range(count))

    def write_block(self, index: int, tensors: list[tuple[str, Tensor]], records: list[ModuleRecord]) -> None:
        """Store block `index`'s output tensors and records; the records file marks it done."""
        order = [name for name, _ in tensors]
        path = self.blocks / f"{index:05d}.safetensors"
        tmp = path.with_suffix(".partial")
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors}, str(tmp), metadata={"order": json.dumps(order)})
        os.replace(tmp, path)
        _write_atomic(self.blocks / f"{index:05d}.json", json.dumps([asdict(r) for r in records]).encode())

    def block_tensors(self, index: int) -> tuple[Checkpoint, list[str]]:
        """Return a reader over block `index`'s stored tensors and their write order."""
        path = self.blocks / f"{index:05d}.safetensors"
        reader = Checkpoint.__new__(Checkpoint)
        reader.folder, reader.infos = self.blocks, read_safetensors_header(path)
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            order = json.loads(json.loads(f.read(header_length))["__metadata__"]["order"])
        return reader, order

    def block_records(self, index: int) -> list[ModuleRecord]:
        rows = json.loads((self.blocks / f"{index:05d}.json").read_text())
        return [ModuleRecord(**{**r, "shape": tuple(r["shape"])}) for r in rows]

    def save_stream(self, done: int, records: list[ModuleRecord], writer: dict[str, Any]) -> None:
        """Mark blocks 0..`done` streamed into the shards, with their records and the writer's state."""
        _write_atomic(self.folder / "stream.json", json.dumps({"done": done, "records": [asdict(r) for r in records],
                                                               "writer": writer}).encode())

    def stream_state(self) -> tuple[int, list[ModuleRecord], dict[str, Any]] | None:
        """Return what `save_stream` saved last (None for a fresh run): blocks done, records, writer state."""
        path = self.folder / "stream.json"
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        records = [ModuleRecord(**{**r, "shape": tuple(r["shape"])}) for r in saved["records"]]
        return saved["done"], records, saved["writer"]

    def save_activations(self, after_block: int, tensors: list[Tensor]) -> None:
        """Keep the calibration activations that feed block ``after_block + 1``."""
        tmp = self.folder / "activations.partial"
        torch.save({"after_block": after_block, "tensors": tensors}, tmp)
        os.replace(tmp, self.folder / "activations.pt")

    def load_activations(self, after_block: int) -> list[Tensor]:
        path = self.folder / "activations.pt"
        saved = torch.load(path, weights_only=True) if path.exists() else None
        if saved is None or saved["after_block"] != after_block:
            raise LlmquantError(f"cannot resume from {self.folder}: the calibration activations after block {after_block} "
                                f"are missing; resume with the --executor the run started with, or rerun without --resume")
        tensors: list[Tensor] = saved["tensors"]
        return tensors

    def finish(self) -> None:
        """Remove the resume state once the final shards are written."""
        shutil.rmtree(self.blocks, ignore_errors=True)
        shutil.rmtree(self.batches, ignore_errors=True)
        for name in ("activations.pt", "fingerprint.json", "stream.json"):
            (self.folder / name).unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)
