"""The run config: host settings plus the chosen algorithm's own fields, from TOML and flags.

A config file is flat TOML; per-module overrides are an array of tables::

    algo = "rtn"
    format = "gptq"
    bits = 4
    group_size = 128
    ignore = ['mlp\\.gate_proj$']

    [[overrides]]
    pattern = 'mlp\\.down_proj$'
    bits = 8

Keys are checked against the host's fields and the algorithm's `config_type`; an unknown key
or a wrong type is a `ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from llmquant.errors import ConfigError
from llmquant.host.calibration_data import CalibrationConfig
from llmquant.host.moe import EXPERT_NAMES
from llmquant.io.shards import parse_size

__all__ = ["Override", "QuantizeConfig", "build_dataclass", "load_toml", "resolve_config"]

DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Override:
    """Algorithm fields that replace the run's for modules whose name matches `pattern` (re.search)."""

    pattern: str
    params: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Host settings of one quantization run.

    Attributes:
        algo: algorithm name (see ``llmquant algorithms``).
        format: output format name (see ``llmquant formats``); "auto" picks the default format
            for the algorithm's result type (gptq for uniform codes, bitsandbytes for NF4/FP4).
        ignore: regexes (re.search over full module names) of Linears left in float.
        overrides: per-module algorithm settings, first match wins.
        dtype: dtype of tensors copied unquantized (embeddings, norms, lm_head, biases);
            "auto" keeps each tensor's own dtype.
        max_shard_size: cap on one output safetensors file, e.g. "2GB".
        device: where blocks run and weights are quantized: "auto" (CUDA when present, else CPU),
            "cpu", "cuda", "cuda:1".
        keep_moe_gates: keep the router and shared-expert gates of mixture-of-experts blocks in
            float (the router is usually not an nn.Linear at all, and is then always kept).
        expert_names: the names routed experts are written under: "checkpoint" (the source's own,
            what vLLM reads) or "transformers" (transformers' defused names, what GPTQModel and
            gptqmodel's defuser read; differs from the checkpoint's for Mixtral only).
        params: the algorithm's own fields, validated by its `config_type`.
        format_options: the output format's own settings, validated by its ``options_type``
            (GGUF: ``gguf_type``, ``gguf_embedding_type``).
        transforms: block transforms applied in order before quantizing (see ``llmquant transforms``).
        transform_options: the transforms' own settings, validated by their ``config_type``
            (``awq_grid``, ``rotate_seed``).
        executor: where the work runs: "local" (this process) or "ray" (a Ray cluster); the output
            is the same bytes either way (docs/distributed.md).
        ray_address: the Ray cluster to join ("auto", "ray://host:10001", "host:6379"); unset
            starts a local one for the run.
        workers: how many workers run at once (local: threads, default every core; ray: default
            every CPU of the cluster).
    """

    algo: str = "rtn"
    format: str = "auto"
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    dtype: str = "auto"
    max_shard_size: str = "2GB"
    device: str = "auto"
    keep_moe_gates: bool = True
    expert_names: str = "checkpoint"
    params: Mapping[str, Any] = field(default_factory=dict)
    format_options: Mapping[str, Any] = field(default_factory=dict)
    transforms: tuple[str, ...] = ()
    transform_options: Mapping[str, Any] = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        try:
            parse_size(self.max_shard_size)
        except ValueError as exc:
            raise ConfigError("max_shard_size", self.max_shard_size, "a size such as 2GB or 500MiB") from exc
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers", self.workers, "at least 1")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.expert_names not in EXPERT_NAMES:
            raise ConfigError("expert_names", self.expert_names, f"one of {', '.join(EXPERT_NAMES)}")
        for pattern in (*self.ignore, *(o.pattern for o in self.overrides)):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError("ignore/overrides pattern", pattern, f"a valid regular expression ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain data for the output's metadata (where the work ran is not part
        of it: the output is the same bytes on any executor)."""
        return {
            "algo": self.algo, "format": self.format, "ignore": list(self.ignore),
            "overrides": [{"pattern": o.pattern, **o.params} for o in self.overrides],
            "dtype": self.dtype, "max_shard_size": self.max_shard_size, "device": self.device,
            **({} if self.keep_moe_gates else {"keep_moe_gates": False}),
            **({} if self.expert_names == "checkpoint" else {"expert_names": self.expert_names}),
            **dict(self.params),
            **dict(self.format_options),
            **({"transforms": list(self.transforms), **dict(self.transform_options)} if self.transforms else {}),
            **dataclasses.asdict(self.calibration),
        }


_HOST_FIELDS = {f.name for f in dataclasses.fields(QuantizeConfig)} - {"params", "overrides", "calibration", "format_options",
                                                                       "transform_options"}
