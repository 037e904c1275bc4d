"""One error hierarchy. Every message says what failed, which object, and how to fix it.

The CLI turns any `LlmquantError` into a one-line message and exit code 1; anything else
keeps its traceback, because it is a bug rather than bad input.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LlmquantError", "ConfigError", "PluginError", "ShapeError", "CheckpointError"]


class LlmquantError(Exception):
    """Bad input or environment that the user can fix."""


class ConfigError(LlmquantError):
    """A config field has a bad value.

    Example:
        >>> str(ConfigError("group_size", -1, "a positive int, or omit for per-channel"))
        'group_size: expected a positive int, or omit for per-channel, got -1'
    """

    def __init__(self, field: str, value: Any, expected: str, *, where: str | None = None) -> None:
        self.field, self.value, self.expected, self.where = field, value, expected, where
        location = f"{where}: {field}" if where else field
        super().__init__(f"{location}: expected {expected}, got {value!r}")


class PluginError(LlmquantError):
    """A plugin failed to load, or two plugins clash."""


class ShapeError(LlmquantError):
    """A tensor shape does not fit the requested quantization."""


class CheckpointError(LlmquantError):
    """The input checkpoint is missing, incomplete or not understood."""
