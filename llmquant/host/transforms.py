"""The host side of block transforms: model-wide edits as a view over the checkpoint, and each
block rewritten, checked for equivalence and handed on before it is calibrated.

Memory: a block is transformed in float32 (``4 * w`` bytes for w parameters), and a calibrated
transform keeps the inputs and outputs of every scope (``self_attn``, ``mlp``, a Linear) over its
T search tokens, in float32: about ``4 * T * sum(i + d)`` bytes over the scopes, i a scope's
widest input and d the hidden size.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmquant.errors import LlmquantError, PluginError
from llmquant.host.block_graph import BlockStructure, find_structure
from llmquant.host.checkpoint import Checkpoint
from llmquant.host.moe import KeyMap
from llmquant.transform import BlockContext, ModelContext, ModelEdit, ScalePoint, Transform

if TYPE_CHECKING:
    from llmquant.host.calibrate import SequentialCalibrator
    from llmquant.plugins import Plugins

__all__ = ["EQUIVALENCE_TOLERANCE", "EditedCheckpoint", "TransformStep", "Transforms", "fake_quantizer", "transform_steps"]

log = logging.getLogger(__name__)

EQUIVALENCE_TOLERANCE = 1e-3  # relative L2 error of a transformed float block's output
CHECK_WINDOWS = 2  # calibration windows (of the first batch) the equivalence check runs


class EditedCheckpoint(Mapping[str, Tensor]):
    """The source checkpoint as the transforms left it: model-wide edits applied as tensors are
    read, the current block's rewritten tensors held until the block is written.

    Args:
        base: the source checkpoint (never modified).
        edits: key -> functions applied in order to the tensor's float32 value.
        aliases: new key -> the key it is read from (an untied head, read from the embedding).
    """

    def __init__(self, base: Checkpoint, edits: dict[str, list[Callable[[Tensor], Tensor]]], aliases: dict[str, str]) -> None:
        self.base, self.edits, self.aliases = base, edits, aliases
        self.folder = base.folder
        self.infos = {**base.infos, **{new: base.infos[old] for new, old in aliases.items()}}
        self.blocks: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        if key in self.blocks:
            return self.blocks[key]
        tensor = self.base[self.aliases.get(key, key)]
        for edit in self.edits.get(key, []):
            tensor = edit(tensor.float())
        return tensor

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from (k for k in self.aliases if k not in self.base.infos)

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    def drop_block(self, prefix: str) -> None:
        """Forget the rewritten tensors under `prefix` once the block is written."""
        for key in [k for k in self.blocks if k.startswith(prefix)]:
            del self.blocks[key]


@dataclass(frozen=True)
class TransformStep:
    """One transform of the run: its instance, config and the plugin that registered it."""

    transform: Transform
    config: Any
    plugin: str


def transform_steps(names: tuple[str, ...], options: Mapping[str, Any], plugins: Plugins, *, moe: bool,
                    calibrated: bool) -> list[TransformStep]:
    """The run's transforms, each with its config from `options`, checked against the model and the run."""
    steps = []
    for name in names:
        found = plugins.transform(name)
        own = {f.name for f in dataclasses.fields(found.cls.config_type)}
        settings = {k: v for k, v in options.items() if k in own}
        steps.append(TransformStep(found.cls(), found.cls.config_type(**settings), found.plugin.name))
    if steps and moe:
        raise LlmquantError(f"--transform {' '.join(names)}: block transforms do not handle mixture-of-experts blocks yet; "
                            f"quantize this model without --transform")
    needs = [s.transform.name for s in steps if s.transform.needs_calibration]
    if needs and not calibrated:
        raise LlmquantError(f"transform {needs[0]!r} needs calibration data: pass --calib SOURCE, e.g. --calib wiki.txt "
                            f"--calib-samples 128 --calib-seqlen 512")
    return steps


def fake_quantizer(algorithm: Any, configs: Mapping[str, Any], keys: KeyMap) -> Callable[[str, Tensor], Tensor]:
    """``fake_quantize(module, W)`` for transforms: `algorithm` on `module`'s config (`configs`, by
    checkpoint name) without calibration, dequantized in float32; W itself for Linears kept in float."""
    def fake_quantize(module: str, W: Tensor) -> Tensor:
        config = configs.get(keys.disk(module))
        if config is None:
            return W
        result: Tensor = algorithm.quantize_weight(W, config, None).dequantize(torch.float32)
        return result

    return fake_quantize


