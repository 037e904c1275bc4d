"""Calibration spread over workers that each hold some of the calibration batches.

The batches (``--calib-batch-size`` windows each, cut by sample index) are the chunks: worker
``w`` of ``N`` holds a contiguous run of them and their activations, which never leave it. Per
block, every worker loads the block from the checkpoint and, per sequential group, runs its
batches to the group's input and returns each batch's ``x^T x`` (`BatchPartials`); the driver
adds them in batch order (`reduce_partials`: the bits of one process that saw every batch) and
sends the group's statistics to the workers, which quantize its Linears between them, largest
first (`by_cost`); the dequantized weights go back to every worker, which then
continues to the next group. At the end of the block each worker computes its batches' outputs as
the next block's inputs. So the output does not depend on how many workers ran, or where.

Each worker also writes its batches' next inputs to the run's partial folder, one file per batch
(`PartialRun.batches`), and the driver drops a block's inputs once the block is stored. A worker
lost mid-block (its process or its node) is replaced by `CalibrationPool`: every worker reloads
the block's inputs from those files and the block is redone, to the same bytes; `--resume` starts
from them in the same way, with any number of workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats
from llmquant.errors import LlmquantError
from llmquant.host.calibrate import SequentialCalibrator
from llmquant.host.distributed_experts import ExpertsFound, calibrate_experts_over, expert_partials, experts_found
from llmquant.host.expert_calibration import ExpertPolicy, routed_rows
from llmquant.host.groups import ExpertsGroup, LinearGroup
from llmquant.host.hessian import BatchPartials, reduce_partials
from llmquant.host.moe import defused_skeleton, weight_shapes
from llmquant.io.shards import parse_size

__all__ = ["CalibrationPool", "CalibrationWorker", "Traffic", "WorkerSpec", "split_batches", "tensor_bytes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs: the run's job (checkpoint, plan, config; pickled to a Ray worker), its
    calibration windows, the index of its first batch, and the folder of the run's per-batch inputs."""

    job: Any
    samples: Tensor
    first_batch: int
    state: Path
    hessians: bool = True
    float_inputs: bool = False
    solve_threads: int = 0  # torch threads for the solves: the driver's, whose count the solves' bits depend on


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
        self.job, self.first_batch, self.state, self.solve_threads = job, spec.first_batch, spec.state, spec.solve_threads
        self._index = -1
        self._spill = Path(tempfile.mkdtemp(prefix="llmquant-worker-"))
        self.calibrator = SequentialCalibrator(
            skeleton, job.plan.layout, checkpoint, spec.samples, batch_size=calibration.calib_batch_size,
            dtype=calibration.torch_dtype, device=job.config.device, memory=parse_size(calibration.calib_memory),
            spill_dir=self._spill, mode=calibration.calib_mode, keys=job.plan.keys,
            experts=ExpertPolicy(calibration.moe_calibration, calibration.moe_min_tokens, parse_size(calibration.moe_memory)),
            hessians=spec.hessians, float_inputs=spec.float_inputs, partials=True)
        self.calibrator.capture_inputs()
        self._group: LinearGroup | ExpertsGroup | None = None
        self._rows: list[list[Tensor]] = []  # the current experts group's routed rows per batch and expert

    def save_inputs(self) -> None:
        """Write each of this worker's batches' inputs to the next block as its own file."""
        folder = inputs_folder(self.state, self._index + 1)
        folder.mkdir(parents=True, exist_ok=True)
        calibrator = self.calibrator
        for b in range(len(calibrator.inputs)):
            tensors = [calibrator.inputs[b]] + ([calibrator.float_in[b]] if calibrator.float_inputs else [])
            path = folder / f"{self.first_batch + b:05d}.pt"
            torch.save(tensors, path.with_suffix(".partial"))
            os.replace(path.with_suffix(".partial"), path)

    def restore(self, block: int) -> None:
        """Take block `block`'s inputs from the files `save_inputs` wrote (a replacement worker, a redone block, a
        resumed run)."""
        self.calibrator.abort_block()  # a live worker may be half way through the block that is redone
        folder = inputs_folder(self.state, block)
        batches = [torch.load(folder / f"{self.first_batch + b:05d}.pt", weights_only=True) for b in range(len(self.calibrator.inputs))]
        self.calibrator.load_inputs([t[0] for t in batches] + [t[1] for t in batches if len(t) > 1])
        self._index = block - 1

    def ping(self) -> bool:
        return True

    def begin_block(self, index: int, targets: set[str]) -> int:
        """Load block `index`; return its number of sequential groups."""
        self._index = index
        return len(self.calibrator.begin_block(index, _no_quantize, targets))

    def collect(self, g: int) -> tuple[list[str], list[BatchPartials]] | ExpertsFound | None:
        """Run this worker's batches to group `g`'s input: the group's target Linears and each batch's
        partial sums (numbered by global batch), what its batches routed to a block's experts, or None
        when nothing in the group is a target."""
        collector = self.calibrator.collect(g)
        if collector is None:
            return None
        if isinstance(collector, ExpertsGroup):
            self._group, self._rows = collector, routed_rows(collector.inputs, len(collector.experts))  # once per group
            return experts_found(collector, self._rows)
        if not isinstance(collector, LinearGroup) or collector.hessian is None:
            raise LlmquantError(f"group {g}: {type(collector).__name__} is not calibrated over workers")
        self._group = collector
        parts = [dataclasses.replace(p, batch=self.first_batch + p.batch) for p in collector.hessian.partials]
        return [name for name, _ in collector.linears], parts

    def expert_partials(self, experts: list[int], stage: str, mode: str) -> dict[int, list[BatchPartials]]:
        """Per expert, each of this worker's batches' partial sums for the current experts group (`expert_partials`)."""
        assert isinstance(self._group, ExpertsGroup)
        return expert_partials(self._group, self._rows, self.first_batch, experts, stage, mode)

    def solve(self, items: list[tuple[str, CalibrationStats | None]]) -> list[tuple[str, list[tuple[str, Tensor]], list[Any], Tensor]]:
        """Quantize the Linears named in `items` (model names) with their statistics: each one's output tensors,
        record and dequantized weight."""
        job = self.job
        solved = []
        threads = torch.get_num_threads()
        torch.set_num_threads(self.solve_threads or threads)
        try:
            for name, stats in items:
                tensors: list[tuple[str, Tensor]] = []
                records: list[Any] = []
                result = job.quantize_into(job.plan.keys.disk(name), stats if job.entry.cls.needs_calibration else None,
                                           tensors, records)
                # in the calibration dtype that every worker runs the block in: half of float32's bytes to move
                solved.append((name, tensors, records, result.dequantize().to(self.calibrator.dtype)))
        finally:
            torch.set_num_threads(threads)
        return solved

    def apply(self, weights: dict[str, Tensor], last: bool = True) -> None:
        """Continue with dequantized weights of the current group (`last`: the group is done)."""
        group = self._group
        assert group is not None
        with torch.no_grad():
            if isinstance(group, LinearGroup):
                for name, linear in group.linears:
                    linear.weight.data = weights[name].to(group.device, group.dtype)
            else:
                for name, weight in weights.items():
                    e, projection = name[len(group.path) + 1:].split(".")
                    linear = getattr(group.experts[int(e)], projection)
                    linear.weight.data = weight.to(linear.weight.device, linear.weight.dtype)
        if last:
            if isinstance(group, ExpertsGroup):
                group.inputs.clear()
                self._rows = []
            self._group = None

    def end_block(self) -> None:
        """Compute this worker's batches' outputs as the next block's inputs, and save them."""
        self.calibrator.end_block()
        self.save_inputs()

    def close(self) -> None:
        shutil.rmtree(self._spill, ignore_errors=True)


