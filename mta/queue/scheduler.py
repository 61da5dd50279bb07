"""When each queued message is next due, and nothing else (OpenSMTPD's scheduler split).

It holds ``(time, id)`` pairs in a heap and keeps exactly one ``reactor.callLater`` armed for the
earliest, so a queue of a million deferred messages costs nothing per tick. Rescheduling an id
just pushes a new pair; the old one is recognised as stale when it reaches the top and dropped.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable


class Scheduler:
    def __init__(self, reactor: Any, on_due: Callable[[list[str]], None]) -> None:
        self._reactor = reactor
        self._on_due = on_due
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, tuple[float, int]] = {}
        self._seq = itertools.count()
        self._timer: Any = None
        self._timer_at: float | None = None
        self._stopped = False

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._due

    def when(self, entry_id: str) -> float | None:
        item = self._due.get(entry_id)
        return item[0] if item else None

    def schedule(self, entry_id: str, when: float) -> None:
        """Run ``entry_id`` at ``when`` (replacing any earlier plan for it)."""
        seq = next(self._seq)
        self._due[entry_id] = (when, seq)
        heapq.heappush(self._heap, (when, seq, entry_id))
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._compact()
        self._arm()

    def discard(self, entry_id: str) -> None:
        if self._due.pop(entry_id, None) is not None:
            self._arm()

    def stop(self) -> None:
        self._stopped = True
        self._cancel()

    def _compact(self) -> None:
        self._heap = [(w, s, i) for i, (w, s) in self._due.items()]
        heapq.heapify(self._heap)

    def _top(self) -> tuple[float, int, str] | None:
        while self._heap:
            when, seq, entry_id = self._heap[0]
            if self._due.get(entry_id) == (when, seq):
                return self._heap[0]
            heapq.heappop(self._heap)
        return None

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _arm(self) -> None:
        if self._stopped:
            return
        top = self._top()
        if top is None:
            self._cancel()
            return
        when = top[0]
        if self._timer is not None and self._timer.active() and self._timer_at == when:
            return
        self._cancel()
        self._timer_at = when
        self._timer = self._reactor.callLater(max(0.0, when - self._reactor.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._reactor.seconds()
        ready: list[str] = []
        while True:
            top = self._top()
            if top is None or top[0] > now:
                break
            heapq.heappop(self._heap)
            del self._due[top[2]]
            ready.append(top[2])
        self._arm()
        if ready:
            self._on_due(ready)
