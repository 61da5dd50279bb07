"""Draining a gateway for maintenance (``smtpgw cluster drain``): new SMTP connections are refused
with ``421 4.3.2`` (mta/smtp/replies.py ``draining``), sessions already open finish, and the queue
goes on delivering what the node holds until it is empty; ``smtpgw cluster undrain`` ends it.

The state is a file in the spool, ``<spool>/draining`` (when it started), so that it holds for every
worker process and across a restart: a node taken out of service for maintenance stays out until
the operator puts it back, as Exchange's maintenance mode does. Worker 0 (the one answering the
control socket) writes it; the other workers look at it every :data:`POLL_SECONDS`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task, threads
from twisted.logger import Logger

log = Logger(namespace="smtpgw.drain")

MARKER = "draining"
POLL_SECONDS = 1.0          # workers other than 0: how soon they follow a drain or undrain
WATCH_SECONDS = 1.0         # worker 0, while draining: how soon "drained" is noticed


def _read(path: str) -> float | None:
    try:
        with open(path, encoding="ascii") as f:
            return float(f.read().strip() or 0) or time.time()
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return time.time()          # there but unreadable: still draining


def _write(path: str, since: float | None) -> None:
    if since is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{since:.3f}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Drain:
    """This process's view of the node's drain state. ``count()`` (set by mta.app.operator) gives the
    messages the node still holds, over every worker; ``changed()`` runs after each change of state
    (the cluster heartbeat registers at once)."""

    def __init__(self, spool: str, reactor: Any, writer: bool, name: str) -> None:
        self.path = os.path.join(spool, MARKER)
        self.reactor = reactor
        self.writer = writer
        self.name = name
        self.since: float | None = _read(self.path)   # once, at start-up: a drained node stays drained
        self.messages: int | None = None              # what the node held at the last look (writer)
        self.count: Callable[[], Awaitable[int]] | None = None
        self.changed: Callable[[], Any] = lambda: None
        self._loop = task.LoopingCall(self._look)
        self._loop.clock = reactor

    @property
    def active(self) -> bool:
        return self.since is not None

    def state(self) -> str:
        """``up``, ``draining`` (refusing connections, still holding mail) or ``drained`` (empty)."""
        if not self.active:
            return "up"
        return "drained" if self.messages == 0 else "draining"

    def start(self) -> None:
        if self.active and self.writer:
            log.warn("node {name} is draining (since {since}): new connections are refused with 421 4.3.2 "
                     "until `smtpgw cluster undrain {name}`", name=self.name, since=time.ctime(self.since))
        if not self.writer or self.active:
            self._loop.start(POLL_SECONDS if not self.writer else WATCH_SECONDS, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def set(self, on: bool) -> bool:
        """Start or end draining (worker 0); False when it already was so. The marker is on disk
        when this returns."""
        if on == self.active:
            return False
        since = time.time() if on else None
        await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _write, self.path, since)
        self.since, self.messages = since, None
        if on:
            log.info("node {name} draining: new connections are refused with 421 4.3.2; the queue goes on "
                     "delivering what it holds", name=self.name)
            if not self._loop.running:
                self._loop.start(WATCH_SECONDS, now=True)
        else:
            self.stop()
            log.info("node {name} back in service: accepting connections again", name=self.name)
        self.changed()
        return True

    def _look(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._look_async())

    async def _look_async(self) -> None:
        if not self.writer:
            self.since = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                         _read, self.path)
            return
        if self.active:
            await self.refresh()
        else:
            self.stop()

    async def refresh(self) -> None:
        """Count what the node still holds (``count``, over every worker)."""
        if self.count is not None:
            try:
                self.note(await self.count())
            except Exception:
                log.failure("drain: counting the queue failed")

    def note(self, messages: int) -> None:
        """What the node holds now; logs once when a draining node has become empty."""
        if not self.active:
            return
        before = self.state()
        self.messages = messages
        if before != "drained" and self.state() == "drained":
            log.info("node {name} drained: its queue is empty; it may be stopped for maintenance",
                     name=self.name)
            self.changed()
        elif before == "drained" and self.state() == "draining":
            self.changed()


__all__ = ["Drain", "MARKER"]
