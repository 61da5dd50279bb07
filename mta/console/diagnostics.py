"""Diagnostics: the recent events diag_logging writes, kept in memory for the console's page.

The recorder listens to ``smtpgw_event`` like any plugin and keeps exactly the events the
``diag_logging`` plugin lets through (its ``levels`` per category, which follow SIGHUP): it asks that
plugin's ``wants_event``, so the console shows what the diagnostic log shows, and the server still skips
the per-command events nobody writes. Without diag_logging enabled it keeps nothing. It runs in the
process serving the console (worker 0), so with several workers it shows that worker's events.
"""
from __future__ import annotations

import time
from collections import deque
from urllib.parse import urlencode
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from mta.console.html import esc, table
from mta.plugin.hookspecs import hookimpl

KEEP = 2000
POLL_SECONDS = 5
# the categories of the hook contract (mta.plugin.hookspecs.smtpgw_event); others appear once seen
CATEGORIES = ("smtp_protocol", "connection_manager", "queuing_engine", "routing_engine", "categorizer", "ndr",
              "authentication", "transport_security")
LEVELS = ("minimum", "medium", "maximum")
PLUGIN = "diag_logging"


@dataclass(frozen=True)
class Event:
    at: float
    category: str
    level: str
    message: str
    fields: tuple[tuple[str, str], ...]


class Recorder:
    """The last :data:`KEEP` events that diag_logging writes (register it with the plugin manager)."""

    def __init__(self, hooks: Any, clock: Callable[[], float]) -> None:
        self.hooks = hooks
        self.clock = clock
        self.events: deque[Event] = deque(maxlen=KEEP)

    def _diag(self) -> Any:
        return self.hooks.pm.get_plugin(PLUGIN)

    @property
    def enabled(self) -> bool:
        return self._diag() is not None

    def wants_event(self, category: str, level: str) -> bool:
        diag = self._diag()
        return diag is not None and diag.wants_event(category, level)

    takes_event = wants_event       # ``smtpgw_event`` keeps exactly those

    @hookimpl
    def smtpgw_event(self, category: str, level: str, message: str, fields: Any) -> None:
        if self.wants_event(category, level):
            self.events.append(Event(self.clock(), category, level, message,
                                     tuple((str(k), str(v)) for k, v in dict(fields).items())))

    def categories(self) -> list[str]:
        return sorted({e.category for e in self.events})

    def select(self, category: str | None, level: str | None, limit: int = 500) -> list[Event]:
        """The newest events first, of ``category`` (None: all) at or under ``level`` (None: all)."""
        most = LEVELS.index(level) if level in LEVELS else len(LEVELS) - 1
        out: list[Event] = []
        for e in reversed(self.events):
            if (category and e.category != category) or (e.level in LEVELS and LEVELS.index(e.level) > most):
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out


def recorder(gateway: Any) -> Recorder:
    """A recorder fed by ``gateway``'s hooks."""
    r = Recorder(gateway.hooks, gateway.reactor.seconds)
    gateway.hooks.register(r, name="console-diagnostics")
    return r


def events_rows(events: Iterable[Event]) -> list[list[str]]:
    """Plain rows (time, category, level, message, fields) for the page."""
    return [[time.strftime("%H:%M:%S", time.gmtime(e.at)), e.category, e.level, e.message,
             " ".join(f"{k}={v}" for k, v in e.fields)] for e in events]


def events_table(recorder: Recorder | None, category: str | None, level: str) -> str:
    if recorder is None or not recorder.enabled:
        return ('<p class="empty">The diag_logging plugin is not enabled (<code>plugins.enabled</code>), '
                "so there are no diagnostic events to show.</p>")
    events = recorder.select(category, level)
    if not events:
        return '<p class="empty">No event yet at these settings (raise a category\'s level in <code>plugins.diag_logging.levels</code>).</p>'
    return table(f"The newest {len(events)} events, newest first", ["Time (UTC)", "Category", "Level", "Event", "Details"],
                 [[esc(c) for c in row] for row in events_rows(events)], "events")


def diagnostics_body(recorder: Recorder | None, category: str, level: str, events: str, now: float) -> str:
    known = sorted(set(CATEGORIES) | set(recorder.categories() if recorder else []))
    cats = '<option value="">every category</option>' + "".join(
        f'<option value="{esc(c)}"{" selected" if c == category else ""}>{esc(c)}</option>' for c in known)
    levels = "".join(f'<option value="{lv}"{" selected" if lv == level else ""}>{lv} and below</option>'
                     for lv in LEVELS)
    query = urlencode({"category": category, "level": level})
    lookup = ('<form method="get" action="/message" class="lookup">'
              '<label for="why-id">Why is a message where it is? Queue ID</label>'
              '<input id="why-id" name="id" required autocomplete="off" spellcheck="false">'
              '<button type="submit">Show its trace</button></form>')
    return lookup + (f'<div data-poll="/diagnostics.json?{esc(query)}" data-every="{POLL_SECONDS}">'
            '<form method="get" action="/diagnostics" class="act">'
            f'<label for="category">Category</label><select id="category" name="category">{cats}</select>'
            f'<label for="level">Level</label><select id="level" name="level">{levels}</select>'
            '<button type="submit">Show</button></form>'
            f'<p class="updated" id="updated" aria-live="polite">Updated {esc(time.strftime("%H:%M:%S UTC", time.gmtime(now)))}</p>'
            f'<div data-chart="events">{events}</div></div>')
