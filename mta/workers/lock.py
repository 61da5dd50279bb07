"""One process per worker slot: ``<spool>/worker.<i>.lock`` held while that worker's queue runs."""
from __future__ import annotations

import fcntl
import os
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger


log = Logger(namespace="smtpgw.workers")


class OwnerLock:
    """``<spool>/worker.<i>.lock``, held while worker i's queue runs (released by the kernel when the
    process ends, however it ends). Waits, polling, while an earlier worker i still holds it."""

    def __init__(self, spool_dir: str, index: int, reactor: Any, poll: float = 0.5) -> None:
        self.path = os.path.join(os.path.abspath(spool_dir), f"worker.{index}.lock")
        self.index = index
        self.reactor = reactor
        self.poll = poll
        self._fd: int | None = None
        self._waiting: Any = None
        self._told = False

    def acquire(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._try(d)
        return d

    def _try(self, d: defer.Deferred) -> None:
        self._waiting = None
        try:
            if self._fd is None:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self._told:
                self._told = True
                log.warn("worker {index}: {path} is held (an earlier worker {index} is finishing); "
                         "waiting for it", index=self.index, path=self.path)
            self._waiting = self.reactor.callLater(self.poll, self._try, d)
            return
        except OSError:
            d.errback()
            return
        d.callback(None)

    def release(self) -> None:
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
