"""The layer-by-layer loop: read one decoder block's tensors, quantize its Linears, write, free.

Peak memory is one block's tensors plus one quantized result, whatever the model's depth:
tensors are read one at a time from the shards (`Checkpoint`) and streamed into the output
shards (`ShardWriter`), and the model itself exists only as a meta-device skeleton. Algorithms
that need calibration run through `SequentialCalibrator`, which adds the calibration
activations (see its module for the peak-memory formula).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmquant.algorithm import CalibrationStats, QuantResult
from llmquant.config import QuantizeConfig
from llmquant.errors import LlmquantError, PluginError
from llmquant.formats import ModuleRecord, OutputFormat, output_dtype, record_for
from llmquant.host.arch import BlockLayout, find_blocks
from llmquant.host.calibrate import SequentialCalibrator
from llmquant.host.expert_calibration import ExpertPolicy
from llmquant.host.moe import KeyMap, OutputNames, defused_skeleton, weight_shapes
from llmquant.host.calibration_data import CalibrationConfig, load_calibration
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.distributed import CalibrationPool, WorkerSpec, split_batches
from llmquant.host.executor import Executor, make_executor
from llmquant.host.output import OutputFolder
from llmquant.host.precast import OutsideCast
from llmquant.host.transforms import EditedCheckpoint, Transforms, fake_quantizer, transform_steps
from llmquant.host.resume import PartialRun, disk_full_error, fingerprint_run
from llmquant.host.source import imported_float_dtype, origin_of
from llmquant.host.workers import return_freed_memory
from llmquant.io.shards import ShardWriter, header_bound, parse_size
from llmquant.plugins import AlgorithmEntry, Plugins
from llmquant.uniform import check_groups

__all__ = ["QuantizeReport", "quantize_checkpoint", "warn_float_share"]

log = logging.getLogger(__name__)

FLOAT_SHARE_WARNING = 0.05  # a run leaving more of the blocks' weights in float than this warns


@dataclass(frozen=True)
class QuantizeReport:
    """What a run did, for the CLI's closing summary."""

    output: Path
    source: Path
    format: str
    modules: list[ModuleRecord]
    input_bytes: int
    output_bytes: int
    seconds: float

    @property
    def quantized(self) -> int:
        return sum(r.bits is not None for r in self.modules)

    def kept(self) -> dict[str, int]:
        """Weight matrices kept in float, counted by reason (``ignore`` for the user's own rules)."""
        reasons: dict[str, int] = {}
        for r in self.modules:
            if r.bits is None:
                reason = str(r.extra.get("kept", "ignore")).split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        return reasons

    def unasked_float_share(self) -> float:
        """Share of the blocks' weight elements left in float by anything but the user's own rules."""
        total = sum(r.shape[0] * r.shape[1] for r in self.modules)
        kept = sum(r.shape[0] * r.shape[1] for r in self.modules if r.bits is None and "kept" in r.extra)
        return kept / max(total, 1)


@dataclass(frozen=True)
class _Plan:
    """Per Linear (its name on disk), the algorithm config to quantize it with, or None to keep it in
    float; the block weight matrices that stay in float by a default rule or because no algorithm
    applies to them, with the reason; and the checkpoint <-> skeleton names."""

    layout: BlockLayout
    configs: dict[str, Any]
    kept: dict[str, tuple[tuple[int, int], str]]
    keys: KeyMap
    experts: tuple[str, ...] = ()  # the routed-experts modules (names on disk)
    output_names: OutputNames = OutputNames()  # name on disk -> name written


