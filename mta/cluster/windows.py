"""Per-client counts in time windows for the whole gateway, and for the whole cluster: failed AUTH
attempts (``auth.max_failures_per_client``) and ETRN/DEQUEUE requests (etrn_dequeue's ``rate_limit``).

Without ``gateway.cluster.redis`` the figures are the workers' shared table (mta/workers/clients.py),
answered at once. With it, each event is also counted in Redis, ``INCR`` of
``smtpgw:limit:<kind>:<scope>:<client>:<window number>`` whose TTL is the window (fixed windows of
``per`` seconds), and a check reads the same key, so a client's tries at every node add up. While Redis
does not answer, the table's figures are used (the node logs once that it runs on local limits,
mta/cluster/node.py); every event is counted in the table as well, so the fall-back has them.
Neither is on a message's path: they are asked at AUTH and ETRN only.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer

from mta.cluster.node import PREFIX, Cluster
from mta.cluster.redis import Unavailable
from mta.workers.clients import ClientCounts

# KEYS: the window's key; ARGV: its TTL. The count with this event.
HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


def window_key(kind: str, scope: Any, client: str, window: float, now: float) -> str:
    return f"{PREFIX}limit:{kind}:{scope}:{client}:{int(now // window)}"


class ClientWindows:
    """``count`` and ``hit`` give an int at once without a cluster, a Deferred of one with it."""

    def __init__(self, table: Callable[[], ClientCounts], cluster: Cluster | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.cluster = cluster
        self.clock = clock

    def count(self, kind: str, scope: Any, client: str, window: float) -> int | defer.Deferred:
        """The client's events of ``kind`` in the current window."""
        table = self.table()
        local = table.in_window(table.bucket(scope, client), window, kind)
        if self.cluster is None:
            return local
        key = window_key(kind, scope, client, window, self.clock())
        return self._shared(local, "GET", key)

    def hit(self, kind: str, scope: Any, client: str, window: float) -> int | defer.Deferred:
        """Count one event; the client's events in the current window, this one included."""
        table = self.table()
        bucket = table.bucket(scope, client)
        table.count_in_window(bucket, window, kind)
        local = table.in_window(bucket, window, kind)
        if self.cluster is None:
            return local
        key = window_key(kind, scope, client, window, self.clock())
        return self._shared(local, "EVAL", HIT, 1, key, int(window) + 1)

    def _shared(self, local: int, *command: Any) -> defer.Deferred:
        async def ask() -> int:
            try:
                answer = await self.cluster.call(*command)
            except Unavailable:
                return local
            return max(local, int(answer or 0))

        return defer.Deferred.fromCoroutine(ask())


__all__ = ["ClientWindows", "window_key"]
