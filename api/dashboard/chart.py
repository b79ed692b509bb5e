"""Geometry of the compare view's scatter plot: data to SVG coordinates and axis ticks.

Pure functions; the template draws what they return."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Frame:
    width: int = 640
    height: int = 380
    left: int = 64
    right: int = 16
    top: int = 16
    bottom: int = 48


@dataclass
class Axis:
    lo: float
    hi: float
    ticks: list[float] = field(default_factory=list)


def nice_step(span: float, target: int = 5) -> float:
    """A step of 1, 2 or 5 times a power of ten giving about `target` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # unreachable


def axis(values: list[float], target: int = 5) -> Axis:
    """An axis covering `values` with round ends and ticks (a flat range is widened)."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = round((hi - lo) / step)
    return Axis(lo, hi, [round(lo + i * step, 10) for i in range(n + 1)])


def scale(v: float, ax: Axis, start: float, end: float) -> float:
    """Map v on the axis to the pixel range [start, end] (end may be below start)."""
    return start + (v - ax.lo) / (ax.hi - ax.lo) * (end - start)


def tick_label(v: float) -> str:
    return f"{v:g}"