class _Job:
    """One run's moving parts: where tensors come from, what quantizes them, and the current
    block's output tensors and records."""

    def __init__(self, checkpoint: Checkpoint | EditedCheckpoint, plan: _Plan, entry: AlgorithmEntry, fmt: OutputFormat, config: QuantizeConfig,
                 dtype: torch.dtype) -> None:
        self.checkpoint, self.plan, self.entry, self.fmt, self.config = checkpoint, plan, entry, fmt, config
        self.algorithm = entry.cls()
        self.cast = None if config.dtype == "auto" else getattr(torch, config.dtype)
        self.dtype = dtype
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.records: list[ModuleRecord] = []

    def read(self, key: str) -> torch.Tensor:
        """Read a tensor to copy unquantized, cast to the output dtype."""
        tensor = self.checkpoint[key]
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(self.cast if self.cast is not None else self.checkpoint.infos[key].dtype)  # a transform's float32

    def note_fallbacks(self, fallbacks: dict[str, int]) -> None:
        """Record the expert projections quantized without calibration (too few routed tokens)."""
        self.records = [dataclasses.replace(r, extra={**r.extra, "calibration": f"fallback: {fallbacks[r.name]} routed tokens"})
                        if r.name in fallbacks else r for r in self.records]

    def quantize(self, module: str, stats: CalibrationStats | None) -> QuantResult:
        """Quantize one Linear from the source checkpoint and keep its output tensors."""
        return self.quantize_into(module, stats, self.tensors, self.records)

    def quantize_into(self, module: str, stats: CalibrationStats | None, tensors: list[tuple[str, torch.Tensor]],
                      records: list[ModuleRecord], buffer: torch.Tensor | None = None) -> QuantResult:
        """Quantize one Linear from the source checkpoint, adding its output tensors and record to the lists given;
        the weight is read into `buffer` when one is given (uint8, see `Checkpoint.read_into`)."""
        key, checkpoint = f"{module}.weight", self.checkpoint
        W = (checkpoint.read_into(key, buffer) if buffer is not None and isinstance(checkpoint, Checkpoint) else checkpoint[key])
        W = W.to(self.config.device)
        result: QuantResult = _run_algorithm(self.algorithm, self.entry, module, W, self.plan.configs[module], stats)
        for name, t in self.fmt.tensors(result, self.dtype).items():
            if buffer is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                t = t.clone()  # a result that hands the weight back must not change with the next read
            tensors.append((f"{module}.{name}", t))
        records.append(record_for(module, _shape2(tuple(W.shape)), result))
        return result

    def block_records(self, block: str) -> list[ModuleRecord]:
        """The records of block `block`'s (a name prefix) weight matrices left in float."""
        plan = self.plan
        records = [ModuleRecord(n, _shape2(self.checkpoint.infos[f"{n}.weight"].shape))
                   for n, c in plan.configs.items() if c is None and n.startswith(block) and n not in plan.kept]
        records.extend(ModuleRecord(n, shape, extra={"kept": reason}) for n, (shape, reason) in plan.kept.items()
                       if n.startswith(block))
        return records


def quantize_checkpoint(
    source: Path, output: Path, config: QuantizeConfig, algo_config: Any, plugins: Plugins,
    *, overwrite: bool = False, resume: bool = False,
) -> QuantizeReport:
    """Quantize the checkpoint folder `source` into `output`, block by block.

    Every check that can fail on bad input runs before the first tensor is used (a run without
    calibration starts casting its embeddings on a background thread, dropped if a check fails);
    the output appears at `output` only once complete. Each finished block is kept in the
    temporary folder, so `resume` continues an interrupted run from the last finished block.
    """
    precast = _cast_outside_ahead(source, output, config, plugins)
    try:
        return _quantize_checkpoint(source, output, config, algo_config, plugins, overwrite=overwrite, resume=resume,
                                    precast=precast)
    finally:
        if precast is not None:
            precast.close()


def _cast_outside_ahead(source: Path, output: Path, config: QuantizeConfig, plugins: Plugins) -> OutsideCast | None:
    """Start casting the embeddings and head while the model is set up (`llmquant.host.precast`), for a
    run without calibration or transforms whose output dtype differs from the checkpoint's."""
    dtype = imported_float_dtype(source) if config.dtype == "auto" and source.is_dir() else config.dtype
    if dtype in (None, "auto") or config.transforms or not output.parent.is_dir():
        return None
    try:
        if plugins.algorithm(config.algo).cls.needs_calibration:
            return None
        checkpoint = Checkpoint(source)
    except LlmquantError:  # the run itself reports it, in its own order
        return None
    return OutsideCast(checkpoint, getattr(torch, str(dtype)), output.parent / f".{output.name}.llmquant-outside")


