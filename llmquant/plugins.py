"""Build the plugin manager and collect what plugins register.

There is no module-global manager: `get_plugin_manager()` returns a new `Plugins` each time,
and callers pass it down.

Environment:
    LLMQUANT_PLUGINS: which third-party entry points to load. Unset or ``all``: every one;
        ``none``: only llmquant's own built-ins; a comma-separated list of entry-point names:
        the built-ins plus those.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points as _entry_points
from typing import Any, Callable, TypeVar

import pluggy

from llmquant import hookspecs
from llmquant.algorithm import Algorithm
from llmquant.errors import PluginError
from llmquant.formats import OutputFormat
from llmquant.transform import Transform

__all__ = ["AlgorithmEntry", "FormatEntry", "PluginInfo", "TransformEntry", "Plugins", "get_plugin_manager", "ENV_PLUGINS"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llmquant"
ENV_PLUGINS = "LLMQUANT_PLUGINS"
BUILTIN_DISTRIBUTION = "llmquant"
_REQUIRED_ATTRIBUTES = ("name", "description", "config_type", "result_type", "needs_calibration")
_FORMAT_ATTRIBUTES = ("name", "description", "accepts", "default_for")
_FORMAT_METHODS = ("check_module", "tensors", "quantization_config", "recognizes", "quantized_module", "read")
_TRANSFORM_ATTRIBUTES = ("name", "description", "config_type", "needs_calibration")
_TRANSFORM_METHODS = ("prepare", "transform_block")


@dataclass(frozen=True)
class PluginInfo:
    """A plugin the host found: loaded, or broken with the reason."""

    name: str
    distribution: str
    version: str
    error: str | None = None


@dataclass(frozen=True)
class AlgorithmEntry:
    """A registered algorithm and the plugin that registered it."""

    cls: type[Algorithm]
    plugin: PluginInfo

    @property
    def name(self) -> str:
        return self.cls.name


@dataclass(frozen=True)
class FormatEntry:
    """A registered output format and the plugin that registered it."""

    cls: type[OutputFormat]
    plugin: PluginInfo

    @property
    def name(self) -> str:
        return self.cls.name

    def accepts(self, result_type: type) -> bool:
        return issubclass(result_type, self.cls.accepts)


@dataclass(frozen=True)
class TransformEntry:
    """A registered block transform and the plugin that registered it."""

    cls: type[Transform]
    plugin: PluginInfo

    @property
    def name(self) -> str:
        return self.cls.name


_Entry = TypeVar("_Entry", AlgorithmEntry, TransformEntry)


@dataclass
class Plugins:
    """A pluggy manager plus what the host learned while loading it."""

    pm: pluggy.PluginManager
    info: dict[str, PluginInfo] = field(default_factory=dict)
    broken: list[PluginInfo] = field(default_factory=list)
    _algorithms: dict[str, AlgorithmEntry] | None = None
    _formats: dict[str, FormatEntry] | None = None
    _transforms: dict[str, TransformEntry] | None = None

    def register(self, plugin: Any, name: str, distribution: str = "", version: str = "") -> None:
        """Register a plugin object (a module or an instance) under `name`."""
        self.pm.register(plugin, name=name)
        self.info[name] = PluginInfo(name, distribution or name, version)
        self._algorithms = self._formats = self._transforms = None

    def algorithms(self) -> dict[str, AlgorithmEntry]:
        """Return every registered algorithm by name.

        Raises:
            PluginError: two plugins register the same name, or a class lacks the interface.
        """
        if self._algorithms is None:
            collected = _collect(self, "llmquant_register_algorithms", "algorithm", _check_algorithm_class)
            self._algorithms = {name: AlgorithmEntry(cls, plugin) for name, (cls, plugin) in collected.items()}
        return self._algorithms

    def algorithm(self, name: str) -> AlgorithmEntry:
        """Return the algorithm called `name`, or raise naming the valid ones."""
        return self._named(self.algorithms(), "algorithm", name)

    def formats(self) -> dict[str, FormatEntry]:
        """Return every registered output format by name.

        Raises:
            PluginError: two plugins register the same name, or a class lacks the interface.
        """
        if self._formats is None:
            collected = _collect(self, "llmquant_register_formats", "format", _check_format_class)
            self._formats = {name: FormatEntry(cls, plugin) for name, (cls, plugin) in collected.items()}
        return self._formats

    def format_for(self, name: str, result_type: type, algo: str) -> FormatEntry:
        """Return the format called `name` ("auto": the default for `result_type`), checking it
        can store `result_type` results of algorithm `algo`.

        Raises:
            PluginError: unknown name (listing the valid ones), or a result the format cannot
                store (naming the formats that can).
        """
        found = self.formats()
        able = [f.name for f in found.values() if f.accepts(result_type)]
        if name == "auto":
            default = [f for f in found.values() if issubclass(result_type, f.cls.default_for)]
            if default:
                return default[0]
            if able:
                return found[able[0]]
            raise PluginError(f"no installed format stores {result_type.__name__} results of algorithm {algo!r} (see `llmquant formats`)")
        if name not in found:
            raise PluginError(f"unknown format {name!r}: available formats are {', '.join(sorted(found)) or 'none'} (see `llmquant formats`)")
        if not found[name].accepts(result_type):
            raise PluginError(
                f"format {name!r} cannot store {result_type.__name__} results of algorithm {algo!r}; "
                f"use one of: {', '.join(able) or 'none installed'}"
            )
        return found[name]

    def transforms(self) -> dict[str, TransformEntry]:
        """Return every registered block transform by name.

        Raises:
            PluginError: two plugins register the same name, or a class lacks the interface.
        """
        if self._transforms is None:
            collected = _collect(self, "llmquant_register_transforms", "transform", _check_transform_class)
            self._transforms = {name: TransformEntry(cls, plugin) for name, (cls, plugin) in collected.items()}
        return self._transforms

    def transform(self, name: str) -> TransformEntry:
        """Return the transform called `name`, or raise naming the valid ones."""
        return self._named(self.transforms(), "transform", name)

    def _named(self, found: dict[str, _Entry], kind: str, name: str) -> _Entry:
        """`found[name]`, or an error naming the installed ones and any plugin that failed to load."""
        if name in found:
            return found[name]
        hint = "".join(f"; plugin {b.name!r} ({b.distribution}) failed to load" for b in self.broken)
        raise PluginError(f"unknown {kind} {name!r}: installed {kind}s are {', '.join(sorted(found)) or 'none'}{hint} "
                          f"(see `llmquant {kind}s`)")

    def format_of(self, quantization_config: dict[str, Any]) -> FormatEntry | None:
        """Return the installed format that recognizes a checkpoint's ``quantization_config``."""
        return next((f for f in self.formats().values() if f.cls().recognizes(quantization_config)), None)


