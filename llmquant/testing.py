"""A conformance suite for algorithm plugins, to run in the plugin's own pytest.

Example:
    # tests/test_conformance.py of your plugin
    from llmquant.testing import check_algorithm
    from my_package import MyAlgo

    def test_conformance(tmp_path):
        check_algorithm(MyAlgo, tmp_path)

Or one test per check, for clearer reports::

    import pytest
    from llmquant.testing import CHECKS

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check, tmp_path):
        check(MyAlgo, tmp_path)

Block transforms have a kit of their own: ``check_transform(MyTransform, tmp_path)`` (or
``TRANSFORM_CHECKS``), which proves that the float model a transform writes computes what the
original did, on a tiny Llama and Qwen2 whose norms and outlier channels are not trivial.

Every check raises AssertionError with a message that names the algorithm and what broke.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from llmquant.algorithm import CalibrationStats, CodebookQuantized, UniformQuantized
from llmquant.errors import ConfigError, LlmquantError
from llmquant.hookspecs import hookimpl

__all__ = ["CHECKS", "TRANSFORM_CHECKS", "check_algorithm", "check_transform", "save_tiny_for_transforms", "save_tiny_llama"]

SHAPES = [(96, 256), (128, 128), (256, 384)]


def _weight(shape: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _stats(in_features: int, seed: int = 0) -> CalibrationStats:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * in_features, in_features, generator=g) * torch.exp(torch.randn(in_features, generator=g))
    return CalibrationStats(H=2 * X.t() @ X / X.shape[0], nsamples=X.shape[0])


def _config(cls: type[Any], **changes: Any) -> Any:
    config_type = cls.config_type
    names = {f.name for f in dataclasses.fields(config_type)}
    defaults: dict[str, Any] = {"group_size": 64} if "group_size" in names else {}
    return config_type(**{**defaults, **{k: v for k, v in changes.items() if k in names}})


def _run(cls: type[Any], W: Tensor, config: Any = None) -> Any:
    config = config if config is not None else _config(cls)
    stats = _stats(W.shape[1]) if cls.needs_calibration else None
    return cls().quantize_weight(W, config, stats)


def check_interface(cls: type[Any], tmp_path: Path) -> None:
    """The class declares the attributes the host reads, with the right kinds of value."""
    for attr in ("name", "description", "config_type", "result_type", "needs_calibration"):
        assert hasattr(cls, attr), f"{cls.__name__} lacks the class attribute {attr!r}"
    assert isinstance(cls.name, str) and cls.name and " " not in cls.name, f"{cls.__name__}.name must be a word, got {cls.name!r}"
    assert dataclasses.is_dataclass(cls.config_type), f"{cls.name}: config_type must be a dataclass"
    params = getattr(cls.config_type, "__dataclass_params__")
    assert params.frozen, f"{cls.name}: config_type must be frozen (@dataclass(frozen=True))"
    assert cls.result_type in (UniformQuantized, CodebookQuantized), f"{cls.name}: unknown result_type {cls.result_type}"
    assert isinstance(cls.needs_calibration, bool), f"{cls.name}: needs_calibration must be a bool"


def check_shape_and_dtype(cls: type[Any], tmp_path: Path) -> None:
    """Results have the declared type, shapes and dtypes for float32 and bfloat16 weights."""
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            W = _weight(shape, dtype=dtype)
            result = _run(cls, W)
            where = f"{cls.name} on {tuple(shape)} {dtype}"
            assert isinstance(result, cls.result_type), f"{where}: returned {type(result).__name__}, declared {cls.result_type.__name__}"
            assert result.codes.shape == shape and result.codes.dtype == torch.uint8, f"{where}: codes {result.codes.shape} {result.codes.dtype}"
            if isinstance(result, UniformQuantized):
                groups = result.scales.shape[1]
                assert result.scales.shape == (shape[0], groups) and result.zeros.shape == (shape[0], groups), f"{where}: scales/zeros shape"
                assert result.g_idx.shape == (shape[1],) and result.g_idx.dtype == torch.int32, f"{where}: g_idx {result.g_idx.shape}"
                assert 0 <= int(result.g_idx.min()) and int(result.g_idx.max()) < groups, f"{where}: g_idx outside [0, {groups})"
                assert int(result.codes.max()) < 2**result.bits, f"{where}: a code exceeds {result.bits} bits"
            deq = result.dequantize()
            assert deq.shape == shape and torch.isfinite(deq).all(), f"{where}: dequantize() is not a finite {shape} tensor"
            error = (deq - W.float()).pow(2).mean() / W.float().pow(2).mean()
            assert error < 0.5, f"{where}: relative squared error {error:.3f}, the weight is barely represented"


def check_determinism_and_input_untouched(cls: type[Any], tmp_path: Path) -> None:
    """The same input gives the same result, and the input weight is not modified."""
    W = _weight((128, 256))
    before = W.clone()
    torch.manual_seed(0)
    first = _run(cls, W)
    torch.manual_seed(0)
    second = _run(cls, W)
    assert torch.equal(W, before), f"{cls.name} modified the weight it was given"
    assert torch.equal(first.codes, second.codes) and torch.equal(first.dequantize(), second.dequantize()), \
        f"{cls.name} is not deterministic under a fixed seed"


def check_formats_accept_results(cls: type[Any], tmp_path: Path) -> None:
    """Every format that accepts the result type stores it and reads back the same weight."""
    from llmquant.plugins import get_plugin_manager

    result = _run(cls, _weight((128, 256)))
    accepting = [f for f in get_plugin_manager().formats().values() if f.accepts(type(result))]
    assert accepting, f"{cls.name}: no output format accepts {type(result).__name__}"
    for entry in accepting:
        fmt = entry.cls()
        try:
            back = fmt.read(fmt.tensors(result, torch.float32), {})
        except LlmquantError:
            continue  # the format refuses this result's settings (e.g. 3 bits in compressed-tensors)
        torch.testing.assert_close(back.dequantize(), result.dequantize(), rtol=1e-3, atol=1e-6,
                                   msg=lambda m: f"{cls.name} through format {entry.name}: {m}")


def check_bad_config_and_shape(cls: type[Any], tmp_path: Path) -> None:
    """Invalid settings raise ConfigError; a weight the config cannot fit raises an LlmquantError."""
    names = {f.name for f in dataclasses.fields(cls.config_type)}
    for field, bad in (("bits", 7), ("group_size", 0)):
        if field in names:
            try:
                cls.config_type(**{field: bad})
            except ConfigError:
                pass
            else:
                raise AssertionError(f"{cls.name}: {field}={bad!r} was accepted; raise ConfigError in __post_init__")
    if "group_size" in names:
        try:
            _run(cls, _weight((64, 100)), _config(cls, group_size=64))
        except LlmquantError:
            pass
        else:
            raise AssertionError(f"{cls.name}: in_features 100 with group_size 64 was accepted; raise ShapeError")


def check_round_trip_through_files(cls: type[Any], tmp_path: Path) -> None:
    """The host quantizes a tiny model with the algorithm, writes it, and llmquant loads it back."""
    from llmquant.api import quantize
    from llmquant.plugins import get_plugin_manager
    from llmquant.runtime import load_quantized

    source = save_tiny_llama(tmp_path / "tiny")
    plugins = get_plugin_manager()  # the installed formats; the algorithm itself unless it is installed

    @hookimpl
    def llmquant_register_algorithms(register: Callable[[type[Any]], None]) -> None:
        register(cls)

    installed = plugins.algorithms().get(cls.name)
    if installed is None or installed.cls is not cls:
        plugins.register(types.SimpleNamespace(llmquant_register_algorithms=llmquant_register_algorithms), "conformance")
    settings: dict[str, Any] = {"algo": cls.name}
    if "group_size" in {f.name for f in dataclasses.fields(cls.config_type)}:
        settings["group_size"] = 64
    if cls.needs_calibration:
        calib = tmp_path / "calib.txt"
        calib.write_text("\n".join(" ".join(f"t{(i * 7 + j) % 500 + 3}" for j in range(40)) for i in range(100)))
        settings.update(calib=str(calib), calib_samples=8, calib_seqlen=32)
    report = quantize(source, tmp_path / "out", settings, plugins=plugins)
    assert report.quantized == 14, f"{cls.name}: quantized {report.quantized} of 14 Linears"
    model = load_quantized(tmp_path / "out")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert torch.isfinite(logits).all(), f"{cls.name}: the written model gives non-finite logits"


def save_tiny_llama(folder: Path) -> Path:
    """Save a random 2-layer Llama (hidden 128, vocab 512) with a word-level tokenizer, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 512)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return folder