def _quantize_checkpoint(
    source: Path, output: Path, config: QuantizeConfig, algo_config: Any, plugins: Plugins,
    *, overwrite: bool, resume: bool, precast: OutsideCast | None,
) -> QuantizeReport:
    from transformers import AutoConfig

    start = time.perf_counter()
    entry = plugins.algorithm(config.algo)
    fmt_entry = plugins.format_for(config.format, entry.cls.result_type, config.algo)
    options_type = getattr(fmt_entry.cls, "options_type", None)
    fmt = fmt_entry.cls(options_type(**config.format_options)) if options_type else fmt_entry.cls()  # type: ignore[call-arg]
    config = dataclasses.replace(config, format=fmt.name)
    if config.dtype == "auto" and (imported := imported_float_dtype(source)) is not None:
        config = dataclasses.replace(config, dtype=imported)  # a GGUF import's float32 is not a dtype to ship
    calibration = config.calibration
    config = dataclasses.replace(config, device=resolve_device(config.device))
    if entry.cls.needs_calibration and calibration.calib is None:
        raise LlmquantError(
            f"algorithm {config.algo!r} needs calibration data: pass --calib SOURCE (a .txt/.json/.jsonl/.parquet file, "
            f"a folder of them, or a datasets name), e.g. --calib wiki.txt --calib-samples 128 --calib-seqlen 512"
        )
    source_checkpoint = Checkpoint(source)
    checkpoint: Checkpoint | EditedCheckpoint = source_checkpoint
    if (check_model := getattr(fmt, "check_model", None)) is not None:
        check_model(source)
    model_config = AutoConfig.from_pretrained(source)
    dtype = output_dtype(json.loads((source / "config.json").read_text()), config.dtype)
    skeleton, keys, moe = defused_skeleton(model_config, checkpoint.infos, weight_shapes(checkpoint.infos))
    layout = find_blocks(skeleton)
    plan = _plan(layout, source_checkpoint, config, algo_config, fmt, keys, {keys.disk(g): plain for g, plain in _moe_gates(skeleton, moe, layout).items()},
                 skeleton, moe)
    steps = transform_steps(config.transforms, config.transform_options, plugins, moe=bool(plan.experts),
                            calibrated=config.calibration.calib is not None)
    samples = None
    if entry.cls.needs_calibration or (steps and calibration.calib is not None):
        samples = _calibration_samples(source, calibration)
    elif steps:  # data-free transforms: random tokens are all the structure and equivalence checks need
        vocab = int(getattr(model_config.get_text_config(), "vocab_size", 256))
        samples = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(calibration.seed))
    fingerprint = fingerprint_run(source_checkpoint, config.to_dict(), samples, f"{entry.plugin.distribution} {entry.plugin.version}")
    transforms = None
    if steps:
        transforms = Transforms(steps, fake_quantizer(entry.cls(), plan.configs, keys), keys)
        checkpoint = transforms.prepare(skeleton, source_checkpoint, str(model_config.model_type), _hidden_size(model_config))
    folder = OutputFolder(output, source=source, overwrite=overwrite)
    with folder as tmp, _scratch(tmp.parent / f".{output.name}.activations") as spill:
        try:
            partial = PartialRun(tmp, fingerprint, resume=resume)
            done = partial.done()
            if done:
                log.info("resuming %s: blocks 0-%d are done", tmp, done[-1])
            job = _Job(checkpoint, plan, entry, fmt, config, dtype)
            calibrator: SequentialCalibrator | _DistributedCalibration | None = None
            executor = make_executor(config.executor, address=config.ray_address, workers=config.workers)
            if samples is not None and len(done) < layout.count and executor.name == "ray":
                calibrator = _distributed(job, executor, samples, transforms, plan, entry, partial, len(done))
            elif samples is not None and len(done) < layout.count:
                calibrator = SequentialCalibrator(
                    skeleton, layout, checkpoint, samples, batch_size=calibration.calib_batch_size,
                    dtype=calibration.torch_dtype, device=config.device, memory=parse_size(calibration.calib_memory),
                    spill_dir=spill, mode=calibration.calib_mode, keys=keys, experts=ExpertPolicy(
                        calibration.moe_calibration, calibration.moe_min_tokens, parse_size(calibration.moe_memory)),
                    transforms=transforms, hessians=entry.cls.needs_calibration, float_inputs=_wants_float_inputs(entry, plan))
                calibrator.capture_inputs()
                if done:
                    calibrator.load_inputs(partial.load_activations(done[-1]))
            try:
                if samples is None:  # independent blocks, written straight into the final shards
                    records = _stream_blocks(job, partial, tmp, executor, precast)
                else:
                    _quantize_blocks(job, calibrator, partial, len(done), executor)
            finally:
                executor.close()
            if samples is not None:
                records = _assemble(job, partial, tmp)
        except OSError as exc:
            raise disk_full_error(exc, tmp) from exc
        provenance = {
            **origin_of(source),
            "algorithm": {"name": entry.name, "distribution": entry.plugin.distribution, "version": entry.plugin.version,
                          "calibrated": entry.cls.needs_calibration},
            "format_plugin": {"name": fmt_entry.name, "distribution": fmt_entry.plugin.distribution,
                              "version": fmt_entry.plugin.version},
        }
        # every record, the router's too: vLLM builds routers as Linear layers and must be told to leave them in float
        folder.write_metadata(records, fmt.quantization_config(records, dict(algo_config.__dict__), dtype), config, provenance,
                              {"tie_word_embeddings": False} if transforms is not None and transforms.untied else {})
        finish = getattr(fmt, "finish", None)
        if finish is not None:  # a format whose files are not the shards (GGUF) converts the finished folder
            finish(tmp, records)
        partial.finish()  # only now: a format's finish that fails leaves every block resumable
    report = QuantizeReport(output, source, fmt.name, records, checkpoint.total_bytes, folder.size(), time.perf_counter() - start)
    log.info("quantized %d weight matrices into %s in %.1f s", report.quantized, output, report.seconds)
    warn_float_share(report)
    return report


