"""Log lines written off the session's hot path: collected on the reactor thread, written in batches.

Sessions only append to a list; a short timer (or a full batch) hands the list to a thread of the
reactor's pool, one batch at a time and in order, so a slow disk or syslog delays the log, never a
reply. ``close()`` writes what is left and is meant for shutdown: after it, a late line is written as
soon as the batches before it are (so nothing said while stopping is lost).

The buffer is bounded: ``full`` says that ``max_pending`` items wait to be written, and a producer
that cares (an SMTP session writing its protocol log) stops producing until ``when_drained`` calls it
back, once half of them are written. A client flooding commands faster than the disk takes their log
lines then waits for the disk instead of growing the gateway.

With a reactor that has no thread pool (``twisted.internet.task.Clock`` in tests) batches are written
on the calling thread, which keeps tests deterministic.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger(namespace="smtpgw.linebuffer")

T = TypeVar("T")


class LineBuffer(Generic[T]):
    """Batches items for ``write(batch)``; ``write`` runs in a thread and may raise (it is logged)."""

    def __init__(self, reactor: Any, write: Callable[[list[T]], None], name: str,
                 delay: float = 0.5, batch: int = 2000, max_pending: int = 20000) -> None:
        self.reactor = reactor
        self.write = write
        self.name = name
        self.delay = delay
        self.batch = batch
        self._items: list[T] = []
        self._timer: Any = None
        self._tail: defer.Deferred = defer.succeed(None)     # the last batch handed out
        self._closed = False
        self._threaded = hasattr(reactor, "getThreadPool")
        self.max_pending = max_pending
        self.pending = 0                # items added and not yet written (or failed)
        self._drain_waiters: list[Callable[[], None]] = []

    @property
    def full(self) -> bool:
        return self.pending >= self.max_pending

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, on the reactor thread) when the backlog is down to half of
        ``max_pending``; at once if it already is."""
        if self.pending <= self.max_pending // 2:
            callback()
        else:
            self._drain_waiters.append(callback)

    def add(self, item: T) -> None:
        self._items.append(item)
        self.pending += 1
        if self._closed or len(self._items) >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = self.reactor.callLater(self.delay, self.flush)

    def flush(self) -> defer.Deferred:
        """Hand over everything buffered; fires once it (and every batch before it) is written."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._items:
            items, self._items = self._items, []
            self._tail.addBoth(lambda _: self._run(items))
        done: defer.Deferred = defer.Deferred()

        def fire(_: Any) -> None:
            done.callback(None)

        self._tail.addBoth(fire)
        return done

    def close(self) -> defer.Deferred:
        """Write everything now; later items are written at once instead of after a delay."""
        self._closed = True
        return self.flush()

    def _run(self, items: list[T]) -> Any:
        """Write one batch: in a thread while running; on this thread once closed (at shutdown the
        thread pool may already be stopping, and the last lines must not wait for it)."""
        if not self._threaded or self._closed:
            self._report(self._safe_write(items), len(items))
            return None
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._safe_write, items)
        return d.addCallbacks(self._report, self._failed, callbackArgs=(len(items),),
                              errbackArgs=(len(items),))

    def _safe_write(self, items: list[T]) -> BaseException | None:
        try:
            self.write(items)
        except Exception as e:      # reported on the reactor thread; never stops later batches
            return e
        return None

    def _report(self, error: BaseException | None, count: int) -> None:
        if error is not None:
            log.error("{name}: {count} line(s) could not be written: {error}", name=self.name,
                      count=count, error=error)
        self._written(count)

    def _failed(self, failure: Any, count: int) -> None:
        log.failure("{name}: writing failed", failure, name=self.name)
        self._written(count)

    def _written(self, count: int) -> None:
        self.pending -= count
        if self._drain_waiters and self.pending <= self.max_pending // 2:
            waiters, self._drain_waiters = self._drain_waiters, []
            for callback in waiters:
                try:
                    callback()
                except Exception:
                    log.failure("{name}: a producer failed to resume", name=self.name)
