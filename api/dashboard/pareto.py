"""The Pareto front of (cost, loss) points: the configurations no other one beats on both.

Both coordinates are minimised (bits per weight or bytes; perplexity change). A point is on
the front when no other point is at most as large on both axes and smaller on one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def pareto_front(points: Sequence[tuple[float, float, T]]) -> list[tuple[float, float, T]]:
    """The non-dominated points of (x, y, payload), sorted by x ascending (so y descends).

    Of points equal on both axes, the first given is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[tuple[float, float, T]] = []
    best_y = float("inf")
    for i in order:
        x, y, payload = points[i]
        # Sorted by x then y: a point is dominated exactly when an earlier one has y <= its y.
        if y < best_y:
            front.append((x, y, payload))
            best_y = y
    return front
