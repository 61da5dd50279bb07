"""The Redis connections of a cluster node, on the reactor: txredisapi's protocol (Twisted-native, so
no command ever blocks the event loop) under Twisted's ``ClientService``, which reconnects with an
exponential back-off (0.5s up to 5s) whenever the server goes away.

:class:`RedisLink` runs commands and fails fast (:class:`Unavailable`) while the server is down
instead of queueing them: every caller has a local answer to fall back on. :class:`Subscription`
listens on channels and subscribes again after each reconnection.
"""
from __future__ import annotations

from typing import Any, Callable

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mta.config.values import RedisAddress

log = Logger(namespace="smtpgw.cluster")

COMMAND_TIMEOUT = 2.0       # a command not answered within this: Redis counts as down for this call
CONNECT_TIMEOUT = 2.0


class Unavailable(Exception):
    """Redis could not be reached or did not answer in time."""


class _Factory(Factory):
    """What txredisapi's protocol expects of its factory when AUTH or SELECT fails."""

    noisy = False
    isLazy = True

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.failure: str | None = None

    def buildProtocol(self, addr: Any) -> Any:
        proto = self.make()
        proto.factory = self
        return proto

    def stopTrying(self) -> None:
        pass                                 # ClientService keeps retrying with its back-off

    def connectionError(self, why: str) -> None:
        self.failure = why
        log.warn("cluster: {why}", why=why)


def _endpoint(reactor: Any, address: RedisAddress) -> Any:
    endpoint = TCP4ClientEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)
    if address.tls:
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(address.host), endpoint)
    return endpoint


def _service(reactor: Any, address: RedisAddress, protocol: type, **extra: Any) -> ClientService:
    factory = _Factory(lambda: protocol(password=address.password, username=address.username,
                                        dbid=address.db or None, replyTimeout=COMMAND_TIMEOUT))
    factory.__dict__.update(extra)
    return ClientService(_endpoint(reactor, address), factory, retryPolicy=backoffPolicy(0.5, 5.0),
                         clock=reactor, prepareConnection=lambda proto: proto.whenConnected())


class RedisLink:
    """One command connection to the cluster's Redis."""

    def __init__(self, reactor: Any, address: RedisAddress) -> None:
        self.reactor = reactor
        self.address = address
        self._service = _service(reactor, address, txredisapi.RedisProtocol)

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> defer.Deferred:
        return self._service.stopService()

    async def call(self, command: str, *args: Any) -> Any:
        """``command`` with ``args``; raises :class:`Unavailable` when Redis is down or slow."""
        try:
            d = self._service.whenConnected(failAfterFailures=1)
            d.addTimeout(CONNECT_TIMEOUT, self.reactor)
            conn = await d
            d = conn.execute_command(command, *args)
            d.addTimeout(COMMAND_TIMEOUT, self.reactor)
            reply = await d
        except (defer.TimeoutError, defer.CancelledError, txredisapi.ConnectionError, ConnectionError,
                OSError) as e:
            raise Unavailable(str(e) or type(e).__name__) from None
        except Exception as e:
            if "refused" in str(e).lower() or "connect" in type(e).__name__.lower():
                raise Unavailable(str(e)) from None
            raise
        if isinstance(reply, txredisapi.ResponseError):
            raise reply
        return reply


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.on_message(channel, message)


class Subscription:
    """Messages on ``channels`` go to ``on_message(channel, message)``; ``on_connect()`` runs after
    each (re)subscription, so the caller can catch up on what it missed while away."""

    def __init__(self, reactor: Any, address: RedisAddress, channels: list[str],
                 on_message: Callable[[str, str], None], on_connect: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.channels = channels
        self._service = _service(reactor, address, _Subscriber, on_message=on_message)
        self._on_connect = on_connect
        self._running = False

    def start(self) -> None:
        self._running = True
        self._service.startService()
        self._watch()

    def _watch(self) -> None:
        if not self._running:
            return
        d = self._service.whenConnected()
        d.addCallback(self._subscribe)
        d.addErrback(lambda f: None if f.check(defer.CancelledError) else log.failure("cluster subscription", f))

    async def _subscribe_async(self, proto: Any) -> None:
        await proto.subscribe(self.channels)
        self._on_connect()
        await proto.whenDisconnected()

    def _subscribe(self, proto: Any) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(self._subscribe_async(proto))
        d.addErrback(lambda f: None)
        d.addBoth(lambda _: self.reactor.callLater(0, self._watch))   # once the service saw the loss
        return d

    def stop(self) -> defer.Deferred:
        self._running = False
        return self._service.stopService()


__all__ = ["RedisLink", "Subscription", "Unavailable", "COMMAND_TIMEOUT"]