class Transforms:
    """Runs the run's transforms: `prepare` once, then `apply` on every block before calibration.

    Args:
        steps: the transforms in order.
        fake_quantize: ``fake_quantize(module, W)``, the run's algorithm without calibration on the
            Linear `module` (full skeleton name), dequantized; W unchanged for Linears kept in float.
        keys: checkpoint <-> skeleton names.
    """

    def __init__(self, steps: list[TransformStep], fake_quantize: Callable[[str, Tensor], Tensor], keys: KeyMap) -> None:
        self.steps, self.fake_quantize, self.keys = steps, fake_quantize, keys
        self.bases: list[Tensor | None] = []  # per step: the residual basis its result expects
        self.checkpoint: EditedCheckpoint | None = None
        self.untied = False
        self._structures: dict[tuple[str, ...], BlockStructure] = {}

    def prepare(self, skeleton: nn.Module, checkpoint: Checkpoint, model_type: str, hidden_size: int) -> EditedCheckpoint:
        """Run every transform's `prepare` and return the checkpoint view the rest of the run reads."""
        context = model_context(skeleton, checkpoint, self.keys, model_type, hidden_size)
        edits: dict[str, list[Callable[[Tensor], Tensor]]] = {}
        aliases: dict[str, str] = {}
        basis: Tensor | None = None
        for step in self.steps:
            edit: ModelEdit = _call(step, "prepare", lambda: step.transform.prepare(context, step.config))
            for key, function in edit.tensors.items():
                edits.setdefault(key, []).append(function)
            if edit.untie and context.head not in checkpoint.infos:
                aliases[context.head] = context.embedding
                self.untied = True
            if edit.rotation is not None:
                basis = edit.rotation.float() if basis is None else basis @ edit.rotation.float()
            self.bases.append(basis)
        self.checkpoint = EditedCheckpoint(checkpoint, edits, aliases)
        return self.checkpoint

    @property
    def rotation(self) -> Tensor | None:
        return self.bases[-1] if self.bases else None

    def apply(self, calibrator: SequentialCalibrator, index: int, block: nn.Module) -> None:
        """Transform block `index` (materialized) in float32, check it, store its tensors, and
        leave it in the calibration dtype."""
        assert self.checkpoint is not None
        name = calibrator.layout.block_name(index)
        block.float()
        rotation = self.rotation
        windows = min(CHECK_WINDOWS, calibrator.inputs[0].shape[0])
        original = _unrotate(calibrator.inputs[0][:windows].float(), rotation)
        with torch.no_grad():
            reference = _run(calibrator, index, block, 0, original, windows)
        structure = self._structure(calibrator, index, block, original, windows)
        previous: Tensor | None = None
        for step, basis in zip(self.steps, self.bases):
            weights = {n: p.data.float().clone() for n, p in block.named_parameters()}
            context = BlockContext(name, weights, list(structure.scale_points), structure.residual_readers,
                                   structure.residual_writers, structure.post_norms)
            context.fake_quantize = lambda rel, W: self.fake_quantize(f"{name}.{rel}", W)
            if step.transform.needs_calibration:
                scopes = _Scopes(calibrator, index, block, previous, rotation, context.scale_points,
                                 lambda: context.search_tokens)
                context.input_mean, context.error = scopes.input_mean, scopes.error
            _call(step, f"transform_block on {name}", lambda: step.transform.transform_block(context, step.config))
            _load(block, context.weights)
            self._check(calibrator, index, block, original, reference, basis, step, name)
            previous = basis
        for rel, param in block.named_parameters():
            self.checkpoint.blocks[self.keys.disk(f"{name}.{rel}")] = param.data.clone()
        block.to(calibrator.dtype)

    def _structure(self, calibrator: SequentialCalibrator, index: int, block: nn.Module, x: Tensor,
                   windows: int) -> BlockStructure:
        key = tuple(f"{n}:{type(m).__name__}" for n, m in block.named_modules())
        if key not in self._structures:
            self._structures[key] = find_structure(block, lambda: _run(calibrator, index, block, 0, x, windows))
            log.info("block structure: %s", self._structures[key])
        return self._structures[key]

    def _check(self, calibrator: SequentialCalibrator, index: int, block: nn.Module, x: Tensor, reference: Tensor,
               basis: Tensor | None, step: TransformStep, name: str) -> None:
        with torch.no_grad():
            out = _unrotate(_run(calibrator, index, block, 0, _rotate(x, basis), x.shape[0]), basis)
        error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
        if not error <= EQUIVALENCE_TOLERANCE:
            raise PluginError(
                f"transform {step.transform.name!r} from plugin {step.plugin!r} changed what {name} computes: relative "
                f"error {error:.2e} on {x.shape[0]} calibration windows (tolerance {EQUIVALENCE_TOLERANCE:.0e}); a transform "
                f"must leave the float block's output unchanged (report this to the plugin's authors)")


