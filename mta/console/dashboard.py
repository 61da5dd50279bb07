"""The dashboard: how the last hours went, as figures and server-rendered SVG charts.

The page is whole without JavaScript; with it, the charts and figures are replaced every
:data:`POLL_SECONDS` from ``/dashboard.json``, which carries the same SVG (rendered here) and the raw
points for scripts.
"""
from __future__ import annotations

import time
from typing import Any

from mta.console.charts import line_chart
from mta.console.history import FLOWS, Point
from mta.console.html import age, esc

POLL_SECONDS = 10
PERIODS = (1, 3, 6)             # hours the page offers


def charts(points: list[Point], now: float, hours: float) -> dict[str, str]:
    start = now - hours * 3600
    flows = [(name, [(p.at, p.flows[name]) for p in points]) for name in FLOWS]
    names = sorted({vs for p in points for vs in p.connections})
    connections = [(vs, [(p.at, p.connections.get(vs, 0.0)) for p in points]) for vs in names]
    return {
        "messages": line_chart("chart-messages", "Messages per minute", "messages and recipients per minute",
                               start, now, flows),
        "queue": line_chart("chart-queue", "Queue depth", "messages in the queue", start, now,
                            [("queued messages", [(p.at, p.queue) for p in points])]),
        "oldest": line_chart("chart-oldest", "Oldest queued message", "age in minutes", start, now,
                             [("oldest message age (minutes)", [(p.at, p.oldest / 60) for p in points])]),
        "connections": line_chart("chart-connections", "Connections per virtual server",
                                  "new connections per minute", start, now, connections),
    }


def figures(points: list[Point]) -> str:
    total = {name: sum(p.flows[name] for p in points) for name in FLOWS}
    last = points[-1] if points else None
    cards = [(f"{total[n]:g}", f"{n} in the period") for n in FLOWS]
    if last is not None:
        cards += [(f"{last.queue:g}", "queued now"), (age(last.oldest) if last.queue else "-", "oldest now"),
                  (f"{sum(last.active.values()):g}", "connections open now")]
    return "".join(f'<div class="figure"><span class="value">{esc(v)}</span><span class="label">{esc(label)}</span></div>'
                   for v, label in cards)


def active_table(points: list[Point]) -> str:
    last = points[-1] if points else None
    if last is None or not last.active:
        return ""
    rows = "".join(f'<tr><td data-label="Virtual server">{esc(vs)}</td><td data-label="Open now">{n:g}</td></tr>'
                   for vs, n in sorted(last.active.items()))
    return ('<table class="active"><caption>Connections open now</caption><thead><tr><th scope="col">Virtual server</th>'
            f'<th scope="col">Open now</th></tr></thead><tbody>{rows}</tbody></table>')


def updated(now: float) -> str:
    return f"Updated {time.strftime('%H:%M:%S UTC', time.gmtime(now))}"


def dashboard_body(points: list[Point], now: float, hours: float) -> str:
    drawn = charts(points, now, hours)
    options = "".join(f'<option value="{h}"{" selected" if h == hours else ""}>the last {h} hour{"s" if h > 1 else ""}</option>'
                      for h in PERIODS)
    box = lambda name: f'<div class="chart-box" data-chart="{name}">{drawn[name]}</div>'     # noqa: E731
    return (f'<div id="dashboard" data-poll="/dashboard.json?hours={hours:g}" data-every="{POLL_SECONDS}">'
            '<form method="get" action="/dashboard" class="act"><label for="hours">Period</label>'
            f'<select id="hours" name="hours">{options}</select><button type="submit">Show</button></form>'
            f'<p class="updated" id="updated" aria-live="polite">{updated(now)}</p>'
            f'<div class="figures" data-chart="figures">{figures(points)}</div>'
            f'<h2>Mail flow</h2>{box("messages")}'
            f'<h2>Queue</h2>{box("queue")}{box("oldest")}'
            f'<h2>Connections</h2>{box("connections")}<div data-chart="active">{active_table(points)}</div></div>')


def dashboard_json(points: list[Point], now: float, hours: float) -> dict[str, Any]:
    return {"updated": updated(now), "charts": {**charts(points, now, hours), "figures": figures(points),
                                                "active": active_table(points)},
            "points": [p.as_json() for p in points]}
