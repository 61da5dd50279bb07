"""Which worker this process is, and the queue ids it makes and owns (see :mod:`mta.workers`)."""
from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from mta.config.workers import resolve_count

log = Logger(namespace="smtpgw.workers")


ENV_INDEX = "SMTPGW_WORKER"          # in a worker started by the supervisor: its index, 1..N-1
ENV_COUNT = "SMTPGW_WORKERS"         # ... and N
ENV_FDS = "SMTPGW_LISTEN_FDS"        # ... and its inherited listening sockets: "host:port:tls=fd;..."
_TAG = re.compile(r"-(\d{1,2})$")


def owner_of(entry_id: str, count: int) -> int:
    """The worker that owns a queue id (or a spool file name made from one)."""
    if count <= 1:
        return 0
    m = _TAG.search(entry_id.split(".", 1)[0])
    return int(m.group(1)) % count if m else 0


def retag(entry_id: str, index: int) -> str:
    """The id a queue entry takes when worker ``index`` takes it over (ATRN collecting the mail other
    workers hold): the same base, the new owner's suffix. The same for a given entry and worker, so
    a hand-over interrupted by a crash can be recognised on disk (mta/spool/store.py)."""
    base = _TAG.sub("", entry_id)
    return f"{base}-{index}" if index else base


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker this process is; ``count == 1`` is the plain single-process gateway."""

    index: int = 0
    count: int = 1
    listen_fds: dict[str, int] = field(default_factory=dict)

    @property
    def many(self) -> bool:
        return self.count > 1

    @property
    def supervisor(self) -> bool:
        return self.many and self.index == 0

    def owns(self, entry_id: str) -> bool:
        return owner_of(entry_id, self.count) == self.index

    def tag(self, entry_id: str) -> str:
        """A fresh queue id marked as this worker's."""
        return f"{entry_id}-{self.index}" if self.index else entry_id

    def share(self, limit: int | None) -> int | None:
        """This worker's part of a gateway-wide limit: ``ceil(limit / count)``, at least 1 (None: no
        limit). The workers' parts add up to the limit rounded up to a multiple of ``count``."""
        if limit is None or self.count <= 1:
            return limit
        return max(1, -(-limit // self.count))


SINGLE = WorkerInfo()


_random = random.Random()      # seeded from os.urandom


def fresh_id() -> str:
    """``mta.model.envelope.new_id``'s form (time-sortable, 48 random bits) without its ``uuid4`` system
    call: one is made for every connection and every message."""
    return f"{int(time.time() * 1000):012x}{_random.getrandbits(48):012x}"


def queue_id(gateway: Any) -> str:
    """A new queue id owned by this worker."""
    return gateway.worker.tag(fresh_id())


def current(config: Any, environ: dict[str, str] | None = None) -> WorkerInfo:
    """This process's identity: from the supervisor's environment in a worker, else worker 0."""
    env = os.environ if environ is None else environ
    if ENV_INDEX in env:
        fds = {}
        for item in filter(None, env.get(ENV_FDS, "").split(";")):
            key, _, fd = item.rpartition("=")
            fds[key] = int(fd)
        return WorkerInfo(int(env[ENV_INDEX]), int(env[ENV_COUNT]), fds)
    return WorkerInfo(0, resolve_count(config))
