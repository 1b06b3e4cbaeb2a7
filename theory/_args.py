"""Argument checks shared by the theory modules (clear errors, contract §8 style)."""

from __future__ import annotations

import math
from numbers import Integral, Real


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a float in (0, 1], got {type(threshold).__name__}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"threshold must lie in (0, 1], got {threshold}; 0.95 keeps 95% of the tile "
            "probability mass"
        )
    return float(threshold)
