"""The metric charts' geometry: steps left to right, values bottom to top, what cannot be drawn left out."""

from __future__ import annotations

import itertools
import math

from model_registry.charts import MAX_POINTS, line_chart, thin


def _xy(points: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in points.split())]


def test_steps_span_the_width_and_values_the_height() -> None:
    c = line_chart([(10, 1.0), (20, 3.0), (40, 2.0)], width=108, height=28)
    assert c is not None
    # 4 px of padding: x over 4..104 by step (10 → 4, 20 → 37.3, 40 → 104), y over 4..24 (high at the top)
    assert _xy(c.points) == [(4.0, 24.0), (37.3, 4.0), (104.0, 14.0)]
    assert (c.first_step, c.last_step, c.low, c.high, c.count, c.skipped) == (10, 40, 1.0, 3.0, 3, 0)


def test_unordered_steps_are_drawn_in_step_order() -> None:
    c = line_chart([(3, 0.0), (1, 2.0), (2, 1.0)], width=108, height=28)
    assert c is not None and [x for x, _ in _xy(c.points)] == [4.0, 54.0, 104.0]
    assert [y for _, y in _xy(c.points)] == [4.0, 14.0, 24.0]


def test_constant_and_stepless_metrics() -> None:
    flat = line_chart([(5, 0.5), (6, 0.5)], width=108, height=28)
    assert flat is not None and {y for _, y in _xy(flat.points)} == {14.0}  # across the middle
    stepless = line_chart([(0, 1.0), (0, 2.0), (0, 3.0)], width=108, height=28)  # logged without steps
    assert stepless is not None and [x for x, _ in _xy(stepless.points)] == [4.0, 54.0, 104.0]
    one = line_chart([(7, 0.9)], width=108, height=28)
    assert one is not None and _xy(one.points) == [(54.0, 14.0)]


def test_values_that_are_not_finite_are_counted_not_drawn() -> None:
    c = line_chart([(1, 1.0), (2, math.nan), (3, math.inf), (4, 0.0)], width=108, height=28)
    assert c is not None and len(_xy(c.points)) == 2 and (c.count, c.skipped) == (2, 2)
    assert line_chart([(1, math.nan)]) is None
    assert line_chart([]) is None


def test_long_histories_are_thinned_evenly_keeping_both_ends() -> None:
    history = [(i, float(i)) for i in range(10_001)]
    kept = thin(history)
    assert len(kept) == MAX_POINTS and kept[0] == (0, 0.0) and kept[-1] == (10_000, 10_000.0)
    gaps = {b[0] - a[0] for a, b in itertools.pairwise(kept)}
    assert gaps <= {25, 26}  # 10,000 steps over 399 gaps
    c = line_chart(history)
    assert c is not None and len(_xy(c.points)) == MAX_POINTS and c.count == 10_001
    assert thin(history[:5]) == history[:5]