def warn_float_share(report: QuantizeReport) -> None:
    """Warn when more than `FLOAT_SHARE_WARNING` of the blocks' weights stayed in float unasked."""
    share = report.unasked_float_share()
    if share > FLOAT_SHARE_WARNING:
        log.warning("%.0f%% OF THE BLOCKS' WEIGHTS STAYED IN FLOAT although no rule of yours asked for it (%s): the output "
                    "is barely smaller or faster than the original; see `llmquant inspect %s`", 100 * share,
                    ", ".join(f"{n} {r}" for r, n in report.kept().items()), report.output)


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """A folder for spilled activations, emptied on entry (a killed run leaves its own) and removed on exit."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def resolve_device(name: str) -> str:
    """Return the torch device for a --device value; "auto" is CUDA when present, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LlmquantError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmquantError(f"--device {name}: CUDA is not available here; use --device cpu")
    return name


class _DistributedCalibration:
    """The driver's side of calibration spread over workers (`llmquant.host.distributed`): the
    same calls as `SequentialCalibrator` where `_quantize_blocks` uses it."""

    def __init__(self, job: _Job, pool: CalibrationPool) -> None:
        self.job, self.pool = job, pool
        self.fallbacks: dict[str, int] = {}

    def run_block(self, index: int, quantize: Any, targets: set[str]) -> None:
        """Run block `index` on the workers, which quantize its Linears themselves (`quantize` is the local path's)."""
        job = self.job

        def keep(name: str, tensors: list[tuple[str, torch.Tensor]], records: list[ModuleRecord]) -> None:
            job.tensors.extend(tensors)
            job.records.extend(records)

        def cost(name: str) -> float:  # a GPTQ solve: a pass over the columns, each updating the rest of the rows
            out, inputs = job.checkpoint.infos[f"{job.plan.keys.disk(name)}.weight"].shape[:2]
            return float(out) * inputs * inputs

        def forget() -> None:  # a block redone after a lost worker quantizes its Linears again
            job.tensors, job.records = [], []
            self.fallbacks.clear()

        self.pool.run_block(index, targets, keep, cost, self.fallbacks, forget)