def _no_quantize(name: str, stats: CalibrationStats | None) -> Tensor:
    raise AssertionError(f"{name}: a distributed worker's groups are quantized through `solve`")


def inputs_folder(state: Path, block: int) -> Path:
    """Where the workers keep block `block`'s inputs, one file per calibration batch."""
    return Path(state) / f"inputs-{block:05d}"


class CalibrationPool:
    """The driver's side of the workers: drives each block through them (`calibrated_block`) and replaces a worker
    lost on the way.

    `start(spec)` starts a worker and `get` resolves their results (`Executor`); `lost` are the exceptions that
    mean a worker's process or node is gone. A block that loses a worker is redone from the files of its
    inputs (`CalibrationWorker.save_inputs`) by every worker, the replacement included; `retry` (the caller's)
    forgets what the failed attempt quantized."""

    def __init__(self, specs: list[WorkerSpec], start: Callable[[WorkerSpec], Any], get: Callable[[list[Any]], list[Any]],
                 lost: tuple[type[BaseException], ...], first_block: int = 0, attempts: int = 3) -> None:
        self.specs, self.start, self.get, self.lost, self.attempts = specs, start, get, lost, attempts
        self.workers = [start(spec) for spec in specs]
        self.replaced = 0
        self.traffic: list[Traffic] = []  # per block run, for the benchmarks
        if first_block:
            self.restore(first_block)
        else:  # block 0's inputs, for a block 0 that loses a worker
            self.get([w.save_inputs() for w in self.workers])

    def run_block(self, index: int, targets: set[str], keep: Keep, cost: Callable[[str], float], fallbacks: dict[str, int],
                  retry: Callable[[], None]) -> None:
        calibration = self.specs[0].job.config.calibration
        policy = ExpertPolicy(calibration.moe_calibration, calibration.moe_min_tokens, parse_size(calibration.moe_memory))
        for attempt in range(self.attempts + 1):
            try:
                traffic = Traffic()
                calibrated_block(self.workers, self.get, index, targets, keep, cost, fallbacks, policy, traffic)
                self.traffic.append(traffic)
                log.info("block %d over %d workers: %.1f MB of tensors to the driver, %.1f MB from it", index,
                         len(self.workers), traffic.to_driver / 1e6, traffic.from_driver / 1e6)
                return
            except self.lost as exc:
                if attempt == self.attempts:
                    raise LlmquantError(f"block {index}: calibration workers were lost {attempt + 1} times in a row "
                                        f"({_one_line(exc)}); check the cluster's nodes, then rerun with --resume") from exc
                log.warning("block %d: a calibration worker was lost (%s); replacing it and redoing the block from its "
                            "saved inputs", index, _one_line(exc))
                retry()
                self._replace_lost()
                self.restore(index)

    def restore(self, block: int) -> None:
        """Every worker takes block `block`'s inputs from the saved files."""
        folder = inputs_folder(self.specs[0].state, block)
        batches = sum(len(spec.samples) for spec in self.specs)  # windows; a file per batch of them
        size = self.specs[0].job.config.calibration.calib_batch_size
        missing = [b for b in range((batches + size - 1) // size) if not (folder / f"{b:05d}.pt").exists()]
        if missing:
            raise LlmquantError(f"cannot resume from {folder.parent.parent}: the calibration inputs of block {block} are "
                                f"missing for batches {missing[:5]}; resume with the --executor the run started with, or "
                                f"rerun without --resume")
        self.get([w.restore(block) for w in self.workers])

    def drop(self, block: int) -> None:
        """Forget block `block`'s inputs once the block is stored."""
        shutil.rmtree(inputs_folder(self.specs[0].state, block), ignore_errors=True)

    def _replace_lost(self) -> None:
        for i, worker in enumerate(self.workers):
            try:
                self.get([worker.ping()])
            except self.lost:
                self.workers[i] = self.start(self.specs[i])
                self.replaced += 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def by_cost(names: list[str], cost: Callable[[str], float], workers: int) -> list[list[str]]:
    """Spread `names` over `workers` by cost, largest first, each to the least loaded worker so far (the first of
    equals): the same split for the same names."""
    loads: list[float] = [0.0] * workers
    split: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(names, key=lambda n: (-cost(n), names.index(n))):
        w = loads.index(min(loads))
        split[w].append(name)
        loads[w] += cost(name)
    return split


Keep = Callable[[str, list[tuple[str, Tensor]], list[Any]], None]


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (lists, tuples, dicts and dataclasses of them): what a call moves."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


@dataclass
class Traffic:
    """Tensor bytes moved for one block: to the driver (partial sums, solved Linears) and from it (statistics to the
    solving workers, dequantized weights to every worker)."""

    to_driver: int = 0
    from_driver: int = 0


def calibrated_block(workers: list[Any], get: Any, index: int, targets: set[str], keep: Keep, cost: Callable[[str], float],
                     fallbacks: dict[str, int], policy: ExpertPolicy, traffic: Traffic | None = None) -> None:
    """Drive one block through every worker's phases. `get` resolves the workers' results (Ray's ``ray.get``, or the
    identity for in-process workers). Per group, the driver adds the batches' partial sums in batch order, the
    workers quantize the group's Linears (spread by `cost`, `by_cost`), and `keep(name, tensors, records)` takes
    each one's output in the group's order. A group of routed experts goes through `calibrate_experts_over`, which
    fills `fallbacks`."""
    counts = get([w.begin_block(index, targets) for w in workers])
    if len(set(counts)) != 1:
        raise LlmquantError(f"block {index}: the workers found different sequential groups ({counts})")

    moved = traffic or Traffic()

    def got(handles: list[Any]) -> list[Any]:
        replies = get(handles)
        moved.to_driver += tensor_bytes(replies)
        return list(replies)

    def solve(items: list[tuple[str, CalibrationStats | None]], last: bool = False) -> None:
        split = by_cost([name for name, _ in items], cost, len(workers))
        stats = dict(items)
        calls = [(w, [(n, stats[n]) for n in mine]) for w, mine in enumerate(split) if mine]
        moved.from_driver += sum(tensor_bytes(list({id(s): s for _, s in call}.values())) for _, call in calls)  # one copy each
        replies = got([workers[w].solve(call) for w, call in calls])
        solved = {name: rest for reply in replies for name, *rest in reply}
        for name, _ in items:
            keep(name, solved[name][0], solved[name][1])
        weights = {name: solved[name][2] for name, _ in items}
        moved.from_driver += tensor_bytes(weights) * len(workers)
        get([w.apply(weights, last) for w in workers])

    for g in range(counts[0]):
        handles = [w.collect(g) for w in workers]
        first = got(handles[:1])[0]
        if first is None or isinstance(first, ExpertsFound):
            found = [first] + got(handles[1:])
            if first is not None:
                calibrate_experts_over(workers, got, found, targets, solve, policy, fallbacks)
                get([w.apply({}, True) for w in workers])
            continue
        names, parts = first
        total = reduce_partials(parts[0].xtx.shape[0], parts)
        for handle in handles[1:]:  # one worker's partials at a time: workers hold contiguous runs of batches, in order
            total = reduce_partials(total.in_features, got([handle])[0][1], into=total)
        del parts, first
        stats = total.stats()  # scales in place: once
        solve([(name, stats) for name in names], last=True)
    get([w.end_block() for w in workers])
