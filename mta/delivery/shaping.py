"""Per-destination traffic shaping (``gateway.shaping``): Postfix's destination concurrency and rate
delay, KumoMTA's shaping.

A *destination* is what one rule of ``gateway.shaping`` budgets: the domain for an exact rule
(``gmail.com``) and for ``*`` (each domain on its own), the rule itself for a suffix rule
(``*.outlook.com``: every domain under it, or whose MX hosts are under it, shares one budget, since
one provider answers for all of them). The first rule that matches wins; a domain no rule matches is
not shaped at all.

Each destination has, per gateway process (a worker takes its share, as with a connector's limits):

* ``max_connections``: transactions in flight at once (the client pool reuses connections, so the
  destination never sees more connections than that from us);
* ``messages_per_minute``: transactions started no closer together than ``60 / rate`` seconds;
* a back-off: a ``421`` from the destination, or :data:`BURST` temporary failures in a row, halves
  its connections (at least one) and pauses it for ``back_off_on_421``; recipients that meet the
  pause are held until it ends (not counted as an attempt). The next success restores the configured
  connections. One back-off per pause: the other connections' 421s from the same moment are not
  more news.

The deliverer asks :meth:`Shaper.destination` for each hop, :meth:`Shaper.enter` before a send and
:meth:`Shaper.leave` with the verdict after it. :meth:`Shaper.snapshot` is what ``smtpgw queue
summary`` and the metrics show.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer, task
from twisted.logger import Logger

from mta.config.model import ShapingRule
from mta.model.nexthop import Hop, RecipientResult

log = Logger(namespace="smtpgw.shaping")

BURST = 3           # temporary failures in a row (no success between) that count as "slow down"


class Verdict(Enum):
    OK = "ok"               # the destination took at least one recipient
    BUSY = "busy"           # it answered 421: slow down now
    TEMPORARY = "temporary"     # nothing taken, a 4xx: a burst of these slows it down
    NEUTRAL = "neutral"     # a permanent refusal, or our own failure: says nothing about its load


def verdict_of(reply_codes: Iterable[int]) -> Verdict:
    """The verdict of one transaction from the codes it got (one per recipient, or the hop's)."""
    codes = list(reply_codes)
    if any(c == 421 for c in codes):
        return Verdict.BUSY
    if any(c < 400 for c in codes):
        return Verdict.OK
    if codes and all(400 <= c < 500 for c in codes):
        return Verdict.TEMPORARY
    return Verdict.NEUTRAL


def verdict_of_results(results: Sequence[RecipientResult]) -> Verdict:
    return verdict_of(r.reply.code for r in results)


def matches(pattern: str, domain: str, host: str) -> bool:
    """``pattern`` (``*``, ``*.suffix`` or a name) against the destination domain or the MX host name."""
    if pattern == "*":
        return True
    names = (domain, host) if host else (domain,)
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return any(n.endswith(suffix) for n in names)
    return pattern in names


@dataclass(eq=False)
class Destination:
    """One destination's budget and state in this process."""

    name: str
    rule: ShapingRule
    configured: int | None          # this process's share of max_connections (None: no limit)
    interval: float                 # seconds between two starts (0: no rate limit)
    limit: int | None = None        # connections allowed now (less than configured after a back-off)
    in_flight: int = 0
    next_start: float = 0.0
    paused_until: float = 0.0
    streak: int = 0                 # temporary failures in a row
    back_offs: int = 0
    sent: int = 0
    last_trouble: str = ""
    waiters: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.limit = self.configured

    @property
    def slowed(self) -> bool:
        return self.limit != self.configured

    def state(self, now: float) -> str:
        if self.paused_until > now:
            return "paused"
        return "slowed" if self.slowed else "normal"


class Shaper:
    """The destinations of ``gateway.shaping`` in this process."""

    def __init__(self, rules: Sequence[ShapingRule], clock: Any,
                 share: Callable[[int | None], int | None] = lambda n: n, parts: int = 1) -> None:
        """``share`` gives this process's part of a connection limit and ``parts`` the number of
        processes sharing the rate (``gateway.workers``)."""
        self.rules = tuple(rules)
        self.clock = clock
        self.share = share
        self.parts = max(1, parts)
        self._destinations: dict[str, Destination] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def configure(self, rules: Sequence[ShapingRule]) -> None:
        """New rules (a reload): destinations whose rule changed start over; the rest keep their state."""
        self.rules = tuple(rules)
        self._destinations = {k: d for k, d in self._destinations.items() if d.rule in self.rules}

    def destination(self, domain: str, hop: Hop | None = None) -> Destination | None:
        """The destination a send of ``domain``'s mail through ``hop`` counts against, if shaped."""
        domain = domain.lower().rstrip(".")
        host = (hop.name or "").lower().rstrip(".") if hop is not None else ""
        for rule in self.rules:
            if matches(rule.match, domain, host):
                name = domain if rule.match == "*" or not rule.match.startswith("*.") else rule.match
                dest = self._destinations.get(name)
                if dest is None or dest.rule is not rule:
                    dest = self._destinations[name] = self._new(name, rule)
                return dest
        return None

    def _new(self, name: str, rule: ShapingRule) -> Destination:
        rate = rule.messages_per_minute
        interval = 60.0 * self.parts / rate if rate else 0.0
        return Destination(name, rule, self.share(rule.max_connections), interval)

    async def enter(self, dest: Destination) -> float | None:
        """Wait for a place and the rate; None when the send may go, else the Unix time the
        destination's pause ends (the caller holds the recipients until then)."""
        while True:
            now = self.clock.seconds()
            if dest.paused_until > now:
                return dest.paused_until
            if dest.limit is None or dest.in_flight < dest.limit:
                break
            waiter: defer.Deferred = defer.Deferred()
            dest.waiters.append(waiter)
            await waiter
        dest.in_flight += 1
        if dest.interval:
            start = max(now, dest.next_start)
            dest.next_start = start + dest.interval
            if start > now:
                try:
                    await task.deferLater(self.clock, start - now, lambda: None)
                except BaseException:
                    self.leave(dest, Verdict.NEUTRAL)
                    raise
        return None

    def leave(self, dest: Destination, verdict: Verdict, reply: Any = None) -> None:
        """A send ended: count the verdict, then let the next one in."""
        dest.in_flight -= 1
        now = self.clock.seconds()
        if verdict is Verdict.OK:
            dest.sent += 1
            dest.streak = 0
            if dest.slowed and dest.paused_until <= now:
                log.info("shaping: destination {name} answers again; back to {limit} connections",
                         name=dest.name, limit=_limit(dest.configured))
                dest.limit = dest.configured
        elif verdict is Verdict.BUSY:
            self._back_off(dest, now, reply)
        elif verdict is Verdict.TEMPORARY:
            dest.streak += 1
            if dest.streak >= BURST:
                self._back_off(dest, now, reply)
        self._wake(dest)

    def _back_off(self, dest: Destination, now: float, reply: Any) -> None:
        dest.streak = 0
        if dest.paused_until > now:
            return                      # the same trouble, reported by another connection
        current = dest.limit if dest.limit is not None else dest.in_flight + 1
        dest.limit = max(1, current // 2)
        dest.paused_until = now + dest.rule.back_off_on_421
        dest.back_offs += 1
        dest.last_trouble = str(reply) if reply is not None else ""
        log.warn("shaping: destination {name} said {reply}: slowed to {limit} connection(s), paused "
                 "{pause:g}s", name=dest.name, reply=dest.last_trouble or "slow down", limit=dest.limit,
                 pause=dest.rule.back_off_on_421)
        if dest.rule.back_off_on_421:
            # waiters must learn of the pause's end even when nothing else is in flight
            self.clock.callLater(dest.rule.back_off_on_421, self._wake, dest)

    def _wake(self, dest: Destination) -> None:
        free = math.inf if dest.limit is None else dest.limit - dest.in_flight
        paused = dest.paused_until > self.clock.seconds()
        while dest.waiters and (free > 0 or paused):
            waiter = dest.waiters.popleft()
            if not waiter.called:
                waiter.callback(None)
                free -= 1

    def snapshot(self) -> list[dict[str, Any]]:
        """Every destination met so far: its budget, what it uses, and whether it is slowed or paused."""
        now = self.clock.seconds()
        return [{"destination": d.name, "match": d.rule.match, "state": d.state(now),
                 "max_connections": d.configured, "connections": d.limit, "in_flight": d.in_flight,
                 "messages_per_minute": d.rule.messages_per_minute, "sent": d.sent,
                 "paused_until": d.paused_until if d.paused_until > now else None,
                 "back_offs": d.back_offs, "last_trouble": d.last_trouble}
                for d in sorted(self._destinations.values(), key=lambda d: d.name)]


def merge_snapshots(snapshots: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The workers' :meth:`Shaper.snapshot` lists as one: counts summed, the worst state kept."""
    rank = {"normal": 0, "slowed": 1, "paused": 2}
    merged: dict[str, dict[str, Any]] = {}
    for rows in snapshots:
        for row in rows:
            into = merged.get(row["destination"])
            if into is None:
                merged[row["destination"]] = dict(row)
                continue
            for key in ("max_connections", "connections", "in_flight", "sent", "back_offs"):
                both = into[key] is not None and row[key] is not None     # None: no limit
                into[key] = into[key] + row[key] if both else None
            if rank[row["state"]] > rank[into["state"]]:
                into["state"], into["last_trouble"] = row["state"], row["last_trouble"]
            if row["paused_until"] and (into["paused_until"] or 0) < row["paused_until"]:
                into["paused_until"] = row["paused_until"]
    return [merged[k] for k in sorted(merged)]


def _limit(n: int | None) -> str:
    return "unlimited" if n is None else str(n)


__all__ = ["BURST", "Destination", "Shaper", "Verdict", "matches", "merge_snapshots", "verdict_of",
           "verdict_of_results"]
