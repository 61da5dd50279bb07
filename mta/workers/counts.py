"""Counts that the workers (``gateway.workers``) share, so that a virtual server's ``max_connections``
is the total of the whole gateway rather than a limit for each process.

Every worker maps one file, ``<spool>/worker.counts``, into memory (``MAP_SHARED``). It holds
8-byte signed integers in native byte order:

    word i                            (i < MAX_WORKERS)  the pid of the process now running as worker i
    word MAX_WORKERS * (1 + c) + i                       worker i's value of counter c

A counter is a virtual server, by its position in ``virtual_servers`` (every worker loads the same
configuration file). The counters are laid out one after another, so a configuration with more
virtual servers only makes the file longer; it is grown under ``flock`` and never shrunk, so no
mapping ever loses its pages. The file is sized for :data:`mta.config.workers.MAX_WORKERS`.

Why no lock is needed: a worker writes only its own slots, and it writes the absolute value it
keeps in memory (never a read-modify-write of the file), with one aligned 8-byte store; another
worker only reads. A check adds up the slots of workers ``0..N-1`` (slots of workers beyond N,
left from a run with more workers, are ignored).

What the numbers may get wrong, and by how much:

* **A race between workers.** Worker A reads the total, finds room and admits; worker B does the
  same at the same instant, before A's store is visible. Each worker checks and stores within one
  reactor callback, so at most one admission per other worker slips in: the total may overshoot
  the limit by at most N-1 connections, briefly.
* **A restarted worker.** When it opens the file it writes its pid into its owner word and zeroes
  its own slots, so it never inherits the count of a predecessor that died holding connections.
  Until then (the supervisor restarts a dead worker after about a second) the other workers still
  count the dead one's connections, and admit fewer. A predecessor still finishing (its supervisor
  was killed and a new gateway started) stops writing once it sees another pid in the owner word;
  a store racing with the takeover is overwritten by the new owner's next store.
"""
from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any

from twisted.logger import Logger

from mta.config.workers import MAX_WORKERS
from mta.workers import identity as workers

log = Logger(namespace="smtpgw.workers")

FILE_NAME = "worker.counts"
WORD = 8


class WorkerCounts:
    """One process's view of the shared file: it writes the slots of ``worker.index`` only."""

    def __init__(self, spool_dir: str, worker: workers.WorkerInfo, counters: int,
                 pid: int | None = None) -> None:
        self.path = os.path.join(os.path.abspath(spool_dir), FILE_NAME)
        self.worker = worker
        self.counters = counters
        self.pid = os.getpid() if pid is None else pid       # who holds the slots (tests pass their own)
        size = MAX_WORKERS * (1 + max(counters, 1)) * WORD
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)          # held for a stat and a truncate: microseconds
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)          # only ever grows: no mapping loses pages
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")
        self._claim()

    def _claim(self) -> None:
        """Take over this worker's slots: the predecessor's counts die with it."""
        i = self.worker.index
        self._words[i] = self.pid
        for counter in range(self.counters):
            self._words[self._slot(counter, i)] = 0

    @staticmethod
    def _slot(counter: int, index: int) -> int:
        return MAX_WORKERS * (1 + counter) + index

    @property
    def owner(self) -> bool:
        """False once a newer process has claimed this worker index (then we stop writing)."""
        return self._words[self.worker.index] == self.pid

    def store(self, counter: int, value: int) -> None:
        """Publish this worker's value of ``counter``. (Done twice a connection: the owner check and
        the slot are written out here rather than through ``owner`` and ``_slot``.)"""
        words, i = self._words, self.worker.index
        if words[i] == self.pid:
            words[MAX_WORKERS * (1 + counter) + i] = value

    def value(self, counter: int, index: int) -> int:
        return self._words[self._slot(counter, index)]

    def total(self, counter: int) -> int:
        """The sum over workers ``0..N-1``."""
        base = MAX_WORKERS * (1 + counter)
        return sum(self._words[base:base + self.worker.count])

    def others_at_most(self, counter: int, floor: int) -> bool:
        """Whether another worker's value of ``counter`` is ``floor`` or less (asked at every accept)."""
        words, me, base = self._words, self.worker.index, MAX_WORKERS * (1 + counter)
        for i in range(self.worker.count):
            if i != me and words[base + i] <= floor:
                return True
        return False

    def close(self) -> None:
        self._words.release()
        self._map.close()


_open: dict[tuple[str, int], WorkerCounts] = {}


def for_gateway(gateway: Any) -> WorkerCounts:
    """This process's one mapping (one claim, so one zeroing of its slots) for every virtual server."""
    worker = gateway.worker
    spool = os.path.abspath(gateway.config.gateway.spool)
    key = (spool, worker.index)
    counts = _open.get(key)
    needed = len(gateway.config.virtual_servers)
    if counts is None or counts.counters < needed:     # (every factory of a process has the same config)
        counts = _open[key] = WorkerCounts(spool, worker, needed)
    return counts


class SharedConnectionLimit:
    """One virtual server's ``max_connections`` counted over every worker.

    The file is opened once the reactor runs (after ``twistd -u`` has dropped privileges, so the
    file belongs to the user the workers run as), or at the first connection, whichever is first.
    If it cannot be opened the limit falls back to this process's own count, with an error logged.
    """

    def __init__(self, gateway: Any, counter: int) -> None:
        self.gateway = gateway
        self.counter = counter
        self._counts: WorkerCounts | None = None
        self._failed = False
        reactor = gateway.reactor
        when_running = getattr(reactor, "callWhenRunning", None)     # task.Clock in tests has none
        if when_running is not None:
            when_running(self.counts)

    @classmethod
    def for_factory(cls, gateway: Any, vs: Any) -> "SharedConnectionLimit | None":
        """None for a single-process gateway (or a virtual server not in the configuration)."""
        if not gateway.worker.many:
            return None
        for counter, candidate in enumerate(gateway.config.virtual_servers):
            if candidate is vs:
                return cls(gateway, counter)
        return None

    def counts(self) -> WorkerCounts | None:
        if self._counts is None and not self._failed:
            try:
                self._counts = for_gateway(self.gateway)
            except (OSError, ValueError):
                self._failed = True
                log.failure("cannot share connection counts with the other workers; "
                            "max_connections is counted per worker")
        return self._counts

    def total(self, mine: int) -> int:
        """The gateway's connections to this virtual server; ``mine`` is this process's own count
        (the factory's), which is all there is when the file could not be shared."""
        counts = self._counts if self._counts is not None else self.counts()
        return counts.total(self.counter) if counts is not None else mine

    def ahead(self, mine: int, margin: int = 2) -> bool:
        """Whether this worker holds at least ``margin`` more of the virtual server's connections
        (``mine``) than some other worker does: then the shared listener leaves the next one to the
        others. (A margin of one made a worker step back for about every other connection under a
        load of short sessions, each time two ``epoll_ctl`` calls and a turn of its loop more.)"""
        counts = self._counts if self._counts is not None else self.counts()
        return counts is not None and counts.others_at_most(self.counter, mine - margin)

    def publish(self, mine: int) -> None:
        """Tell the other workers this process's count."""
        counts = self._counts if self._counts is not None else self.counts()
        if counts is not None:
            counts.store(self.counter, mine)
