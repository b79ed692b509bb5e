"""The compare view's data: each finished job of one base model as a point of perplexity
change against bits per weight (or artifact size), and the Pareto front among them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from api.dashboard import chart
from api.dashboard.bpw import bits_per_weight
from api.dashboard.pareto import pareto_front
from api.dashboard.present import scheme

XAxis = Literal["bpw", "size"]
X_LABELS = {"bpw": "bits per weight", "size": "artifact size (MiB)"}
# Colour-blind-safe (Okabe-Ito) colours per method; unknown methods share grey.
METHOD_COLOURS = {"rtn": "#0072B2", "gptq": "#D55E00", "awq": "#009E73"}
OTHER_COLOUR = "#777777"


@dataclass(frozen=True)
class Point:
    job_id: str
    method: str
    scheme: str
    bpw: float
    size_bytes: int | None
    ppl_change_pct: float
    mixed: bool  # overrides change the scheme of some modules: bpw is of the main scheme
    on_front: bool = False

    def x(self, axis: XAxis) -> float | None:
        if axis == "bpw":
            return self.bpw
        return None if self.size_bytes is None else self.size_bytes / 2**20


def point_of(job_id: str, spec: dict[str, Any], results: dict[str, Any] | None) -> Point | None:
    """A finished job as a point; None when it has no perplexity change to plot."""
    change = (results or {}).get("ppl_change_pct")
    if change is None:
        return None
    size = results.get("size_bytes") or results.get("artifact_bytes")
    return Point(
        job_id=job_id,
        method=spec["method"],
        scheme=scheme(spec["method"], spec["bits"], spec["group_size"], spec["symmetric"]),
        bpw=bits_per_weight(spec["bits"], spec["group_size"], spec["symmetric"]),
        size_bytes=int(size) if size is not None else None,
        ppl_change_pct=float(change),
        mixed=bool(spec.get("overrides")),
    )


def with_front(points: Iterable[Point], axis: XAxis) -> list[Point]:
    """The plottable points, those on the Pareto front marked, sorted by x."""
    plottable = [p for p in points if p.x(axis) is not None]
    front = pareto_front([(p.x(axis), p.ppl_change_pct, p.job_id) for p in plottable])
    on = {job_id for _, _, job_id in front}
    marked = [Point(**{**p.__dict__, "on_front": p.job_id in on}) for p in plottable]
    return sorted(marked, key=lambda p: (p.x(axis), p.ppl_change_pct))


@dataclass(frozen=True)
class Dot:
    cx: float
    cy: float
    colour: str
    point: Point


@dataclass(frozen=True)
class Plot:
    frame: chart.Frame
    x_ticks: list[tuple[float, str]]  # (pixel, label)
    y_ticks: list[tuple[float, str]]
    dots: list[Dot]
    front_path: str  # SVG polyline points of the Pareto front, in x order
    x_label: str
    zero_y: float | None  # pixel row of 0 % change when it is in range


def plot(points: list[Point], axis: XAxis, frame: chart.Frame | None = None) -> Plot | None:
    """SVG geometry of `points` (from with_front); None when there is nothing to draw."""
    if not points:
        return None
    f = frame or chart.Frame()
    xs = [p.x(axis) for p in points]
    ys = [p.ppl_change_pct for p in points]
    ax, ay = chart.axis(xs), chart.axis([*ys, 0.0])
    x0, x1 = f.left, f.width - f.right
    y0, y1 = f.height - f.bottom, f.top  # larger changes are higher up

    def px(v: float) -> float:
        return round(chart.scale(v, ax, x0, x1), 1)

    def py(v: float) -> float:
        return round(chart.scale(v, ay, y0, y1), 1)

    dots = [
        Dot(px(p.x(axis)), py(p.ppl_change_pct), METHOD_COLOURS.get(p.method, OTHER_COLOUR), p)
        for p in points
    ]
    front = " ".join(f"{d.cx},{d.cy}" for d in dots if d.point.on_front)
    return Plot(
        frame=f,
        x_ticks=[(px(t), chart.tick_label(t)) for t in ax.ticks],
        y_ticks=[(py(t), chart.tick_label(t)) for t in ay.ticks],
        dots=dots,
        front_path=front,
        x_label=X_LABELS[axis],
        zero_y=py(0.0) if ay.lo <= 0 <= ay.hi else None,
    )