def get_plugin_manager(*, entry_points: bool = True) -> Plugins:
    """Return a new plugin manager.

    Args:
        entry_points: load plugins from the ``llmquant`` entry-point group (built-ins included,
            since they are declared there too). False gives an empty manager, for tests.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    if entry_points:
        _load_entry_points(plugins, os.environ.get(ENV_PLUGINS, "all"))
    return plugins


def _load_entry_points(plugins: Plugins, allow: str) -> None:
    allowed = {a.strip() for a in allow.split(",") if a.strip()}
    for ep in _entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else ""
        builtin = dist == BUILTIN_DISTRIBUTION
        if not builtin and "all" not in allowed and ep.name not in allowed:
            log.debug("skipping plugin %s from %s (%s=%s)", ep.name, dist, ENV_PLUGINS, allow)
            continue
        if plugins.pm.has_plugin(ep.name):
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %r from distribution %s %s failed to load: %s", ep.name, dist, version, reason)
            plugins.broken.append(PluginInfo(ep.name, dist, version, reason))
            continue
        plugins.register(module, ep.name, dist, version)


def _collect(plugins: Plugins, hook: str, kind: str, check: Callable[[Any, PluginInfo], None]) -> dict[str, tuple[Any, PluginInfo]]:
    """Call every implementation of a ``register`` hook; return name -> (class, plugin)."""
    found: dict[str, tuple[Any, PluginInfo]] = {}
    for impl in getattr(plugins.pm.hook, hook).get_hookimpls():
        plugin = plugins.info.get(impl.plugin_name, PluginInfo(impl.plugin_name, impl.plugin_name, ""))

        def register(cls: Any, plugin: PluginInfo = plugin) -> None:
            check(cls, plugin)
            if cls.name in found:
                other = found[cls.name][1]
                raise PluginError(
                    f"{kind} {cls.name!r} is registered twice: by plugin {other.name!r} "
                    f"({other.distribution}) and by plugin {plugin.name!r} ({plugin.distribution}); "
                    f"uninstall one, or limit third-party plugins with {ENV_PLUGINS}"
                )
            found[cls.name] = (cls, plugin)

        impl.function(register=register)
    return found


def _check_algorithm_class(cls: Any, plugin: PluginInfo) -> None:
    missing = [a for a in _REQUIRED_ATTRIBUTES if not hasattr(cls, a)]
    if not callable(getattr(cls, "quantize_weight", None)):
        missing.append("quantize_weight")
    if missing:
        raise PluginError(
            f"plugin {plugin.name!r} ({plugin.distribution}) registered {cls!r}, which lacks "
            f"{', '.join(missing)}: see llmquant.algorithm.Algorithm for the interface"
        )


def _check_format_class(cls: Any, plugin: PluginInfo) -> None:
    missing = [a for a in _FORMAT_ATTRIBUTES if not hasattr(cls, a)]
    missing += [m for m in _FORMAT_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise PluginError(
            f"plugin {plugin.name!r} ({plugin.distribution}) registered format {cls!r}, which lacks "
            f"{', '.join(missing)}: see llmquant.formats.OutputFormat for the interface"
        )


def _check_transform_class(cls: Any, plugin: PluginInfo) -> None:
    missing = [a for a in _TRANSFORM_ATTRIBUTES if not hasattr(cls, a)]
    missing += [m for m in _TRANSFORM_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise PluginError(
            f"plugin {plugin.name!r} ({plugin.distribution}) registered transform {cls!r}, which lacks "
            f"{', '.join(missing)}: see llmquant.transform.Transform for the interface"
        )
