"""Listening sockets bound once by worker 0 and shared with the other workers."""
from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.workers.identity import WorkerInfo


log = Logger(namespace="smtpgw.workers")


def listen_key(listen: Any) -> str:
    return f"{listen.host or '0.0.0.0'}:{listen.port}:{int(bool(listen.tls))}"


# -- listening sockets shared by the workers ---------------------------------------------------------

class SharedEndpoint:
    """A stream server endpoint on a socket the workers share.

    In the supervisor it creates and binds the socket (in ``privilegedStartService``, so port 25
    works with ``twistd -u``) and keeps it for the workers it starts; in a worker it adopts the
    socket inherited from the supervisor. Implicit TLS wraps the factory the way ``SSL4ServerEndpoint``
    does, with the virtual server's context (so SIGHUP reaches it).
    """

    def __init__(self, reactor: Any, listen: Any, tls_context: Any, worker: WorkerInfo,
                 backlog: int = 1024, bind_wait: float = 10.0) -> None:
        self.reactor = reactor
        self.listen_address = listen
        self.tls_context = tls_context
        self.worker = worker
        self.backlog = backlog
        self.bind_wait = bind_wait
        self.key = listen_key(listen)
        self.socket: socket.socket | None = None

    def _family(self) -> int:
        host = self.listen_address.host or "0.0.0.0"
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def _bind(self) -> socket.socket:
        host = self.listen_address.host or "0.0.0.0"
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A worker of the previous run may still hold the address for a moment after its supervisor
        # was killed (it closes its copy as soon as it notices): wait for it rather than fail.
        deadline = time.monotonic() + self.bind_wait
        while True:
            try:
                sock.bind((host, self.listen_address.port))
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    sock.close()
                    raise
                time.sleep(0.2)
        sock.listen(self.backlog)
        sock.setblocking(False)
        return sock

    def listen(self, factory: Any) -> defer.Deferred:
        try:
            if self.worker.index == 0:
                self.socket = self._bind()
                fd = self.socket.fileno()
            else:
                fd = self.worker.listen_fds[self.key]
            if self.listen_address.tls:
                if self.tls_context is None:
                    raise ValueError(f"{self.key}: implicit TLS without a certificate")
                from twisted.protocols.tls import TLSMemoryBIOFactory
                factory = TLSMemoryBIOFactory(self.tls_context, False, factory)
            port = self.reactor.adoptStreamPort(fd, self._family(), factory)
            if self.worker.index != 0:
                os.close(fd)                 # adoptStreamPort keeps its own duplicate
        except Exception:
            return defer.fail()
        return defer.succeed(port)


# -- the supervisor (worker 0) -----------------------------------------------------------------------
