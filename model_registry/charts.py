"""A metric's history as a small line chart, drawn on the server (inline SVG: the pages need no script to
show a training curve, and the chart is plain markup a test can read)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_POINTS = 400  # a chart 400 px wide shows no more; longer histories are thinned evenly, ends kept


@dataclass(frozen=True)
class Chart:
    points: str  # the polyline's "x,y x,y ..." in the chart's own coordinates
    width: int
    height: int
    first_step: int
    last_step: int
    low: float
    high: float
    count: int  # finite points in the history (before thinning)
    skipped: int  # NaN or infinite values left out (MLflow stores them; a line cannot)


def thin(history: Sequence[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most `limit` points of `history`, evenly spaced by index, the first and the last kept."""
    n = len(history)
    if n <= limit:
        return list(history)
    return [history[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def line_chart(history: Sequence[tuple[int, float]], width: int = 320, height: int = 80) -> Chart | None:
    """The chart of (step, value) pairs in logged order (None when no value is finite). Steps go left to right
    over the chart's width (all at step 0, as a metric logged without steps is: spread by index); values
    bottom to top, a constant one drawn across the middle."""
    finite = [(s, v) for s, v in history if math.isfinite(v)]
    if not finite:
        return None
    finite.sort(key=lambda p: p[0])  # stable: values logged at one step keep their order
    shown = thin(finite)
    steps = [s for s, _ in shown]
    values = [v for _, v in shown]
    lo, hi = min(values), max(values)
    s0, s1 = steps[0], steps[-1]
    pad = 4  # room for the stroke at the edges
    w, h = width - 2 * pad, height - 2 * pad

    def x(i: int) -> float:
        if s1 == s0:
            return pad + (w * i / (len(shown) - 1) if len(shown) > 1 else w / 2)
        return pad + w * (steps[i] - s0) / (s1 - s0)

    def y(v: float) -> float:
        return pad + (h / 2 if hi == lo else h * (hi - v) / (hi - lo))

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    return Chart(
        points=points,
        width=width,
        height=height,
        first_step=s0,
        last_step=s1,
        low=lo,
        high=hi,
        count=len(finite),
        skipped=len(history) - len(finite),
    )
