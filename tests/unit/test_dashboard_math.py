"""The compare view's arithmetic: bits per weight from a spec, the Pareto front, the axes."""

from __future__ import annotations

import random

import pytest

from api.dashboard.bpw import bits_per_weight
from api.dashboard.chart import axis, nice_step
from api.dashboard.compare import plot, point_of, with_front
from api.dashboard.pareto import pareto_front


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "expected"),
    [
        (4, 128, True, 4 + 16 / 128),  # one fp16 scale per 128 weights
        (4, 128, False, 4 + (16 + 4) / 128),  # and a 4-bit zero point
        (3, 64, False, 3 + 19 / 64),
        (8, 32, True, 8.5),
        (4, -1, False, 4.0),  # per-channel: the overhead rounds to nothing
        (2, 256, False, 2 + 18 / 256),
    ],
)
def test_bits_per_weight(bits, group, symmetric, expected):
    assert bits_per_weight(bits, group, symmetric) == pytest.approx(expected)


def test_bits_per_weight_refuses_nonsense():
    with pytest.raises(ValueError, match="group_size"):
        bits_per_weight(4, 0, True)
    with pytest.raises(ValueError, match="bits"):
        bits_per_weight(0, 128, True)


def test_pareto_front_small_case():
    pts = [(4.2, 1.0, "a"), (3.2, 3.0, "b"), (4.2, 2.0, "c"), (8.1, 0.1, "d"), (5.0, 1.5, "e")]
    # c is beaten by a (same cost, less loss); e by a (cheaper and better).
    assert [p[2] for p in pareto_front(pts)] == ["b", "a", "d"]


def test_pareto_front_ties_and_empty():
    assert pareto_front([]) == []
    assert [p[2] for p in pareto_front([(1.0, 1.0, "x"), (1.0, 1.0, "y")])] == ["x"]
    # Equal loss at a higher cost is dominated.
    assert [p[2] for p in pareto_front([(1.0, 2.0, "x"), (2.0, 2.0, "y")])] == ["x"]


def test_pareto_front_matches_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 6), rng.randint(0, 6), i) for i in range(rng.randint(1, 25))]
        front = {p[2] for p in pareto_front(pts)}
        for x, y, i in pts:
            dominated = any(
                (ox <= x and oy <= y and (ox < x or oy < y)) for ox, oy, j in pts if j != i
            )
            duplicate_of_earlier = any((ox, oy) == (x, y) for ox, oy, j in pts if j < i)
            assert (i in front) == (not dominated and not duplicate_of_earlier), (pts, i)


def test_axis_covers_values_with_round_ticks():
    assert nice_step(1.0) == 0.2 and nice_step(37) == 10 and nice_step(0.07) == 0.02
    ax = axis([3.07, 4.15, 8.5])
    assert ax.lo <= 3.07 and ax.hi >= 8.5 and ax.ticks[0] == ax.lo and ax.ticks[-1] == ax.hi
    flat = axis([4.0, 4.0])
    assert flat.lo < 4.0 < flat.hi


def _spec(method, bits, group, symmetric=False, **extra):
    return {"method": method, "bits": bits, "group_size": group, "symmetric": symmetric, **extra}


def test_compare_points_and_front_geometry():
    jobs = [
        ("j1", _spec("rtn", 4, 128), {"ppl_change_pct": 6.0, "size_bytes": 300}),
        ("j2", _spec("gptq", 4, 128), {"ppl_change_pct": 2.0, "size_bytes": 310}),
        ("j3", _spec("rtn", 8, -1), {"ppl_change_pct": 0.1, "size_bytes": 500}),
        (
            "j4",
            _spec("awq", 3, 64, overrides=[{"pattern": "x", "bits": 8}]),
            {"ppl_change_pct": 9.0},
        ),
        ("j5", _spec("rtn", 4, 64), None),  # no figures: not plotted
    ]
    points = [p for j, s, r in jobs if (p := point_of(j, s, r))]
    assert [p.job_id for p in points] == ["j1", "j2", "j3", "j4"]
    assert points[3].mixed and points[3].size_bytes is None

    by_bpw = with_front(points, "bpw")
    assert [p.job_id for p in by_bpw if p.on_front] == ["j4", "j2", "j3"]
    # j1 loses to j2 at the same bits per weight, but by size it is the cheapest; j4 has no
    # size and drops out.
    by_size = with_front(points, "size")
    assert [p.job_id for p in by_size] == ["j1", "j2", "j3"]
    assert [p.job_id for p in by_size if p.on_front] == ["j1", "j2", "j3"]

    drawn = plot(by_bpw, "bpw")
    xs = {d.point.job_id: d.cx for d in drawn.dots}
    ys = {d.point.job_id: d.cy for d in drawn.dots}
    assert xs["j4"] < xs["j1"] == xs["j2"] < xs["j3"]  # cheaper is further left
    assert ys["j3"] > ys["j2"] > ys["j1"] > ys["j4"]  # worse is higher up (smaller pixel y)
    assert drawn.front_path.split() == [f"{xs[j]},{ys[j]}" for j in ("j4", "j2", "j3")]
    assert drawn.zero_y is not None and drawn.zero_y >= ys["j3"]
    assert plot([], "bpw") is None
