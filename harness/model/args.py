"""Decoding of integer syscall arguments the way a C caller would pass them."""

from __future__ import annotations

from typing import Any, Mapping

from .constants import resolve
from .result import fail

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def c_int(value: Any, what: str) -> int:
    """Read an int argument as a C int would arrive: names resolved, wider values truncated to 32 bits."""
    if type(value) is int and INT_MIN <= value <= INT_MAX:
        return value
    if isinstance(value, str):
        try:
            value = resolve(value)
        except ValueError:
            raise fail("EINVAL", f"{what} {value!r} is not a known constant", "model") from None
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int):
        raise fail("EINVAL", f"{what} {value!r} is not an integer", "model")
    if INT_MIN <= value <= INT_MAX:
        return value
    return ((value - INT_MIN) % 2**32) + INT_MIN


def arg_int(args: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """args[key] as a C int; a missing argument without a default is EINVAL."""
    value = args.get(key, _MISSING)
    if type(value) is int and INT_MIN <= value <= INT_MAX:
        return value
    if value is _MISSING:
        if default is None:
            raise fail("EINVAL", f"missing argument {key!r}", "model")
        return default
    return c_int(value, key)


_MISSING = object()
