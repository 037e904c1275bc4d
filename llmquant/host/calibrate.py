"""The sequential calibrated pass: block inputs captured once, then block by block, Hessians
of each Linear's input are accumulated by hooks, the block is quantized group after group
(true-sequential), and its outputs on the quantized weights become the next block's inputs.

A block is calibrated in one of two modes (`SequentialCalibrator.run_block`): *replay* runs the
batches once per sequential group, stopping each at the group's input, then once more for the
outputs; *single-pass* runs each batch once, in a worker thread that parks at every group until
all batches have reached it. Single-pass does half the forward compute; replay keeps one batch's
activations alive instead of all of them.

Peak memory (bytes), with N calibration tokens, hidden size d, activation dtype of b bytes,
and i the widest Linear input::

    P  = B                       process baseline (Python, torch, transformers: ~0.55 GB on CPU)
       + w * b                   the block being calibrated, w parameters, in the activation dtype
       + 2 * N * d * b           block inputs and outputs (spilled to disk past --calib-memory)
       + 16 * N * d * b          single-pass only: every batch's in-flight activations, parked
                                 (IN_FLIGHT_WIDTHS, measured on a Llama block); replay: one batch's
       + 2 * 4 * i**2            one Hessian and GPTQ's working copy of it, float32
       + 4 * 4 * |W|             the float32 weight being quantized and GPTQ's working copies
       + 4 * w                   with --transform: the block in float32 while it is transformed, and
       + 4 * T * (i + d)         awq's scope inputs and outputs over its T (4096) search tokens

The embeddings (vocab * d * b) are loaded only while block inputs are captured, before any block.
The plugin sees only ``W`` and ``H``; hooks, devices and Hessians belong to the host.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmquant.host.activations import ActivationStore
from llmquant.host.arch import BlockLayout
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.groups import ExpertsGroup, Group, LinearGroup, QuantizeModule
from llmquant.host.hessian import HessianAccumulator, accumulate_hessian
from llmquant.host.expert_calibration import ExpertPolicy
from llmquant.host.moe import ExpertLinears, KeyMap
from llmquant.host.transforms import EditedCheckpoint, Transforms
from llmquant.host.workers import Stop, Worker, bound_onednn_cache, release, return_freed_memory, share_malloc_arena

__all__ = ["HessianAccumulator", "SequentialCalibrator", "accumulate_hessian"]

log = logging.getLogger(__name__)


# Hidden-width values per token that a Llama-style block keeps alive while parked at a group
# (residual, normed input, q/k/v and their expanded copies, attention output), measured on SmolLM2.
IN_FLIGHT_WIDTHS = 16


class _Recorder(nn.Module):
    """Stands in for a decoder block while inputs are captured: records the call and passes through."""

    def __init__(self, index: int, sink: Callable[[int, Tensor, dict[str, Any]], None], last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        hidden: Tensor = args[0] if args else kwargs.pop("hidden_states")
        self.sink(self.index, hidden, {**kwargs, **({"__args__": args[1:]} if len(args) > 1 else {})})
        if self.last:
            raise Stop
        return hidden


class SequentialCalibrator:
    """Runs calibration data through the model one block at a time.

    Args:
        model: the meta-device skeleton (its non-block weights are loaded here).
        layout: where the blocks are.
        checkpoint: the source tensors.
        samples: ``(n, seqlen)`` token ids.
        batch_size: windows per forward pass.
        dtype: activation and block compute dtype.
        device: where blocks run.
        memory: activation budget in bytes; past it activations spill to `spill_dir`.
        keys: checkpoint key <-> skeleton key (MoE checkpoints whose names transformers renames).
        experts: how routed experts are calibrated (`ExpertPolicy`).
        transforms: block transforms applied to each block before it is calibrated.
        hessians: accumulate input Hessians (False: the algorithm needs none; calibration only
            carries the transforms' data and the activations from block to block).
        float_inputs: also run the float model alongside (a float copy of each block on its own
            activations) and give each Linear group ``dXXT`` (GPTAQ); forces replay mode.
        partials: keep each batch's ``x x^T`` apart instead of summing (a distributed worker,
            whose driver adds every worker's batches in batch order).
    """

    def __init__(self, model: nn.Module, layout: BlockLayout, checkpoint: Checkpoint | EditedCheckpoint, samples: Tensor, *,
                 batch_size: int, dtype: torch.dtype, device: str, memory: int, spill_dir: Path, mode: str = "auto",
                 keys: KeyMap | None = None, experts: ExpertPolicy | None = None, transforms: Transforms | None = None,
                 hessians: bool = True, float_inputs: bool = False, partials: bool = False) -> None:
        self.model, self.layout, self.checkpoint = model, layout, checkpoint
        self.transforms, self.hessians, self.float_inputs, self.partials = transforms, hessians, float_inputs, partials
        self.keys = keys or KeyMap({}, {})
        self.expert_policy = experts or ExpertPolicy()
        self.fallbacks: dict[str, int] = {}  # expert projections quantized without calibration -> tokens seen
        self.dtype, self.device = dtype, torch.device(device)
        self.batches = list(torch.split(samples, batch_size))
        share = memory // (4 if float_inputs else 2)
        self.inputs = ActivationStore(spill_dir, share, "inputs")
        self.outputs = ActivationStore(spill_dir, share, "outputs")
        # the float model's activations, when float_inputs: the same tokens through unquantized blocks
        self.float_in = ActivationStore(spill_dir, share, "float-inputs")
        self.float_out = ActivationStore(spill_dir, share, "float-outputs")
        self.kwargs: list[list[dict[str, Any]]] = [[] for _ in range(layout.count)]
        self._groups: dict[tuple[str, ...], list[list[str]]] = {}
        self.memory, self.mode = memory, mode
        self.single_pass = mode == "single-pass"
        self._float_block: nn.Module | None = None  # the current block's state, from begin_block to end_block
        self._workers: list[Worker] = []
        self._handles: list[Any] = []
        self._begun = False  # a block is loaded (between begin_block and end_block)
        self._group_list: list[list[str]] = []
        self._collectors: dict[int, Group | None] = {}
        share_malloc_arena()
        bound_onednn_cache()

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def capture_inputs(self) -> None:
        """Run the model up to the first block once per batch, recording every block's call arguments."""
        blocks: nn.ModuleList = self.model.get_submodule(self.layout.prefix)  # type: ignore[assignment]
        originals = list(blocks)
        loaded = self._load_outside_blocks()
        batch = 0

        def sink(index: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
            if index == 0:
                self.inputs.put(batch, hidden.to(self.dtype))
            self.kwargs[index].append(kwargs)

        try:
            for i in range(len(blocks)):
                blocks[i] = _Recorder(i, sink, last=i == len(blocks) - 1)
            with torch.no_grad():
                for batch, ids in enumerate(self.batches):
                    try:
                        self.model(input_ids=ids.to(self.device), use_cache=False)
                    except Stop:
                        pass
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
            for name in loaded:
                release(self.model, name)
        for b in range(len(self.inputs) if self.float_inputs else 0):
            self.float_in.put(b, self.inputs[b])  # the embeddings are not quantized: both models start equal
        if self.float_inputs:
            self.single_pass = False
        elif self.mode == "auto":
            hidden = self.inputs[0].shape[-1]
            needed = self.tokens * hidden * self.dtype.itemsize * (2 + IN_FLIGHT_WIDTHS)
            self.single_pass = needed <= self.memory
            log.info("calibration: %s (activations of the single pass need about %.2f GB; --calib-memory is %.2f GB)",
                     "single pass" if self.single_pass else "replay per group", needed / 1e9, self.memory / 1e9)

    def input_tensors(self) -> list[Tensor]:
        """Return the activations that feed the next block (then the float model's), to keep for a resumed run."""
        return [self.inputs[b] for b in range(len(self.inputs))] + [self.float_in[b] for b in range(len(self.float_in))]

    def load_inputs(self, tensors: list[Tensor]) -> None:
        """Replace the next block's inputs, when resuming after a finished block."""
        self.inputs.clear()
        self.float_in.clear()
        half = len(tensors) // 2 if self.float_inputs else len(tensors)
        for b, tensor in enumerate(tensors[:half]):
            self.inputs.put(b, tensor)
        for b, tensor in enumerate(tensors[half:]):
            self.float_in.put(b, tensor)

    def _load_outside_blocks(self) -> list[str]:
        """Load the weights that run before the first block (embeddings), in the activation dtype."""
        output = self.model.get_output_embeddings()  # type: ignore[operator]
        inputs = self.model.get_input_embeddings()  # type: ignore[operator]
        skip = {id(p) for p in output.parameters()} if output is not None else set()
        skip -= {id(p) for p in inputs.parameters()}  # tied: lm_head is the input embedding
        prefix = self.layout.prefix + "."
        state = {}
        for name, param in self.model.named_parameters():
            disk = self.keys.disk(name)
            if id(param) in skip or name.startswith(prefix) or disk not in self.checkpoint:
                continue
            state[name] = self.checkpoint[disk].to(self.device, self.dtype)
        self.model.load_state_dict(state, strict=False, assign=True)
        return list(state)

    def run_block(self, index: int, quantize: QuantizeModule, targets: set[str]) -> None:
        """Calibrate and quantize block `index`, then compute its outputs as the next block's inputs.

        The phases below in order (`begin_block`, then `collect` and ``finish`` per group,
        then `end_block`); a distributed executor drives the same phases on each worker's
        batches and replaces ``finish`` by a reduction of the workers' partial sums.

        Args:
            quantize: called once per Linear in `targets` (full skeleton names) with its input
                statistics, in true-sequential order; returns the dequantized weight to continue with.
        """
        groups = self.begin_block(index, quantize, targets)
        for g in range(len(groups)):
            collector = self.collect(g)
            if collector is not None:
                collector.finish()
        self.end_block()

    def begin_block(self, index: int, quantize: QuantizeModule, targets: set[str]) -> list[list[str]]:
        """Load block `index` (transformed, when transforms are set) and return its sequential groups.

        A block with nothing to measure (no Hessians and no experts) is quantized here, and has no groups.
        """
        block = self._materialize(index)
        if self.transforms is not None:
            self.transforms.apply(self, index, block)
        self._float_block = copy.deepcopy(block) if self.float_inputs else None
        name = self.layout.block_name(index)
        experts = {f"{name}.{rel}": m for rel, m in block.named_modules() if isinstance(m, ExpertLinears)}
        linears: dict[str, nn.Module] = {f"{name}.{rel}": m for rel, m in block.named_modules() if isinstance(m, nn.Linear)
                                         and not any(f"{name}.{rel}".startswith(e + ".") for e in experts)}
        linears.update(experts)  # an experts module is one group, calibrated by `calibrate_experts`
        self._index, self._block, self._modules, self._begun = index, block, linears, True
        self._quantize, self._targets = quantize, targets
        if not self.hessians and not experts:  # nothing to measure: quantize now, then carry the activations on
            with torch.no_grad():
                for module, linear in linears.items():
                    if module in targets:
                        linear.weight.data = quantize(module, None).to(self.device, self.dtype)
            self._group_list = []
            return []
        self._group_list = self._sequential_groups(index, block, linears, set(experts))
        if self.single_pass:
            self._start_workers()
        return self._group_list

    def collect(self, g: int) -> Group | None:
        """Run every batch to group `g`'s input and return what gathered it (None: nothing in it is a target).

        The caller then finishes the group (``finish()``, or sets the quantized weights itself)
        before collecting the next one.
        """
        collector = self._collector(self._group_list[g], self._modules, self._quantize, self._targets)
        if self.single_pass:
            self._collectors[g] = collector
            for worker in self._workers:
                worker.step()
            self._collectors.pop(g)
        elif collector is not None:
            self._replay_to(g, collector)
        return collector

    def end_block(self) -> None:
        """Compute the block's outputs as the next block's inputs, and free the block."""
        try:
            if self.single_pass and self._group_list:
                for b, worker in enumerate(self._workers):
                    worker.step()
                    assert worker.result is not None
                    self.outputs.put(b, worker.result)
            else:
                with torch.no_grad():
                    for b in range(len(self.batches)):
                        self.outputs.put(b, self._forward(self._index, self._block, b))
                        if self._float_block is not None:
                            self.float_out.put(b, self._forward(self._index, self._float_block, b, self.float_in))
        finally:
            self._stop_workers()
        self._free_block()
        self.inputs, self.outputs = self.outputs, self.inputs
        self.float_in, self.float_out = self.float_out, self.float_in
        return_freed_memory()

    def abort_block(self) -> None:
        """Drop the block begun by `begin_block`, keeping its inputs: the block can begin again."""
        self._stop_workers()
        if self._begun:
            self._free_block()

    def _free_block(self) -> None:
        for param_name, _ in list(self._block.named_parameters()):
            release(self._block, param_name)
        self._float_block, self._begun = None, False

    def _collector(self, group: list[str], modules: dict[str, nn.Module], quantize: QuantizeModule,
                   targets: set[str]) -> Group | None:
        """Return what gathers a group's inputs and quantizes it, or None when nothing in it is a target."""
        wanted = [n for n in group if n in targets or any(t.startswith(n + ".") for t in targets)]
        if not wanted:
            return None
        first = modules[group[0]]
        if isinstance(first, ExpertLinears):
            return ExpertsGroup(group[0], first, quantize, targets, self.expert_policy, self.fallbacks)
        assert isinstance(first, nn.Linear)
        hessian = HessianAccumulator(first.in_features, self.device, self.float_inputs, self.partials) if self.hessians else None
        return LinearGroup(hessian, [(n, modules[n]) for n in wanted], quantize,
                            self.device, self.dtype)

    def _replay_to(self, g: int, collector: Group) -> None:
        """Replay: one pass over the batches stopped at group `g`'s input (one batch's activations
        alive; the outputs take one more pass in `end_block`). With the float block (GPTAQ), each
        batch also runs the float block to the same group, on the float model's activations, and
        the group gets both inputs."""
        group, modules, float_block = self._group_list[g], self._modules, self._float_block
        prefix = len(self.layout.block_name(self._index)) + 1
        seen: list[Tensor] = []

        def stop_at_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            collector.add(args, kwargs)
            seen[:] = [args[0] if args else kwargs["input"]]
            raise Stop  # the rest of the block is not needed for this group

        def float_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if isinstance(collector, LinearGroup):
                collector.add_float(seen[0], args[0] if args else kwargs["input"])
            raise Stop

        handles = [modules[group[0]].register_forward_pre_hook(stop_at_input, with_kwargs=True)]
        if float_block is not None:
            twin = float_block.get_submodule(group[0][prefix:])
            handles.append(twin.register_forward_pre_hook(float_input, with_kwargs=True))
        try:
            with torch.no_grad():
                for b in range(len(self.batches)):
                    for model, store in ((self._block, self.inputs), (float_block, self.float_in)):
                        if model is None:
                            continue
                        try:
                            self._forward(self._index, model, b, store)
                        except Stop:
                            pass
        finally:
            for handle in handles:
                handle.remove()

    def _start_workers(self) -> None:
        """Single-pass: each batch runs in its own worker thread, and a hook on the first module of
        every sequential group parks the worker there. Once every batch is parked at a group, the
        group's inputs cover all calibration tokens; the group is quantized, its weights swapped
        for the dequantized ones, and the workers move on to the next group. Workers take turns
        (one runs at a time), so torch keeps all cores per op. The price is that every batch's
        in-flight activations are alive at once."""
        groups, index, block = self._group_list, self._index, self._block
        self._collectors = {}

        def park(group: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                worker = threading.current_thread()
                if not isinstance(worker, Worker):
                    return
                if worker.next_group != group:
                    raise RuntimeError(f"{groups[group][0]} ran out of the order seen when probing the block")
                if (collector := self._collectors.get(group)) is not None:
                    collector.add(args, kwargs)
                worker.next_group += 1
                worker.park()

            return hook

        self._handles = [self._modules[group[0]].register_forward_pre_hook(park(g), with_kwargs=True)
                         for g, group in enumerate(groups)]
        self._workers = [Worker(functools.partial(self._forward, index, block, b), name=f"calib-{b}")
                         for b in range(len(self.batches))]
        for worker in self._workers:
            worker.start()

    def _stop_workers(self) -> None:
        for handle in self._handles:
            handle.remove()
        for worker in self._workers:
            worker.abort()
        self._handles, self._workers = [], []

    def _materialize(self, index: int) -> nn.Module:
        prefix = self.layout.block_name(index) + "."
        block = self.model.get_submodule(self.layout.block_name(index))
        state = {self.keys.model(k)[len(prefix):]: self.checkpoint[k].to(self.device, self.dtype)
                 for k in self.checkpoint if k.startswith(prefix)}
        block.load_state_dict(state, strict=False, assign=True)
        return block.eval()

    def _forward(self, index: int, block: nn.Module, batch: int, store: ActivationStore | None = None) -> Tensor:
        kwargs = dict(self.kwargs[index][batch])
        args = kwargs.pop("__args__", ())
        hidden = (store or self.inputs)[batch].to(self.device)
        out = block(hidden, *args, **kwargs)
        result: Tensor = out[0] if isinstance(out, tuple) else out
        return result

    def _sequential_groups(self, index: int, block: nn.Module, linears: dict[str, nn.Module],
                           experts: set[str] = frozenset()) -> list[list[str]]:  # type: ignore[assignment]
        """Group Linears that read the same input tensor, in execution order (q/k/v; o; gate/up; down);
        an experts module (`experts`) is a group of its own.

        Inputs are compared by identity while all of them are held: comparing addresses of tensors
        already freed would let the allocator's reuse of memory merge unrelated Linears.
        """
        key = tuple(n.rsplit(".", 1)[-1] for n in linears)
        relative = {n[len(self.layout.block_name(index)) + 1:]: n for n in linears}
        if key not in self._groups:
            seen: list[tuple[str, Tensor]] = []
            handles = [m.register_forward_pre_hook(lambda m, a, rel=rel: seen.append((rel, a[0])))
                       for rel, m in ((n[len(self.layout.block_name(index)) + 1:], m) for n, m in linears.items())]
            try:
                with torch.no_grad():
                    self._forward(index, block, 0)
            finally:
                for h in handles:
                    h.remove()
            groups: list[list[str]] = []
            last: Tensor | None = None
            alone = {n[len(self.layout.block_name(index)) + 1:] for n in experts}
            for rel, x in seen:
                if groups and x is last and rel not in groups[-1] and rel not in alone and groups[-1][0] not in alone:
                    groups[-1].append(rel)
                else:
                    groups.append([rel])
                last = x
            seen.clear()
            self._groups[key] = groups
            log.debug("sequential groups: %s", groups)
        return [[relative[rel] for rel in group] for group in self._groups[key]]
