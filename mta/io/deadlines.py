"""One timer for many deadlines: the SMTP sessions' idle and data-rate limits.

A ``reactor.callLater`` per connection costs about 400 bytes (the DelayedCall, its bound methods,
the reactor's heap entry), 4 MB for 10,000 idle connections. :class:`Deadlines` keeps the objects
whose deadline falls in the same tick (``resolution`` seconds, one by default) in one set, and one
DelayedCall for the earliest tick. Joining or leaving costs a set operation; an object is told its
deadline has come at most one tick late, never early (the limits it serves are minutes long).
"""
from __future__ import annotations

import heapq
import math
from typing import Any, Protocol

from twisted.logger import Logger

log = Logger(namespace="smtpgw.io")


class Expiring(Protocol):
    def deadline_passed(self) -> None:
        """Called once the deadline it was added with has come (then it is no longer in the wheel)."""


class Deadlines:
    """Objects waiting for a deadline, grouped by tick, with one DelayedCall for the earliest."""

    def __init__(self, reactor: Any, resolution: float = 1.0) -> None:
        self.reactor = reactor
        self.resolution = resolution
        self._slots: dict[int, set[Expiring]] = {}
        self._ticks: list[int] = []         # heap of the slots' ticks (a tick whose slot emptied may linger)
        self._call: Any = None
        self._armed: int | None = None      # the tick self._call fires at

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def add(self, when: float, item: Expiring) -> int:
        """Tell ``item`` once ``when`` (reactor seconds) has passed; returns the key :meth:`remove` takes."""
        tick = math.ceil(when / self.resolution)
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = set()
            heapq.heappush(self._ticks, tick)
        slot.add(item)
        if self._armed is None or tick < self._armed:
            self._arm(tick)
        return tick

    def remove(self, key: int, item: Expiring) -> None:
        """``item`` no longer waits (its connection ended). The timer stays armed while anything
        waits (a tick that has emptied costs one wake-up at most) and stops when nothing does."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(item)
            if not slot:
                del self._slots[key]
                if not self._slots:
                    self._ticks.clear()
                    if self._call is not None and self._call.active():
                        self._call.cancel()
                    self._call = self._armed = None

    def _arm(self, tick: int) -> None:
        delay = max(0.0, tick * self.resolution - self.reactor.seconds())
        if self._call is not None and self._call.active():
            self._call.reset(delay)
        else:
            self._call = self.reactor.callLater(delay, self._fire)
        self._armed = tick

    def _fire(self) -> None:
        self._call = self._armed = None
        now = self.reactor.seconds()
        ticks = self._ticks
        while ticks and ticks[0] * self.resolution <= now:
            slot = self._slots.pop(heapq.heappop(ticks), None)
            for item in slot or ():
                try:
                    item.deadline_passed()      # may add itself again, always for a later tick
                except Exception:
                    log.failure("deadline of {item!r}", item=item)
        while ticks and ticks[0] not in self._slots:
            heapq.heappop(ticks)
        if ticks and (self._armed is None or ticks[0] < self._armed):
            self._arm(ticks[0])
