"""Argument checks shared by the loss layers: a number inside an interval, a name among the allowed ones.

Both raise ``InvalidInputError`` naming the argument, the value given and what is allowed.
"""

from __future__ import annotations

import math

from logitstore.errors import InvalidInputError


def number(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    """``value`` as a float in the given interval, else InvalidInputError naming both."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}={value!r} is not a number") from None
    ok = math.isfinite(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise InvalidInputError(f"{name}={value!r} is not allowed; it must be in {interval}")
    return x


def choice(name: str, value, allowed: tuple) -> str:
    if value not in allowed:
        raise InvalidInputError(f"{name}={value!r} is not allowed; choose from {', '.join(allowed)}")
    return value
