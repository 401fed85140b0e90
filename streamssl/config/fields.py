"""What a configuration field is: a dataclass field with its help text and allowed range, and the error a
wrong value raises (sections.py and method_sections.py declare their fields with these)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any

from streamssl.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range. The message names the key."""


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with its help text and its allowed range."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices else None}
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta)


__all__ = ["ConfigError", "setting"]