_CALIBRATION_FIELDS = {f.name for f in dataclasses.fields(CalibrationConfig)}


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file into a flat dict, with a clear error for bad syntax."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError("config", str(path), "an existing TOML file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"valid TOML ({exc})") from exc


def resolve_config(raw: Mapping[str, Any], algorithm_config: type[Any], *, where: str = "config",
                   format_options: type[Any] | None = None,
                   transform_types: Sequence[type[Any]] = ()) -> tuple[QuantizeConfig, Any]:
    """Split flat settings into the host config and the algorithm's config instance.

    Args:
        raw: flat keys from a TOML file and flags; ``overrides`` is a list of tables.
        algorithm_config: the chosen algorithm's `config_type`.
        where: what to name in errors (the file, or "flags").
        format_options: the chosen format's ``options_type``, if it has settings of its own.
        transform_types: the chosen transforms' ``config_type``s.

    Returns:
        (QuantizeConfig, algorithm config built from the non-host keys).
    """
    algo_fields = {f.name for f in dataclasses.fields(algorithm_config)}
    format_fields = {f.name for f in dataclasses.fields(format_options)} if format_options else set()
    transform_fields = {f.name for t in transform_types for f in dataclasses.fields(t)}
    transform_values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    host: dict[str, Any] = {}
    params: dict[str, Any] = {}
    calibration: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _HOST_FIELDS:
            host[key] = value
        elif key in _CALIBRATION_FIELDS:
            calibration[key] = value
        elif key in algo_fields:
            params[key] = value
        elif key in format_fields:
            options[key] = value
        elif key in transform_fields:
            transform_values[key] = value
        elif key != "overrides":
            valid = sorted(_HOST_FIELDS | _CALIBRATION_FIELDS | algo_fields | format_fields | transform_fields | {"overrides"})
            raise ConfigError(key, value, f"a known key; valid keys are {', '.join(valid)}", where=where)
    checked_host = build_dataclass(QuantizeConfig, host, where=where, construct=False)
    algorithm = build_dataclass(algorithm_config, params, where=where)
    overrides = tuple(_override(entry, algorithm, algo_fields, where, i) for i, entry in enumerate(raw.get("overrides", ())))
    if format_options is not None:
        options = dataclasses.asdict(build_dataclass(format_options, options, where=where))
    transform_options: dict[str, Any] = {}
    for kind in transform_types:
        own = {f.name for f in dataclasses.fields(kind)}
        transform_options.update(dataclasses.asdict(build_dataclass(kind, {k: v for k, v in transform_values.items() if k in own},
                                                                    where=where)))
    config = build_dataclass(QuantizeConfig, {**checked_host, "overrides": overrides, "params": dataclasses.asdict(algorithm),
                                              "format_options": options, "transform_options": transform_options,
                                              "calibration": build_dataclass(CalibrationConfig, calibration, where=where)}, where=where)
    return config, algorithm


def _override(entry: Any, base: Any, algo_fields: set[str], where: str, index: int) -> Override:
    at = f"{where}: overrides[{index}]"
    if not isinstance(entry, Mapping) or "pattern" not in entry:
        raise ConfigError("pattern", entry, "a table with a `pattern` regex and algorithm fields", where=at)
    params = {k: v for k, v in entry.items() if k != "pattern"}
    unknown = set(params) - algo_fields
    if unknown:
        raise ConfigError(sorted(unknown)[0], params[sorted(unknown)[0]], f"one of {', '.join(sorted(algo_fields))}", where=at)
    build_dataclass(type(base), {**dataclasses.asdict(base), **params}, where=at)  # validates the merged values
    return Override(pattern=str(entry["pattern"]), params=params)


def build_dataclass(cls: type[Any], values: Mapping[str, Any], *, where: str, construct: bool = True) -> Any:
    """Check each value against the field's annotation, then build `cls` (or return the checked dict)."""
    hints = typing.get_type_hints(cls)
    checked = {key: _coerce(key, value, hints[key], where) for key, value in values.items()}
    if not construct:
        return checked
    try:
        return cls(**checked)
    except ConfigError as exc:  # raised by __post_init__, which does not know the file
        if exc.where is not None:
            raise
        raise ConfigError(exc.field, exc.value, exc.expected, where=where) from None


def _coerce(key: str, value: Any, annotation: Any, where: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(key, value, option, where)
            except ConfigError as exc:
                errors.append(exc.expected)
        raise ConfigError(key, value, " or ".join(errors), where=where)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(key, value, f"one of {', '.join(map(repr, args))}", where=where)
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(key, v, args[0], where) for v in value)
        raise ConfigError(key, value, "a list", where=where)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool, float):
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
        raise ConfigError(key, value, annotation.__name__, where=where)
    return value
