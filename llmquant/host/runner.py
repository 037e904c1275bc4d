"""The layer-by-layer loop: read one decoder block's tensors, quantize its Linears, write, free.

Peak memory is one block's tensors plus one quantized result, whatever the model's depth:
tensors are read one at a time from the shards (`Checkpoint`) and streamed into the output
shards (`ShardWriter`), and the model itself exists only as a meta-device skeleton.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmquant.config import QuantizeConfig
from llmquant.errors import LlmquantError, PluginError
from llmquant.formats import GPTQFormat, ModuleRecord, get_format
from llmquant.host.arch import BlockLayout, build_skeleton, find_blocks
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.output import OutputFolder
from llmquant.io.shards import ShardWriter, parse_size
from llmquant.plugins import AlgorithmEntry, Plugins
from llmquant.uniform import check_groups

__all__ = ["QuantizeReport", "quantize_checkpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeReport:
    """What a run did, for the CLI's closing summary."""

    output: Path
    modules: list[ModuleRecord]
    input_bytes: int
    output_bytes: int
    seconds: float

    @property
    def quantized(self) -> int:
        return sum(r.bits is not None for r in self.modules)


@dataclass(frozen=True)
class _Plan:
    """Per Linear name, the algorithm config to quantize it with, or None to keep it in float."""

    layout: BlockLayout
    configs: dict[str, Any]


def quantize_checkpoint(
    source: Path, output: Path, config: QuantizeConfig, algo_config: Any, plugins: Plugins, *, overwrite: bool = False
) -> QuantizeReport:
    """Quantize the checkpoint folder `source` into `output`, block by block.

    Every check that can fail on bad input runs before the first tensor is read; the output
    appears at `output` only once complete.
    """
    from transformers import AutoConfig

    start = time.perf_counter()
    entry = plugins.algorithm(config.algo)
    fmt = get_format(config.format, entry.cls.result_type, config.algo)
    if entry.cls.needs_calibration:
        raise PluginError(f"algorithm {config.algo!r} needs calibration data, which this version of the host cannot give yet")
    checkpoint = Checkpoint(source)
    layout = find_blocks(build_skeleton(AutoConfig.from_pretrained(source)))
    plan = _plan(layout, checkpoint, config, algo_config, fmt)
    folder = OutputFolder(output, source=source, overwrite=overwrite)
    with folder as tmp:
        writer = ShardWriter(tmp, parse_size(config.max_shard_size), metadata={"quantizer": "llmquant"})
        records = _write_tensors(checkpoint, plan, entry, fmt, config, writer)
        writer.close()
        folder.write_metadata(records, fmt.quantization_config(records, dict(algo_config.__dict__)), config)
    report = QuantizeReport(output, records, checkpoint.total_bytes, folder.size(), time.perf_counter() - start)
    log.info("quantized %d Linears into %s in %.1f s", report.quantized, output, report.seconds)
    return report


def _plan(layout: BlockLayout, checkpoint: Checkpoint, config: QuantizeConfig, algo_config: Any, fmt: GPTQFormat) -> _Plan:
    configs: dict[str, Any] = {}
    for index, names in enumerate(layout.linears):
        for rel in names:
            name = f"{layout.block_name(index)}.{rel}"
            if f"{name}.weight" not in checkpoint.infos:
                raise LlmquantError(f"{checkpoint.folder}: no tensor {name}.weight for Linear {name}; the checkpoint does not match its config.json")
            if any(re.search(p, name) for p in config.ignore):
                configs[name] = None
                continue
            override = next((o for o in config.overrides if re.search(o.pattern, name)), None)
            module_config = dataclasses.replace(algo_config, **override.params) if override else algo_config
            shape = checkpoint.infos[f"{name}.weight"].shape
            out_features, in_features = int(shape[0]), int(shape[1])
            check_groups((out_features, in_features), getattr(module_config, "group_size", None), name)
            fmt.check_shape(name, (out_features, in_features), getattr(module_config, "bits", 4))
            configs[name] = module_config
    return _Plan(layout, configs)


def _write_tensors(
    checkpoint: Checkpoint, plan: _Plan, entry: AlgorithmEntry, fmt: GPTQFormat, config: QuantizeConfig, writer: ShardWriter
) -> list[ModuleRecord]:
    algorithm = entry.cls()
    cast = None if config.dtype == "auto" else getattr(torch, config.dtype)
    by_block: dict[int, list[str]] = {}
    outside: list[str] = []
    block_re = re.compile(rf"^{re.escape(plan.layout.prefix)}\.(\d+)\.")
    for key in checkpoint:
        match = block_re.match(key)
        (by_block.setdefault(int(match.group(1)), []) if match else outside).append(key)

    def copy(key: str) -> None:
        tensor = checkpoint[key]
        writer.add(key, tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor)

    records: list[ModuleRecord] = []
    for index in tqdm(range(plan.layout.count), desc=f"{config.algo} -> {config.format}", unit="block"):
        for key in by_block.get(index, []):
            module, _, leaf = key.rpartition(".")
            module_config = plan.configs.get(module)
            if module_config is None or leaf != "weight":
                copy(key)
                continue
            W = checkpoint[key].to(config.device)
            result = _run_algorithm(algorithm, entry, module, W, module_config)
            writer.add_all(module, fmt.tensors(result))
            records.append(ModuleRecord(module, _shape2(tuple(W.shape)), result.bits, result.group_size, result.symmetric))
            del W, result
        records.extend(ModuleRecord(n, _shape2(checkpoint.infos[f"{n}.weight"].shape)) for n, c in plan.configs.items()
                       if c is None and n.startswith(f"{plan.layout.block_name(index)}."))
    for key in outside:
        copy(key)
    return records


def _shape2(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(shape[0]), int(shape[1])


def _run_algorithm(algorithm: Any, entry: AlgorithmEntry, module: str, W: torch.Tensor, module_config: Any) -> Any:
    try:
        return algorithm.quantize_weight(W, module_config, None)
    except LlmquantError:
        raise
    except Exception as exc:
        raise PluginError(
            f"algorithm {entry.name!r} from plugin {entry.plugin.name!r} ({entry.plugin.distribution}) "
            f"failed on {module} {tuple(W.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