class _Scopes:
    """`BlockContext.input_mean` and `BlockContext.error` on the first calibration windows: one
    forward pass of the block records, for every scale point, the mean ``|x|`` of its readers'
    input and its scope's calls and outputs; `error` then reruns only the scope.

    Captured once, on the block as it was before the transform: a point's search sees its readers'
    inputs in the original block's terms, which the points applied before it (each one leaving the
    function unchanged) do not alter."""

    def __init__(self, calibrator: SequentialCalibrator, index: int, block: nn.Module, basis: Tensor | None,
                 rotation: Tensor | None, points: list[ScalePoint], tokens: Callable[[], int]) -> None:
        self.calibrator, self.index, self.block, self.basis, self.rotation = calibrator, index, block, basis, rotation
        self.points, self.tokens = points, tokens
        self.means: dict[ScalePoint, Tensor] = {}
        self.calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Tensor]]] = {}

    def _capture(self) -> None:
        if self.means or not self.points:
            return
        sums: dict[ScalePoint, Tensor] = {}
        counts: dict[ScalePoint, int] = {}
        scopes = {p.scope for p in self.points}
        self.calls = {scope: [] for scope in scopes}

        def on_reader(point: ScalePoint) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach().float()
                sums[point] = sums.get(point, 0) + x.abs().reshape(-1, x.shape[-1]).sum(0)
                counts[point] = counts.get(point, 0) + x.numel() // x.shape[-1]
            return hook

        def on_scope(scope: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                self.calls[scope].append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs),
                                          out.detach().float()))
            return hook

        handles = [self.block.get_submodule(p.readers[0]).register_forward_pre_hook(on_reader(p)) for p in self.points]
        handles += [self.block.get_submodule(scope).register_forward_hook(on_scope(scope), with_kwargs=True) for scope in scopes]
        try:
            with torch.no_grad():
                left = self.tokens()
                for b in range(len(self.calibrator.batches)):
                    if left <= 0:
                        break
                    x = _rotate(_unrotate(self.calibrator.inputs[b].float(), self.rotation), self.basis)
                    windows = min(x.shape[0], -(-left // x.shape[1]))
                    _run(self.calibrator, self.index, self.block, b, x, windows)
                    left -= windows * x.shape[1]
        finally:
            for h in handles:
                h.remove()
        self.means = {p: sums[p] / max(counts[p], 1) for p in self.points}

    def input_mean(self, point: ScalePoint) -> Tensor:
        self._capture()
        return self.means[point]

    def error(self, point: ScalePoint, weights: Mapping[str, Tensor]) -> float:
        self._capture()
        scope = self.block.get_submodule(point.scope)
        params = dict(self.block.named_parameters())
        saved = {k: params[k].data for k in weights}
        total, count = 0.0, 0
        try:
            for k, v in weights.items():
                params[k].data = v.to(saved[k].dtype)
            with torch.no_grad():
                for args, kwargs, ref in self.calls[point.scope]:
                    out = scope(*args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    total += float((out.float() - ref).pow(2).sum())
                    count += ref.numel()
        finally:
            for k, v in saved.items():
                params[k].data = v
        return total / max(count, 1)


def model_context(skeleton: nn.Module, checkpoint: Checkpoint, keys: KeyMap, model_type: str, hidden_size: int) -> ModelContext:
    """Find the embedding, the head (tied or not) and the final norm of `skeleton`, by structure."""
    embedding = skeleton.get_input_embeddings()  # type: ignore[operator]
    head = skeleton.get_output_embeddings()  # type: ignore[operator]
    names = {id(p): n for n, p in skeleton.named_parameters(remove_duplicate=False)}
    all_names = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    embedding_key = keys.disk(names[id(embedding.weight)])
    head_name = next((n for n in all_names if head is not None and skeleton.get_parameter(n) is head.weight
                      and n != names[id(embedding.weight)]), "lm_head.weight")
    norms = [(n, m) for n, m in skeleton.named_modules() if n and not list(m.children())
             and list(dict(m.named_parameters()).keys()) == ["weight"] and m.weight.dim() == 1
             and m.weight.shape[0] == hidden_size and ".layers." not in f".{n}."]
    final = norms[-1] if norms else None

    def read(key: str) -> Tensor:
        return checkpoint[key].float()

    head_key = keys.disk(head_name)
    return ModelContext(hidden_size=hidden_size, embedding=embedding_key, head=head_key, tied=head_key not in checkpoint.infos,
                        final_norm=keys.disk(f"{final[0]}.weight") if final else None,
                        final_norm_offset=_norm_offset(final[1]) if final else 0.0, model_type=model_type, read=read)


def _norm_offset(norm: nn.Module) -> float:
    """1.0 for a norm that multiplies by ``1 + weight`` (Gemma), else 0.0: run a copy with a zero weight."""
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    weight = dict(probe.named_parameters())["weight"]
    with torch.no_grad():
        weight.zero_()
        out = probe(torch.randn(2, int(weight.shape[0])))
    return 0.0 if float(out.abs().max()) < 1e-6 else 1.0


def _run(calibrator: SequentialCalibrator, index: int, block: nn.Module, batch: int, x: Tensor,
         windows: int | None = None) -> Tensor:
    """Run `block` on `x`, the input of calibration batch `batch`, with that batch's other arguments;
    `windows`: only the first ones (arguments with one entry per window cut to match)."""
    kwargs = dict(calibrator.kwargs[index][batch])
    args = kwargs.pop("__args__", ())
    count = calibrator.batches[batch].shape[0]
    if windows is not None and windows < count:
        x, args, kwargs = x[:windows], _first(args, count, windows), _first(kwargs, count, windows)
    out = block(x.to(calibrator.device), *args, **kwargs)
    result: Tensor = out[0] if isinstance(out, tuple) else out
    return result.float()


def _first(value: Any, count: int, windows: int) -> Any:
    """`value` with every tensor whose first dimension is `count` (one entry per window) cut to `windows`."""
    if isinstance(value, Tensor):
        return value[:windows] if value.dim() >= 2 and value.shape[0] == count else value
    if isinstance(value, tuple):
        return tuple(_first(v, count, windows) for v in value)
    if isinstance(value, dict):
        return {k: _first(v, count, windows) for k, v in value.items()}
    return value


def _rotate(x: Tensor, basis: Tensor | None) -> Tensor:
    return x if basis is None else x @ basis.to(x.device)


def _unrotate(x: Tensor, basis: Tensor | None) -> Tensor:
    return x if basis is None else x @ basis.to(x.device).T


def _load(block: nn.Module, weights: dict[str, Tensor]) -> None:
    params = dict(block.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise PluginError(f"a transform returned {name!r}, which is not a parameter of the block")
        if value.shape != params[name].shape:
            raise PluginError(f"a transform changed the shape of {name} from {tuple(params[name].shape)} to {tuple(value.shape)}")
        params[name].data = value.to(params[name].device, torch.float32)


def _call(step: TransformStep, what: str, function: Callable[[], Any]) -> Any:
    try:
        return function()
    except LlmquantError:
        raise
    except Exception as exc:
        raise PluginError(f"transform {step.transform.name!r} from plugin {step.plugin!r} failed in {what}: "
                          f"{type(exc).__name__}: {exc}") from exc
