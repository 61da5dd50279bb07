"""The common frame of the outbound client's tests: real threaded peers on 127.0.0.x, pools closed
after each test, and the two questions every such test asks (why did the send fail, what did the peer
see)."""
from __future__ import annotations

import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mta.smtp.client.pool import SMTPClientPool
from mta.model.nexthop import HostUnusable
from peers import SMTPPeer

HELO = "gw.example.test"


class ClientCase(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.pools: list[SMTPClientPool] = []

    def tearDown(self):
        return defer.DeferredList([p.close() for p in self.pools])

    def peer(self, host: str, extensions=None, **kwargs) -> SMTPPeer:
        if extensions is not None:
            kwargs["extensions"] = extensions
        p = SMTPPeer(host, **kwargs).start()
        self.addCleanup(p.stop)
        return p

    def pool(self, **kwargs) -> SMTPClientPool:
        kwargs.setdefault("connect_timeout", 5)
        kwargs.setdefault("command_timeout", 5)
        pool = SMTPClientPool(reactor, HELO, **kwargs)
        self.pools.append(pool)
        return pool

    async def refused(self, d: defer.Deferred) -> HostUnusable:
        try:
            await d
        except HostUnusable as e:
            return e
        raise AssertionError("send succeeded but should have failed")

    @staticmethod
    def commands(peer: SMTPPeer, verb: bytes) -> list[bytes]:
        return [line for line in peer.transcript if line.upper().startswith(verb)]


def wait_in_thread(predicate, timeout: float = 5.0) -> defer.Deferred:
    """Wait for a peer-side condition (the peers run in threads) without blocking the reactor."""
    return threads.deferToThread(_poll, predicate, timeout)


def _poll(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
