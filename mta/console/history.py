"""The dashboard's figures over time: the gateway's counters sampled every minute, kept for six hours.

The counts come from the Prometheus counters every worker keeps (:class:`mta.ops.metrics.GatewayMetrics`,
fed by hooks), read the way worker 0's metrics page reads them: its own snapshot, and each other
worker's over its control socket (the ``metrics`` request). A minute's figure is the difference between
two samples, so nothing else in the gateway counts twice. A worker that restarted (its counters back
at 0) contributes nothing to that minute rather than a negative figure.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger(namespace="smtpgw.console")

PERIOD = 60.0                       # one point a minute
KEEP = 6 * 60                       # six hours of points
COUNTERS = {                        # sample name -> the dashboard's name
    "smtpgw_messages_received_total": "received",
    "smtpgw_recipients_delivered_total": "delivered",
    "smtpgw_recipients_deferred_total": "deferred",
    "smtpgw_recipients_bounced_total": "bounced",
}
FLOWS = tuple(COUNTERS.values())


@dataclass
class Totals:
    """One reading of the whole gateway: cumulative counters per worker, and the gauges now."""
    at: float
    counters: dict[int, dict[str, float]] = field(default_factory=dict)        # worker -> name -> total
    connections: dict[int, dict[str, float]] = field(default_factory=dict)     # worker -> vs -> total
    active: dict[str, float] = field(default_factory=dict)                      # vs -> open now
    queue: float = 0.0
    oldest: float = 0.0


def add_snapshot(totals: Totals, worker: int, families: list[dict[str, Any]]) -> None:
    """Fold one worker's :meth:`GatewayMetrics.snapshot` into ``totals``."""
    counters = totals.counters.setdefault(worker, {})
    connections = totals.connections.setdefault(worker, {})
    for family in families:
        for name, labels, value in family.get("samples", []):
            if name in COUNTERS:
                counters[COUNTERS[name]] = value
            elif name == "smtpgw_connections_total":
                connections[labels.get("virtual_server", "")] = value
            elif name == "smtpgw_connections_active":
                vs = labels.get("virtual_server", "")
                totals.active[vs] = totals.active.get(vs, 0.0) + value
            elif name == "smtpgw_queue_messages":
                totals.queue += value
            elif name == "smtpgw_queue_oldest_age_seconds":
                totals.oldest = max(totals.oldest, value)


def _delta(new: dict[int, dict[str, float]], old: dict[int, dict[str, float]], key: str) -> float:
    out = 0.0
    for worker, figures in new.items():
        before = old.get(worker, {}).get(key)
        now = figures.get(key, 0.0)
        if before is not None and now >= before:
            out += now - before
    return out


@dataclass
class Point:
    """One minute (or the minute so far, for the newest point)."""
    at: float
    flows: dict[str, float]             # received, delivered, deferred, bounced in that minute
    connections: dict[str, float]       # new connections per virtual server in that minute
    active: dict[str, float]
    queue: float
    oldest: float

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, **self.flows, "connections": self.connections, "active": self.active,
                "queue": self.queue, "oldest": self.oldest}


def point(new: Totals, old: Totals) -> Point:
    names = {vs for figures in new.connections.values() for vs in figures}
    return Point(new.at, {k: _delta(new.counters, old.counters, k) for k in FLOWS},
                 {vs: _delta(new.connections, old.connections, vs) for vs in sorted(names)},
                 dict(new.active), new.queue, new.oldest)


Reader = Callable[[], Awaitable[Totals]]


def reader(metrics: Any, count: int, ask: Callable[[int, dict[str, Any]], Awaitable[dict[str, Any]]] | None,
           clock: Callable[[], float]) -> Reader:
    """``read()``: the gateway's :class:`Totals` now, this worker's from ``metrics`` and the others'
    asked with ``ask(index, request)`` (a worker that does not answer is left out of this reading)."""
    async def read() -> Totals:
        totals = Totals(clock())
        add_snapshot(totals, 0, metrics.snapshot())
        for index in range(1, count if ask is not None else 1):
            answer = await ask(index, {"op": "metrics"})
            if isinstance(answer, dict) and answer.get("ok"):
                add_snapshot(totals, index, answer.get("families") or [])
        return totals
    return read


class History(service.Service):
    """The last :data:`KEEP` minutes, sampled every :data:`PERIOD` seconds while the gateway runs."""

    name = "smtpgw-console-history"

    def __init__(self, read: Reader, reactor: Any) -> None:
        self.read = read
        self.reactor = reactor
        self.points: deque[Point] = deque(maxlen=KEEP)
        self.last: Totals | None = None
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(self.sample()))
        self._loop.clock = self.reactor
        self._loop.start(PERIOD, now=True).addErrback(lambda f: log.failure("console: sampling stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def sample(self) -> None:
        try:
            totals = await self.read()
        except Exception as e:           # never stop sampling for one bad reading
            log.warn("console: cannot read the figures: {e}", e=e)
            return
        if self.last is not None:
            self.points.append(point(totals, self.last))
        self.last = totals

    async def series(self, hours: float) -> list[Point]:
        """The points of the last ``hours``, and the minute so far as the newest one (so what was
        just sent shows at once)."""
        now = await self.read()
        recent = [p for p in self.points if p.at >= now.at - hours * 3600]
        if self.last is not None:
            recent.append(point(now, self.last))
        return recent
