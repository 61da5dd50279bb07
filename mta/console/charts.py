"""Server-rendered SVG line charts for the dashboard: no charting library, nothing fetched.

A chart is a ``<svg role="img">`` with a title and a text description (the figures a screen reader
needs), axes with round ticks, and one polyline per series; colours come from the stylesheet
(classes ``s0`` .. ``s5``), so the markup carries no style.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

from mta.console.html import esc

WIDTH, HEIGHT = 1000, 230
LEFT, RIGHT, TOP, BOTTOM = 52, 28, 12, 28


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above ``value`` (at least 1): the y axis top."""
    if value <= 1:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _label(value: float) -> str:
    return f"{value:g}" if value < 10000 else f"{value / 1000:g}k"


def _time_ticks(start: float, end: float) -> list[float]:
    span = end - start
    step = next((s for s in (300, 900, 1800, 3600, 7200) if span / s <= 6), 10800)
    first = math.ceil(start / step) * step
    return [t for t in range(int(first), int(end) + 1, step)]


def line_chart(ident: str, title: str, unit: str, start: float, end: float,
               series: Sequence[tuple[str, Sequence[tuple[float, float]]]]) -> str:
    """A chart of ``series`` (name, [(time, value)]) between ``start`` and ``end`` (Unix times)."""
    top = nice_ceiling(max((v for _, pts in series for _, v in pts), default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = max(1.0, end - start)

    def x(t: float) -> float:
        return LEFT + (min(max(t, start), end) - start) / span * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    parts = [f'<svg class="chart" id="{esc(ident)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-labelledby="{esc(ident)}-t {esc(ident)}-d" preserveAspectRatio="xMidYMid meet">']
    totals = ", ".join(f"{name}: {_label(sum(v for _, v in pts)) if unit.endswith('per minute') else _label(pts[-1][1] if pts else 0)}"
                       for name, pts in series)
    what = "total over the period" if unit.endswith("per minute") else "now"
    parts.append(f'<title id="{esc(ident)}-t">{esc(title)}</title>'
                 f'<desc id="{esc(ident)}-d">{esc(unit)}; {what}: {esc(totals or "no data yet")}</desc>')
    for i in range(5):                                  # horizontal grid and y labels
        v = top * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_label(v)}</text>')
    for t in _time_ticks(start, end):
        anchor = "end" if x(t) > WIDTH - RIGHT - 20 else "middle"
        parts.append(f'<text class="tick" x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
                     f'{time.strftime("%H:%M", time.gmtime(t))}</text>')
    for i, (name, pts) in enumerate(series):
        if not pts:
            continue
        if len(pts) == 1:
            (t, v), = pts
            parts.append(f'<circle class="s{i % 6}" cx="{x(t):.1f}" cy="{y(v):.1f}" r="3"/>')
            continue
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        parts.append(f'<polyline class="s{i % 6}" points="{coords}"><title>{esc(name)}</title></polyline>')
    parts.append("</svg>")
    legend = "".join(f'<li><span class="key s{i % 6}"></span>{esc(name)}</li>' for i, (name, _) in enumerate(series))
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'
