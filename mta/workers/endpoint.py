"""Listening sockets bound before anything starts, and shared with the other workers.

Every listener of ``twistd smtpgw`` (the virtual servers' and the metrics endpoint) is bound by
:meth:`PreboundEndpoint.bind` while twistd builds the service tree, before it logs, becomes a daemon or
writes its pid file: an address that cannot be had stops start-up with one line naming the key, and
nothing else has started. (Still as root, so ``twistd -u`` can listen on port 25.) The reactor adopts
the socket when the service starts; with ``gateway.workers``, worker 0 keeps it for the workers it
starts, and a worker adopts the copy it inherited.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any, Callable

from twisted.internet import defer, tcp
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger

from mta.workers.identity import SINGLE, WorkerInfo


log = Logger(namespace="smtpgw.workers")


def listen_key(listen: Any) -> str:
    return f"{listen.host or '0.0.0.0'}:{listen.port}:{int(bool(listen.tls))}"


class CannotListen(Exception):
    """A listening address that cannot be had; ``key`` is its configuration key."""

    def __init__(self, key: str, address: str, problem: str) -> None:
        super().__init__(f"{key}: cannot listen on {address}: {problem}")
        self.key, self.address, self.problem = key, address, problem


class PreboundEndpoint:
    """A stream server endpoint on a socket bound ahead of time (see the module docstring).

    ``listen`` is a ``ListenAddress`` (host, port, tls); ``key`` names it in the configuration for
    error messages. Implicit TLS wraps the factory the way ``SSL4ServerEndpoint`` does, with the
    virtual server's context (so SIGHUP reaches it). ``earlier_run`` says whether a previous run's
    workers may still hold the address (then binding waits up to ``bind_wait`` for them to finish).
    """

    def __init__(self, reactor: Any, listen: Any, tls_context: Any = None, worker: WorkerInfo = SINGLE,
                 key: str = "listen", backlog: int = 1024, bind_wait: float = 10.0,
                 earlier_run: Callable[[], bool] = lambda: False) -> None:
        self.reactor = reactor
        self.listen_address = listen
        self.tls_context = tls_context
        self.worker = worker
        self.config_key = key
        self.backlog = backlog
        self.bind_wait = bind_wait
        self.earlier_run = earlier_run
        self.key = listen_key(listen)
        self.socket: socket.socket | None = None

    @property
    def address(self) -> str:
        host = self.listen_address.host or "0.0.0.0"
        return f"[{host}]:{self.listen_address.port}" if ":" in host else f"{host}:{self.listen_address.port}"

    def _family(self) -> int:
        host = self.listen_address.host or "0.0.0.0"
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def bind(self) -> None:
        """Bind and listen now (worker 0 only; idempotent); raises :class:`CannotListen`."""
        if self.socket is not None or self.worker.index != 0:
            return
        host = self.listen_address.host or "0.0.0.0"
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + self.bind_wait
        told = False
        try:
            while True:
                try:
                    sock.bind((host, self.listen_address.port))
                    break
                except OSError as e:
                    # a worker of the previous run may hold the address for a moment after its
                    # supervisor was killed (it closes its copy as soon as it notices): wait for it,
                    # and only for it
                    if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline or not self.earlier_run():
                        raise CannotListen(self.config_key, self.address, _reason(e)) from None
                    if not told:
                        told = True
                        log.warn("{address} is still held by a worker of the previous run; waiting for it",
                                 address=self.address)
                    time.sleep(0.2)
            sock.listen(self.backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.socket = sock

    def listen(self, factory: Any) -> defer.Deferred:
        try:
            if self.worker.index == 0:
                self.bind()
                fd = self.socket.fileno()
            else:
                fd = self.worker.listen_fds[self.key]
            if self.listen_address.tls:
                if self.tls_context is None:
                    raise ValueError(f"{self.key}: implicit TLS without a certificate")
                from twisted.protocols.tls import TLSMemoryBIOFactory
                factory = TLSMemoryBIOFactory(self.tls_context, False, factory)
            if self.worker.many and isinstance(self.reactor, PosixReactorBase):   # not a test's fake
                port = shared_port(self.reactor, fd, self._family(), factory)
            else:
                port = self.reactor.adoptStreamPort(fd, self._family(), factory)
            if self.worker.index != 0:
                os.close(fd)                 # the port keeps its own duplicate
            elif not self.worker.many:
                self.socket.close()          # nobody else needs it: stopListening really closes it
                self.socket = None
        except Exception:
            return defer.fail()
        return defer.succeed(port)


YIELD_SECONDS = 0.01     # a worker ahead in connections leaves the next one to the others this long


class _SharedPort(tcp.Port):
    """A listening port shared by the workers that spreads connections over them.

    Twisted's port accepts up to ``numberAccepts`` connections in a row (100, growing while the
    backlog is full) before the reactor looks at anything else, so a burst of connections went to
    whichever worker woke first: bench/latency.py's 20 sessions, opened together and then kept, sat
    mostly on one worker, whose 250s came 3-4x later than the other's. Here a worker takes one
    connection per readiness, and a worker that holds two connections more than another (the counts the
    workers share for ``max_connections``, :mod:`mta.workers.counts`) stops listening for
    :data:`YIELD_SECONDS` so that the others take it; after that pause it takes the next one
    whatever the counts say, so a stuck or restarting worker delays a connection by that much at most.
    """

    ahead: Callable[[], bool] = staticmethod(lambda: False)
    _grace = False

    # one accept per readiness: set back to 1 before each of Twisted's doRead (which raises it after a
    # full batch); a plain attribute, not a property, since the loop reads it at every accept
    numberAccepts = 1

    def doRead(self) -> None:
        if not self._grace and self.ahead():
            self._grace = True
            self.stopReading()
            self.reactor.callLater(YIELD_SECONDS, self._listen_again)
            return
        self._grace = False
        self.numberAccepts = 1
        super().doRead()

    def _listen_again(self) -> None:
        if self.connected and not self.disconnecting:
            self.startReading()


def shared_port(reactor: Any, fd: int, family: int, factory: Any) -> _SharedPort:
    """Adopt the listening socket the workers share as a :class:`_SharedPort`, the way
    ``reactor.adoptStreamPort`` adopts one as a plain port (a duplicate of ``fd``, started at once).

    The port asks ``factory.shared.ahead(factory.active)`` when the virtual server's factory has one
    (the metrics endpoint's has not: it is spread by readiness alone).
    """
    port = _SharedPort._fromListeningDescriptor(reactor, fd, family, factory)
    server = getattr(factory, "wrappedFactory", factory)       # implicit TLS wraps the server's factory
    shared = getattr(server, "shared", None)
    if shared is not None and hasattr(shared, "ahead"):
        port.ahead = lambda: shared.ahead(server.active)
    port.startListening()
    return port


def _reason(error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return "address already in use (is another gateway or mail server running?)"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root: start twistd as root with -u/-g)"
    if error.errno == errno.EADDRNOTAVAIL:
        return "no such local address on this host"
    return error.strerror or str(error)
