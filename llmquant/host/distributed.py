"""Calibration spread over workers that each hold some of the calibration batches.

The batches (``--calib-batch-size`` windows each, cut by sample index) are the chunks: worker
``w`` of ``N`` holds a contiguous run of them and their activations, which never leave it. Per
block, every worker loads the block from the checkpoint and, per sequential group, runs its
batches to the group's input and returns each batch's ``x^T x`` (`BatchPartials`); the driver
adds them in batch order (`reduce_partials`: the bits of one process that saw every batch),
quantizes the group's Linears and sends the dequantized weights back to every worker, which then
continues to the next group. At the end of the block each worker computes its batches' outputs as
the next block's inputs. So the output does not depend on how many workers ran, or where.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats
from llmquant.errors import LlmquantError
from llmquant.host.calibrate import SequentialCalibrator
from llmquant.host.expert_calibration import ExpertPolicy
from llmquant.host.groups import LinearGroup
from llmquant.host.hessian import BatchPartials, reduce_partials
from llmquant.host.moe import defused_skeleton, weight_shapes
from llmquant.io.shards import parse_size

__all__ = ["CalibrationWorker", "WorkerSpec", "split_batches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs: the run's job (checkpoint, plan, config; pickled to a Ray worker), its
    calibration windows, and the index of its first batch."""

    job: Any
    samples: Tensor
    first_batch: int
    hessians: bool = True
    float_inputs: bool = False


def split_batches(batches: int, workers: int) -> list[range]:
    """Contiguous runs of batches, as even as they go, for at most `workers` workers (none empty)."""
    workers = max(1, min(workers, batches))
    size, extra = divmod(batches, workers)
    ranges, start = [], 0
    for w in range(workers):
        end = start + size + (w < extra)
        ranges.append(range(start, end))
        start = end
    return ranges


class CalibrationWorker:
    """One worker's calibration batches and the phases of the block loop on them (a Ray actor, or
    an object in the driver's process)."""

    def __init__(self, spec: WorkerSpec) -> None:
        from transformers import AutoConfig

        job = spec.job
        calibration = job.config.calibration
        checkpoint = job.checkpoint
        skeleton, _, _ = defused_skeleton(AutoConfig.from_pretrained(checkpoint.folder), checkpoint.infos, weight_shapes(checkpoint.infos))
        self.first_batch = spec.first_batch
        self._spill = Path(tempfile.mkdtemp(prefix="llmquant-worker-"))
        self.calibrator = SequentialCalibrator(
            skeleton, job.plan.layout, checkpoint, spec.samples, batch_size=calibration.calib_batch_size,
            dtype=calibration.torch_dtype, device=job.config.device, memory=parse_size(calibration.calib_memory),
            spill_dir=self._spill, mode=calibration.calib_mode, keys=job.plan.keys,
            experts=ExpertPolicy(calibration.moe_calibration, calibration.moe_min_tokens, parse_size(calibration.moe_memory)),
            hessians=spec.hessians, float_inputs=spec.float_inputs, partials=True)
        self.calibrator.capture_inputs()
        self._group: LinearGroup | None = None

    def begin_block(self, index: int, targets: set[str]) -> int:
        """Load block `index`; return its number of sequential groups."""
        return len(self.calibrator.begin_block(index, _no_quantize, targets))

    def collect(self, g: int) -> tuple[list[str], list[BatchPartials]] | None:
        """Run this worker's batches to group `g`'s input: the group's target Linears and each batch's
        partial sums (numbered by global batch), or None when nothing in the group is a target."""
        collector = self.calibrator.collect(g)
        if collector is None:
            return None
        if not isinstance(collector, LinearGroup) or collector.hessian is None:
            raise LlmquantError("--executor ray calibrates dense Linears only; mixture-of-experts blocks need --executor local")
        self._group = collector
        parts = [dataclasses.replace(p, batch=self.first_batch + p.batch) for p in collector.hessian.partials]
        return [name for name, _ in collector.linears], parts

    def apply(self, weights: dict[str, Tensor]) -> None:
        """Continue with the group's dequantized weights."""
        assert self._group is not None
        with torch.no_grad():
            for name, linear in self._group.linears:
                linear.weight.data = weights[name].to(self._group.device, self._group.dtype)
        self._group = None

    def end_block(self) -> None:
        """Compute this worker's batches' outputs as the next block's inputs."""
        self.calibrator.end_block()

    def close(self) -> None:
        shutil.rmtree(self._spill, ignore_errors=True)


def _no_quantize(name: str, stats: CalibrationStats | None) -> Tensor:
    raise AssertionError(f"{name}: a distributed worker's groups are quantized by the driver")


def calibrated_block(workers: list[Any], get: Any, index: int, targets: set[str], quantize: Any) -> None:
    """Drive one block through every worker's phases; `get` resolves the workers' results (Ray's
    ``ray.get``, or the identity for in-process workers) and `quantize(name, stats)` quantizes one
    Linear on the driver, returning its dequantized weight."""
    counts = get([w.begin_block(index, targets) for w in workers])
    if len(set(counts)) != 1:
        raise LlmquantError(f"block {index}: the workers found different sequential groups ({counts})")
    for g in range(counts[0]):
        found = get([w.collect(g) for w in workers])
        if found[0] is None:
            continue
        names = found[0][0]
        parts = [p for _, worker_parts in found for p in worker_parts]
        stats = reduce_partials(parts[0].xtx.shape[0], parts).stats()
        weights = {name: quantize(name, stats) for name in names}
        get([w.apply(weights) for w in workers])
    get([w.end_block() for w in workers])
