"""Per-client figures for Postfix anvil-style limits, shared by every worker of the gateway: each
client address's open connections, its connections in the current minute, its failed AUTH attempts
and its ETRN requests in their current windows (``limits.max_connections_per_client``,
``limits.max_connection_rate``, ``auth.max_failures_per_client``, etrn_dequeue's ``rate_limit``).

Why a shared hash table in memory, and not an anvil process as Postfix has: a connection is admitted
or refused in ``buildProtocol``, synchronously, and a round trip to another process per connection
would cost more than the rest of the admission. So, like ``worker.counts`` (mta/workers/counts.py),
every worker maps one file, ``<spool>/client.counts``, and writes only its own slots, absolute
values from one aligned 4-byte store each; a check adds up the slots of workers ``0..N-1``. No lock
is taken and no message is sent. A single-process gateway maps anonymous memory instead of the file.

Layout (native 4-byte signed integers): a header of ``HEADER`` words -- a format word, the base time
all stored times count from, and a 128-bit secret -- then one region per worker: an owner word (the
pid now writing the region) and ``BUCKETS`` buckets of ``FIELDS`` words::

    connections  open connections
    minute       the minute (time // 60) that ``rate`` counts
    rate         connections opened in that minute
    auth_start   when the current AUTH failure window began (seconds after the base time)
    auth_count   failures since then
    etrn_start   the same for ETRN (and DEQUEUE) requests
    etrn_count

A client (its address, with the virtual server's position in front, so each virtual server counts
on its own) goes to the bucket that a keyed BLAKE2b hash of it names. The key is the random secret,
made once with the file, so nobody outside can pick an address that shares a victim's bucket.

What the numbers may get wrong, and how: two clients in one bucket are counted together, so one may
be refused sooner than its own figures say, never admitted later (with 16,384 buckets, a client
shares its bucket with one of 1,000 others about 6% of the time, and then only their sum matters);
two workers admitting the same client at the same instant may overshoot by at most N-1, as with
``max_connections``. A restarted worker zeroes its own region, as ``worker.counts`` does; until then
the others still count the dead worker's figures.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from typing import Any

from twisted.logger import Logger

from mta.config.workers import MAX_WORKERS
from mta.workers import identity as workers

log = Logger(namespace="smtpgw.workers")

FILE_NAME = "client.counts"
FORMAT = 0x636C6E32             # "cln2"
WORD = 4
HEADER = 8                      # format, base time, 4 words of secret, 2 spare
BUCKETS = 1 << 14
FIELDS = 7
CONNECTIONS, MINUTE, RATE, AUTH_START, AUTH_COUNT, ETRN_START, ETRN_COUNT = range(FIELDS)
WINDOWS = {"auth": (AUTH_START, AUTH_COUNT), "etrn": (ETRN_START, ETRN_COUNT)}    # counts in a time window
REGION = 1 + BUCKETS * FIELDS   # owner word, then the buckets
SIZE = (HEADER + MAX_WORKERS * REGION) * WORD


class ClientCounts:
    """One process's view of the table; it writes the region of ``worker.index`` only."""

    def __init__(self, spool_dir: str | None, worker: workers.WorkerInfo, pid: int | None = None,
                 clock: Any = time.time) -> None:
        self.worker = worker
        self.pid = os.getpid() if pid is None else pid
        self.clock = clock
        self._mine = HEADER + (worker.index if spool_dir is not None else 0) * REGION
        if spool_dir is None:       # one process: nobody to share with; anonymous memory starts zeroed
            self._map = mmap.mmap(-1, (HEADER + REGION) * WORD)
            self._words = memoryview(self._map).cast("i")
            self._initialise(self._map, self._words, zeroed=True)
            self._words[self._mine] = self.pid
        else:
            self._map = self._open_shared(os.path.join(os.path.abspath(spool_dir), FILE_NAME))
            self._words = memoryview(self._map).cast("i")
        self.base = self._words[1]
        self.secret = self._map[2 * WORD:6 * WORD]

    def _open_shared(self, path: str) -> mmap.mmap:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)      # only while the file is made: the first worker sets it up
            try:
                size = os.fstat(fd).st_size
                if size < SIZE:
                    os.ftruncate(fd, SIZE)
                shared = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                words = memoryview(shared).cast("i")
                if size < SIZE or words[0] != FORMAT:
                    self._initialise(shared, words, zeroed=size == 0)
                words.release()
                self._claim(fd, shared)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return shared

    def _initialise(self, memory: mmap.mmap, words: memoryview, zeroed: bool) -> None:
        """A new table: the base time, a fresh secret, every figure zero. A file just made (or
        anonymous memory) reads as zeros already: writing them would make all of it resident
        (MAX_WORKERS regions, about 29 MB) in the process that made it, for nothing."""
        words[1] = int(self.clock()) - 1
        memory[2 * WORD:6 * WORD] = os.urandom(4 * WORD)
        if not zeroed:
            memory[HEADER * WORD:] = bytes(len(memory) - HEADER * WORD)
        words[0] = FORMAT

    def _claim(self, fd: int, shared: mmap.mmap) -> None:
        """Take over this worker's region: the predecessor's figures die with it. The region is read
        through the file rather than the mapping, and written only when a predecessor left figures
        in it, so that a worker's resident memory holds only the pages its clients' buckets touch."""
        start = self._mine
        first, end = (start + 1) * WORD, (start + REGION) * WORD
        left = os.pread(fd, end - first, first)
        if left.count(0) != len(left):
            shared[first:end] = bytes(end - first)
        struct.pack_into("i", shared, start * WORD, self.pid)

    @property
    def owner(self) -> bool:
        return self._words[self._mine] == self.pid

    # -- addressing ----------------------------------------------------------------------------

    def bucket(self, scope: int, client: str) -> int:
        """The word offset of ``client``'s bucket within a region (``scope``: the virtual server)."""
        digest = hashlib.blake2b(f"{scope}|{client}".encode(), key=self.secret, digest_size=4).digest()
        return 1 + (int.from_bytes(digest, "little") % BUCKETS) * FIELDS

    def _regions(self) -> range:
        if len(self._words) == HEADER + REGION:
            return range(HEADER, HEADER + 1)
        return range(HEADER, HEADER + self.worker.count * REGION, REGION)

    def _now(self) -> int:
        return int(self.clock()) - self.base

    # -- connections ---------------------------------------------------------------------------

    def connections(self, bucket: int) -> int:
        """Open connections of the bucket's client, gateway-wide."""
        words = self._words
        return sum(words[r + bucket + CONNECTIONS] for r in self._regions())

    def attempt(self, bucket: int) -> int:
        """Count a connection attempt; the bucket's attempts in this minute, gateway-wide, with it."""
        minute = self._now() // 60
        words, mine = self._words, self._mine + bucket
        if self.owner:
            if words[mine + MINUTE] != minute:
                words[mine + RATE] = 0
                words[mine + MINUTE] = minute
            words[mine + RATE] += 1
        return sum(words[r + bucket + RATE] for r in self._regions() if words[r + bucket + MINUTE] == minute)

    # opened/closed run at every connection: the owner check is written out (no property call)
    def opened(self, bucket: int) -> None:
        words = self._words
        if words[self._mine] == self.pid:
            words[self._mine + bucket + CONNECTIONS] += 1

    def closed(self, bucket: int) -> None:
        words, slot = self._words, self._mine + bucket + CONNECTIONS
        if words[self._mine] == self.pid and words[slot] > 0:
            words[slot] -= 1

    # -- counts in a window (AUTH failures, ETRN requests) ---------------------------------------

    def in_window(self, bucket: int, window: float, kind: str = "auth") -> int:
        """The bucket's client's events of ``kind`` (:data:`WINDOWS`) in windows still open, gateway-wide."""
        start, count = WINDOWS[kind]
        now, words = self._now(), self._words
        return sum(words[r + bucket + count] for r in self._regions() if now < words[r + bucket + start] + window)

    def count_in_window(self, bucket: int, window: float, kind: str = "auth") -> None:
        """Count an event: a new window starts when the last one has passed."""
        if not self.owner:
            return
        start, count = WINDOWS[kind]
        now, words, mine = self._now(), self._words, self._mine + bucket
        if now >= words[mine + start] + window or not words[mine + count]:
            words[mine + start] = now
            words[mine + count] = 0
        words[mine + count] += 1

    def auth_failures(self, bucket: int, window: float) -> int:
        return self.in_window(bucket, window, "auth")

    def auth_failed(self, bucket: int, window: float) -> None:
        self.count_in_window(bucket, window, "auth")

    def close(self) -> None:
        self._words.release()
        self._map.close()


def for_gateway(gateway: Any) -> ClientCounts:
    """The gateway's one table for every virtual server, made by the first listener (once
    ``gateway.worker`` is set): shared in ``<spool>`` with several workers, private memory with one.
    If the file cannot be opened, the counts are this process's own (an error is logged)."""
    counts = getattr(gateway, "client_counts", None)
    if counts is None:
        worker = gateway.worker
        counts = None
        if worker.many:
            try:
                counts = ClientCounts(gateway.config.gateway.spool, worker)
            except (OSError, ValueError):
                log.failure("cannot share per-client counts with the other workers; "
                            "per-client limits are counted per worker")
        gateway.client_counts = counts = counts or ClientCounts(None, worker)
    return counts
