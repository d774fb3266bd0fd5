"""Boundary checks of option values: each failure is an :class:`~stagewise.errors.InvalidOptionError` naming the option."""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import InvalidOptionError


def positive_number(name: str, value: object) -> float:
    """``value`` as a float, or ``InvalidOptionError`` unless it is a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise InvalidOptionError(f"{name} must be a finite number above 0 (milliseconds), got {value!r}")
    return float(value)


def nonnegative_budget(name: str, value: object) -> float:
    """A per-request budget in milliseconds as a float: any finite number of at least 0 (0: only the first stage runs).

    A whole number too large for a float (``10**400``) is ``inf``: no deadline (every stage fits, no
    timer is armed). Infinity, NaN, a negative number or a non-number is an ``InvalidOptionError``.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidOptionError(f"{name} must be a finite number of milliseconds, at least 0, got {value!r}")
    try:
        budget = float(value)
    except OverflowError:  # a whole number beyond the float range
        budget = math.inf if value > 0 else -math.inf
    else:
        if not math.isfinite(budget):
            budget = -1.0  # infinity and NaN are no number of milliseconds
    if budget < 0:
        raise InvalidOptionError(f"{name} must be a finite number of milliseconds, at least 0, got {value!r}")
    return budget


def positive_count(name: str, value: object) -> int:
    """``value`` as an int, or ``InvalidOptionError`` unless it is a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InvalidOptionError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


MAX_BUDGET_MS = 86_400_000.0
"""The largest latency budget accepted: one day, in milliseconds (anything longer means "no budget": pass ``None``)."""


def nonnegative_number(name: str, value: object, unit: str = "") -> float:
    """``value`` as a float, or ``InvalidOptionError`` unless it is a finite number of at least 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (
            value >= 0 if isinstance(value, Integral) else math.isfinite(value) and value >= 0):
        raise InvalidOptionError(f"{name} must be a finite number of at least 0{unit and ' ' + unit}, "
                                 f"got {_short(value)}")
    return float(value)


def index(name: str, value: object, count: int) -> int:
    """``value`` as an int, or ``InvalidOptionError`` unless it is a whole number from 0 to ``count - 1``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value < count:
        raise InvalidOptionError(f"{name} must be a whole number from 0 to {count - 1}, got {_short(value)}")
    return int(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
