"""Small conversions of values for messages, files and plots, shared by every module."""

from __future__ import annotations

import math
from typing import Any


def is_numeric(value: Any) -> bool:
    """Whether the value is an int or a float, NaN and inf included (a bool is not one;
    :func:`finite` also rules out NaN and inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> float | None:
    """The value as a float when it is a finite number (not bool, NaN or inf), else None."""
    if is_numeric(value) and math.isfinite(value):
        return float(value)
    return None


def is_count(value: Any, minimum: int = 1) -> bool:
    """Whether the value is a whole number >= ``minimum`` (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def short(value: Any) -> str:
    """Four significant digits for floats, ``str`` for the rest."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error's text, or its type's name."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else "error"