CHECKS: list[Callable[[type[Any], Path], None]] = [
    check_interface, check_shape_and_dtype, check_determinism_and_input_untouched, check_formats_accept_results,
    check_bad_config_and_shape, check_round_trip_through_files,
]


def check_algorithm(cls: type[Any], tmp_path: Path) -> None:
    """Run every conformance check on the algorithm class `cls`, using `tmp_path` for files."""
    for check in CHECKS:
        folder = tmp_path / check.__name__
        folder.mkdir(parents=True, exist_ok=True)
        check(cls, folder)


# ---------------------------------------------------------------- block transforms


def save_tiny_for_transforms(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a random 2-layer Llama or Qwen2 (hidden 128) whose norms are not ones and whose first
    channels carry large activations, as real LLMs' do, with a word-level tokenizer, offline."""
    import transformers
    from safetensors.torch import load_file, save_file

    save_tiny_llama(folder)
    if arch == "qwen2":  # q/k/v biases; the same shapes otherwise
        config = transformers.Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # type: ignore[no-untyped-call]
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if value.dim() == 1 and "norm" in key:
            gamma = torch.rand(value.shape, generator=generator) + 0.5
            gamma[:4] *= 20
            state[key] = gamma.to(value.dtype)
        elif value.dim() == 2:
            state[key] = (torch.randn(value.shape, generator=generator) * 0.05).to(value.dtype)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _transform_steps(cls: type[Any]) -> list[Any]:
    from llmquant.host.transforms import TransformStep

    return [TransformStep(cls(), cls.config_type(), "conformance")]


def check_transform_interface(cls: type[Any], tmp_path: Path) -> None:
    """The class declares what the host reads; its config is frozen, defaults to valid settings, and
    its field names start with the transform's name (they share the run's flat config keys)."""
    for attr in ("name", "description", "config_type", "needs_calibration", "prepare", "transform_block"):
        assert hasattr(cls, attr), f"{cls.__name__} lacks {attr!r}"
    assert isinstance(cls.name, str) and cls.name and " " not in cls.name, f"{cls.__name__}.name must be a word, got {cls.name!r}"
    assert dataclasses.is_dataclass(cls.config_type), f"{cls.name}: config_type must be a dataclass"
    assert getattr(cls.config_type, "__dataclass_params__").frozen, f"{cls.name}: config_type must be frozen"
    config_type: Any = cls.config_type
    config_type()
    for field in dataclasses.fields(cls.config_type):
        assert field.name.startswith(f"{cls.name.replace('-', '_')}_"), \
            f"{cls.name}: config field {field.name!r} must start with {cls.name!r}_ (it is a key of the run's config)"


def check_transform_keeps_the_function(cls: type[Any], tmp_path: Path) -> None:
    """On a Llama and a Qwen2 (q/k/v biases), the float model the transform writes computes the
    logits the original computes (relative error under 1e-4)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmquant.host.float_transform import transformed_state_dict
    from llmquant.uniform import minmax_quantize

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    samples = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(2))
    for arch in ("llama", "qwen2"):
        source = save_tiny_for_transforms(tmp_path / arch, arch)
        state, untied = transformed_state_dict(source, _transform_steps(cls), samples,
                                               lambda module, W: minmax_quantize(W, 4, 32, True).dequantize())
        config = AutoConfig.from_pretrained(source)
        config.tie_word_embeddings = config.tie_word_embeddings and not untied
        original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
        changed = AutoModelForCausalLM.from_config(config).float().eval()  # type: ignore[no-untyped-call]
        changed.load_state_dict(state, strict=False)
        with torch.no_grad():
            expected, got = original(ids).logits, changed(ids).logits
        error = float((got - expected).abs().max() / expected.abs().max())
        assert error < 1e-4, f"{cls.name} on a tiny {arch}: logits moved by {error:.2e} of their range; a transform must not change the float model"


def check_transform_in_a_run(cls: type[Any], tmp_path: Path) -> None:
    """The host runs the transform before RTN; the output loads and gives finite logits, and its
    run record names the transform."""
    import json

    from llmquant.api import quantize
    from llmquant.plugins import get_plugin_manager
    from llmquant.runtime import load_quantized

    source = save_tiny_for_transforms(tmp_path / "tiny")
    plugins = get_plugin_manager()

    @hookimpl
    def llmquant_register_transforms(register: Callable[[type[Any]], None]) -> None:
        register(cls)

    installed = plugins.transforms().get(cls.name)
    if installed is None or installed.cls is not cls:
        plugins.register(types.SimpleNamespace(llmquant_register_transforms=llmquant_register_transforms), "conformance")
    settings: dict[str, Any] = {"algo": "rtn", "group_size": 64, "transforms": [cls.name]}
    if cls.needs_calibration:
        calib = tmp_path / "calib.txt"
        calib.write_text("\n".join(" ".join(f"t{(i * 7 + j) % 500 + 3}" for j in range(40)) for i in range(100)))
        settings.update(calib=str(calib), calib_samples=8, calib_seqlen=32)
    quantize(source, tmp_path / "out", settings, plugins=plugins)
    record = json.loads((tmp_path / "out" / "llmquant.json").read_text())
    assert record["config"].get("transforms") == [cls.name], f"{cls.name}: the run record does not name the transform"
    with torch.no_grad():
        logits = load_quantized(tmp_path / "out")(torch.tensor([[1, 5, 9, 42]])).logits
    assert torch.isfinite(logits).all(), f"{cls.name}: the written model gives non-finite logits"


TRANSFORM_CHECKS: list[Callable[[type[Any], Path], None]] = [
    check_transform_interface, check_transform_keeps_the_function, check_transform_in_a_run,
]


def check_transform(cls: type[Any], tmp_path: Path) -> None:
    """Run every conformance check on the block transform class `cls`, using `tmp_path` for files."""
    for check in TRANSFORM_CHECKS:
        folder = tmp_path / check.__name__
        folder.mkdir(parents=True, exist_ok=True)
        check(cls, folder)