def _distributed(job: _Job, executor: Executor, samples: torch.Tensor, transforms: Transforms | None, plan: _Plan,
                 entry: AlgorithmEntry, partial: PartialRun, first_block: int) -> _DistributedCalibration:
    """Start the calibration workers of a run on `executor`, each with a contiguous run of batches
    (resuming at `first_block` from the inputs they saved)."""
    where = f"--executor {executor.name}"
    if transforms is not None:
        raise LlmquantError(f"{where} does not run block transforms yet: use --executor local with --transform")
    batch = job.config.calibration.calib_batch_size
    batches = (len(samples) + batch - 1) // batch
    specs = [WorkerSpec(job, samples[r.start * batch:r.stop * batch], r.start, partial.batches, entry.cls.needs_calibration,
                        _wants_float_inputs(entry, plan), torch.get_num_threads()) for r in split_batches(batches, executor.workers)]
    return _DistributedCalibration(job, CalibrationPool(specs, executor.start_worker, executor.get, executor.lost, first_block))


def _wants_float_inputs(entry: AlgorithmEntry, plan: _Plan) -> bool:
    """Whether the algorithm asks, for any module's config, for the float model's inputs too (GPTAQ)."""
    wants = getattr(entry.cls, "wants_float_inputs", None)
    return callable(wants) and any(wants(c) for c in plan.configs.values() if c is not None)


def _hidden_size(model_config: Any) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.hidden_size)


