"""The library entry point the CLI calls: `quantize`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from llmquant.config import resolve_config
from llmquant.host.runner import QuantizeReport, quantize_checkpoint
from llmquant.host.source import resolve_model
from llmquant.plugins import Plugins, get_plugin_manager

__all__ = ["quantize"]


def quantize(
    model: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    settings: Mapping[str, Any] | None = None,
    *,
    plugins: Plugins | None = None,
    overwrite: bool = False,
    resume: bool = False,
    where: str = "settings",
) -> QuantizeReport:
    """Quantize `model` into the folder `output`.

    Args:
        model: a checkpoint folder, a ``.gguf`` file, a hub id, or None for the default model.
        output: the folder to create; refused if it exists unless `overwrite`.
        settings: flat config keys (``algo``, ``format``, ``bits``, ``group_size``, ...), as in
            a TOML file from ``configs/``.
        plugins: a plugin manager; by default a new one with every installed plugin.
        resume: continue an interrupted run into the same output from its last finished block;
            refused if the model, settings, calibration data or versions changed.
        where: what to name in config errors (a file name, or "flags").

    Example:
        >>> quantize("path/to/model", "model-w4", {"algo": "rtn", "bits": 4, "group_size": 64})
    """
    plugins = plugins or get_plugin_manager()
    settings = dict(settings or {})
    entry = plugins.algorithm(str(settings.get("algo", "rtn")))
    fmt = plugins.format_for(str(settings.get("format", "auto")), entry.cls.result_type, entry.name)
    names = settings.get("transforms", ())
    transforms = [plugins.transform(str(n)).cls.config_type for n in ([names] if isinstance(names, str) else names)]
    config, algo_config = resolve_config(settings, entry.cls.config_type, where=where,
                                         format_options=getattr(fmt.cls, "options_type", None), transform_types=transforms)
    source = resolve_model(model)
    return quantize_checkpoint(source, Path(output), config, algo_config, plugins, overwrite=overwrite, resume=resume)
