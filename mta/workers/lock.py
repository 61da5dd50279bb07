"""The locks on the spool: one gateway per spool (``<spool>/gateway.lock``, held by the gateway's
first process, which supervises the others), and one process per worker slot
(``<spool>/worker.<i>.lock``, held while that worker's queue runs). Both are ``flock`` locks, so the
kernel releases them when the process ends, however it ends."""
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


class SpoolInUse(Exception):
    """Another gateway holds the spool's lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(path, pid)
        self.path = path
        self.pid = pid


class SpoolLock:
    """``<spool>/gateway.lock``: taken before anything listens, so that a second gateway started on
    the same spool stops at once instead of delivering the same queue twice. It holds the pid of
    the gateway that has it. Workers started by that gateway do not take it: it is their supervisor's
    (the file descriptor is not inherited by any child)."""

    NAME = "gateway.lock"

    def __init__(self, spool_dir: str) -> None:
        self.path = os.path.join(os.path.abspath(spool_dir), self.NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`SpoolInUse` (naming the holder's pid when it wrote one);
        OSError when the file cannot be opened."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise SpoolInUse(os.path.dirname(self.path), holder) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.record_pid()

    def record_pid(self) -> None:
        """Write this process's pid (again after twistd has become a daemon: the lock survives the
        fork, the pid changes)."""
        if self._fd is not None:
            data = f"{os.getpid()}\n".encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def workers_running(spool_dir: str) -> list[int]:
    """The worker slots above 0 that a live process holds: an earlier run's workers still finishing
    after their supervisor was killed. Only probes: takes no lock for longer than a call."""
    held = []
    directory = os.path.abspath(spool_dir)
    try:
        names = os.listdir(directory)
    except OSError:
        return held
    for name in names:
        index = name[len("worker."):-len(".lock")]
        if not (name.startswith("worker.") and name.endswith(".lock") and index.isdigit() and int(index) > 0):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(int(index))
        except OSError:
            pass
        finally:
            os.close(fd)            # closing also drops a lock the probe took
    return held