def _calibration_samples(source: Path, calibration: CalibrationConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises several types for a missing tokenizer
        raise LlmquantError(f"{source} has no usable tokenizer for calibration text ({exc}); copy the tokenizer files there") from exc
    return load_calibration(calibration, tokenizer)


def _plan(layout: BlockLayout, checkpoint: Checkpoint, config: QuantizeConfig, algo_config: Any, fmt: OutputFormat,
          keys: KeyMap, gates: dict[str, bool], skeleton: Any, experts: list[str]) -> _Plan:
    """Decide, before any work, what happens to every weight matrix in the blocks (names on disk)."""
    configs: dict[str, Any] = {}
    kept: dict[str, tuple[tuple[int, int], str]] = {}
    for index, names in enumerate(layout.linears):
        for rel in names:
            name = keys.disk(f"{layout.block_name(index)}.{rel}")
            if f"{name}.weight" not in checkpoint.infos:
                raise LlmquantError(f"{checkpoint.folder}: no tensor {name}.weight for Linear {name}; the checkpoint does not match its config.json")
            shape = _shape2(checkpoint.infos[f"{name}.weight"].shape)
            if any(re.search(p, name) for p in config.ignore):
                configs[name] = None
                continue
            if name in gates and (config.keep_moe_gates or not gates[name]):
                configs[name] = None
                kept[name] = (shape, "router gate: kept in float by default (--quantize-moe-gates to quantize it)"
                              if gates[name] else "router gate: a Linear subclass with its own forward, kept in float")
                continue
            override = next((o for o in config.overrides if re.search(o.pattern, name)), None)
            module_config = dataclasses.replace(algo_config, **override.params) if override else algo_config
            module_config = _format_constraints(fmt, name, shape, module_config)
            check_groups(shape, getattr(module_config, "group_size", None), name)
            fmt.check_module(name, shape, module_config)
            configs[name] = module_config
    in_blocks = re.compile(rf"^{re.escape(layout.prefix)}\.(\d+)\.")
    for key, info in checkpoint.infos.items():
        module = key.removesuffix(".weight")
        block = in_blocks.match(key)
        # blocks past the model's (a multi-token-prediction layer) are not the model's: transformers ignores them too
        if block and int(block.group(1)) < layout.count and len(info.shape) >= 2 and module not in configs:
            owner = type(skeleton.get_submodule(keys.model(key).rpartition(".")[0])).__name__
            kept[module] = (_shape2(info.shape), f"not an nn.Linear: {len(info.shape)}-D parameter of {owner}")
    return _Plan(layout, configs, kept, keys, tuple(keys.disk(e) for e in experts),
                 OutputNames.build(config.expert_names, skeleton, keys, experts))


def _format_constraints(fmt: OutputFormat, name: str, shape: tuple[int, int], module_config: Any) -> Any:
    """The module's algorithm config with the settings the format requires of it (GGUF K-quants: a scale grid)."""
    constraints = getattr(fmt, "constraints", None)
    required = constraints(name, shape, module_config) if constraints is not None else {}
    fields = {f.name for f in dataclasses.fields(module_config)}
    missing = sorted(set(required) - fields)
    if missing:
        raise PluginError(f"format {fmt.name!r} needs {', '.join(missing)} for {name}, which this algorithm's config does not "
                          f"have; use an algorithm built on llmquant.uniform.UniformConfig (rtn, gptq, groupwise-int4)")
    return dataclasses.replace(module_config, **required) if required else module_config


def _moe_gates(model: Any, experts: list[str], layout: BlockLayout) -> dict[str, bool]:
    """Return the skeleton names of the router and shared-expert gates, each with whether it is a
    plain ``nn.Linear`` (a subclass has its own forward, which a quantized Linear would not keep):
    Linears anywhere in a sparse-MoE block (the parent of an experts module) outside its experts
    that output one value per expert, or a single value."""
    gates = {}
    for path in experts:
        parent, _, _ = path.rpartition(".")
        count = len(model.get_submodule(path))
        for name, child in model.get_submodule(parent).named_modules():
            full = f"{parent}.{name}"
            if isinstance(child, torch.nn.Linear) and child.out_features in (1, count) and not full.startswith(path + "."):
                gates[full] = type(child) is torch.nn.Linear
    return gates


def _quantize_blocks(job: _Job, calibrator: SequentialCalibrator | _DistributedCalibration | None, partial: PartialRun, start: int,
                     executor: Executor) -> None:
    """Quantize blocks `start`.. with calibration and store each, with the activations after it, in the partial folder."""
    if calibrator is None:  # every block was stored before this resumed run
        return
    plan = job.plan
    keys = _keys_by_block(job)
    order = {name: i for i, name in enumerate(plan.configs)}
    progress = tqdm(range(plan.layout.count), desc=f"{job.config.algo} -> {job.config.format}", unit="block", initial=start)
    for index in range(start, plan.layout.count):
        block = plan.layout.block_name(index) + "."
        targets = {n for n, c in plan.configs.items() if c is not None and n.startswith(block)}
        job.tensors, job.records = [], []
        calibrator.fallbacks.clear()
        calibrated = job.entry.cls.needs_calibration  # else calibration only carries transforms' data
        calibrator.run_block(index, lambda name, stats: job.quantize(plan.keys.disk(name), stats if calibrated else None).dequantize(),
                             {plan.keys.model(t) for t in targets})
        job.note_fallbacks({plan.keys.disk(n): tokens for n, tokens in calibrator.fallbacks.items()})
        if any(e.startswith(block) for e in plan.experts):  # dense blocks keep calibration's order, as before
            # the plan's (module) order, not calibration's, which depends on how experts were chunked
            job.tensors.sort(key=lambda item: order[item[0].rpartition(".")[0]])
            job.records.sort(key=lambda record: order[record.name])
        for key in keys.get(index, []):
            module, _, leaf = key.rpartition(".")
            if module not in targets or leaf != "weight":
                job.tensors.append((key, job.read(key)))
        job.records.extend(job.block_records(block))
        fault_point(f"block-{index}-before-save")
        rename = plan.output_names
        partial.write_block(index, [(rename(k), t) for k, t in job.tensors],
                            [dataclasses.replace(r, name=rename(r.name)) for r in job.records])
        if isinstance(calibrator, _DistributedCalibration):
            calibrator.pool.drop(index)  # its workers saved the next block's inputs
        else:
            partial.save_activations(index, calibrator.input_tensors())
        fault_point(f"block-{index}")
        if isinstance(job.checkpoint, EditedCheckpoint):
            job.checkpoint.drop_block(block)
        job.tensors, job.records = [], []
        return_freed_memory(collect=calibrator is not None)
        progress.update(1)
    progress.close()
    job.tensors, job.records = [], []


def uncalibrated_block(job: _Job, item: tuple[int, list[str]]) -> tuple[list[tuple[str, torch.Tensor]], list[ModuleRecord]]:
    """Quantize one block without calibration: item is (block index, its checkpoint keys); returns the
    block's output tensors and records, under the names they are written. Safe to run on several
    threads at once, and on a Ray worker (the job travels pickled)."""
    index, keys = item
    plan = job.plan
    block = plan.layout.block_name(index) + "."
    tensors: list[tuple[str, torch.Tensor]] = []
    records: list[ModuleRecord] = []
    quantized = {key for key in keys if plan.configs.get(key.rpartition(".")[0]) is not None and key.endswith(".weight")}
    # one read buffer for the block's weights: fresh memory per weight cost more than reading it
    buffer = torch.empty(max((job.checkpoint.infos[key].nbytes for key in quantized), default=0), dtype=torch.uint8)
    for key in keys:
        module, _, leaf = key.rpartition(".")
        if key not in quantized:
            tensors.append((key, job.read(key)))
        else:
            job.quantize_into(module, None, tensors, records, buffer)
    records.extend(job.block_records(block))
    rename = plan.output_names
    return [(rename(k), t) for k, t in tensors], [dataclasses.replace(r, name=rename(r.name)) for r in records]


def _keys_by_block(job: _Job) -> dict[int, list[str]]:
    """Checkpoint keys by block index; keys outside the blocks under -1."""
    keys: dict[int, list[str]] = {}
    block_re = re.compile(rf"^{re.escape(job.plan.layout.prefix)}\.(\d+)\.")
    for key in job.checkpoint:
        match = block_re.match(key)
        keys.setdefault(int(match.group(1)) if match else -1, []).append(key)
    return keys


def _assemble(job: _Job, partial: PartialRun, folder: Path) -> list[ModuleRecord]:
    """Stream every stored block, then the tensors outside the blocks, into the final shards."""
    blocks = [partial.block_tensors(index) for index in range(job.plan.layout.count)]
    outside = _keys_by_block(job).get(-1, [])
    metadata = {"quantizer": "llmquant"}
    names = [(name, len(reader.infos[name].shape)) for reader, order in blocks for name in order]
    names += [(job.plan.output_names(key), len(job.checkpoint.infos[key].shape)) for key in outside]
    # every name is known now, so each shard's header gets its room up front and no byte is written twice
    writer = ShardWriter(folder, parse_size(job.config.max_shard_size), metadata, header_reserve=header_bound(names, metadata))
    records: list[ModuleRecord] = []
    for index, (reader, order) in enumerate(blocks):
        for name in order:  # the stored blocks' bytes, copied file to file
            info = reader.infos[name]
            writer.copy(name, info.dtype, info.shape, info.path, info.start, info.nbytes)
        records.extend(partial.block_records(index))
    fault_point("assemble")
    _write_outside(job, writer, outside)
    writer.close()
    fault_point("shards-written")
    return records


def _stream_blocks(job: _Job, partial: PartialRun, folder: Path, executor: Executor, precast: OutsideCast | None) -> list[ModuleRecord]:
    """Quantize independent blocks (no calibration) on the executor's workers and write each, in order,
    straight into the final shards, then the tensors outside the blocks. The writer's state is saved
    after every block, so `resume` continues after the last block written (later bytes are dropped)."""
    plan = job.plan
    keys = _keys_by_block(job)
    outside = keys.get(-1, [])
    max_size, metadata = parse_size(job.config.max_shard_size), {"quantizer": "llmquant"}
    writer: ShardWriter | None = None
    records: list[ModuleRecord] = []
    start = 0
    if (saved := partial.stream_state()) is not None and saved[2].get("closed"):  # only the format's finish was left
        log.info("resuming %s: every block is in the shards", folder)
        return saved[1]
    if saved is not None:
        try:
            writer = ShardWriter.resume(folder, max_size, metadata, saved[2])
            start, records = saved[0] + 1, saved[1]
            log.info("resuming %s: blocks 0-%d are written", folder, saved[0])
        except FileNotFoundError:  # killed after the shards were closed: start over
            pass
    progress = tqdm(range(plan.layout.count), desc=f"{job.config.algo} -> {job.config.format}", unit="block", initial=start)
    items = [(index, keys.get(index, [])) for index in range(start, plan.layout.count)]
    for (index, _), (tensors, block_records) in zip(items, executor.map_blocks(uncalibrated_block, job, items)):
        fault_point(f"block-{index}-before-save")
        if writer is None:
            writer = ShardWriter(folder, max_size, metadata, header_reserve=_stream_reserve(job, tensors, outside, metadata))
        for name, tensor in tensors:
            writer.add(name, tensor)
        fault_point(f"block-{index}-written")  # bytes in the shards that the saved state does not cover yet
        records.extend(block_records)
        partial.save_stream(index, records, writer.state())
        fault_point(f"block-{index}")
        return_freed_memory(collect=False)
        progress.update(1)
    progress.close()
    if writer is None:
        writer = ShardWriter(folder, max_size, metadata, header_reserve=_stream_reserve(job, [], outside, metadata))
    fault_point("assemble")
    _write_outside(job, writer, outside, precast)
    writer.close()
    partial.save_stream(plan.layout.count - 1, records, {"closed": True})  # a failing format finish loses no block
    fault_point("shards-written")
    return records


def _stream_reserve(job: _Job, first: list[tuple[str, torch.Tensor]], outside: list[str], metadata: dict[str, str]) -> int:
    """Header room for a streamed run's shards, known before most names are: the first block's names
    for every block (with room for longer block numbers), the tensors outside the blocks, and a
    quarter more for blocks that differ. A header that still does not fit is written by copying."""
    digits = len(str(job.plan.layout.count))
    names = [(name + "0" * digits, tensor.dim()) for name, tensor in first] * job.plan.layout.count
    names += [(job.plan.output_names(key), len(job.checkpoint.infos[key].shape)) for key in outside]
    return header_bound(names, metadata) * 5 // 4


def _write_outside(job: _Job, writer: ShardWriter, outside: list[str], precast: OutsideCast | None = None) -> None:
    """Write the tensors outside the blocks (embeddings, final norm, head): copied file to file where
    they keep their dtype or were cast ahead, cast a chunk at a time where they change it."""
    raw = type(job.checkpoint) is Checkpoint  # not a transformed model's edited tensors
    cast_ahead = precast.take() if precast is not None and raw and job.cast == precast.target else {}
    for key in outside:
        info = job.checkpoint.infos[key]
        if key in cast_ahead and job.cast is not None and precast is not None:
            offset, nbytes = cast_ahead[key]
            writer.copy(job.plan.output_names(key), job.cast, info.shape, precast.path, offset, nbytes)
        elif raw and (job.cast is None or job.cast == info.dtype or not info.dtype.is_floating_point):
            writer.copy(job.plan.output_names(key), info.dtype, info.shape, info.path, info.start, info.nbytes)
        elif raw and job.cast is not None:  # a float32 embedding is not read whole to be halved
            writer.cast_copy(job.plan.output_names(key), info.dtype, job.cast, info.shape, info.path, info.start, info.nbytes)
        else:
            writer.add(job.plan.output_names(key), job.read(key))


def fault_point(name: str) -> None:
    """Kill this process here when ``LLMQUANT_KILL_AT`` names this point: how the tests stop a
    run at exact moments (after block k, half way through assembling) to prove nothing is lost."""
    if os.environ.get("LLMQUANT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _shape2(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(shape[0]), int(shape[1])


def _run_algorithm(algorithm: Any, entry: AlgorithmEntry, module: str, W: torch.Tensor, module_config: Any,
                   stats: CalibrationStats | None) -> Any:
    try:
        return algorithm.quantize_weight(W, module_config, stats)
    except LlmquantError as exc:
        if module in str(exc):
            raise
        raise LlmquantError(f"{module}: {exc}") from exc
    except Exception as exc:
        raise PluginError(
            f"algorithm {entry.name!r} from plugin {entry.plugin.name!r} ({entry.plugin.distribution}) "
            f"failed on {module} {tuple(W.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
