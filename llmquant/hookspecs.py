"""The whole plugin contract. Plugins implement these hooks with `llmquant.hookimpl`.

A plugin is a module (or object) exposed through the ``llmquant`` entry-point group:

    [project.entry-points.llmquant]
    my_algo = "my_package.my_module"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from llmquant.algorithm import Algorithm
    from llmquant.formats import OutputFormat
    from llmquant.transform import Transform

__all__ = ["hookimpl", "hookspec", "llmquant_register_algorithms", "llmquant_register_formats", "llmquant_register_transforms"]

hookspec = pluggy.HookspecMarker("llmquant")
hookimpl = pluggy.HookimplMarker("llmquant")


@hookspec
def llmquant_register_algorithms(register: Callable[[type[Algorithm]], None]) -> None:
    """Register Algorithm classes by calling ``register(cls)`` once per class.

    Every implementation is called, once per plugin manager, when the host first needs the
    list of algorithms. A name registered by two plugins is an error naming both.
    """


@hookspec
def llmquant_register_formats(register: Callable[[type[OutputFormat]], None]) -> None:
    """Register output format classes (see `llmquant.formats.OutputFormat`) by calling
    ``register(cls)`` once per class.

    Every implementation is called, once per plugin manager, when the host first needs the
    list of formats. A name registered by two plugins is an error naming both.
    """




@hookspec
def llmquant_register_transforms(register: Callable[[type[Transform]], None]) -> None:
    """Register block transform classes (see `llmquant.transform.Transform`) by calling
    ``register(cls)`` once per class.

    Every implementation is called, once per plugin manager, when the host first needs the
    list of transforms. A name registered by two plugins is an error naming both.
    """
