"""Two shortcuts through Twisted's I/O on the path every message takes, both measured under the bench.

``send_now``: a transport's ``write`` only buffers; the bytes leave at the reactor's next turn,
after an ``epoll_ctl`` to watch for writability and before another to stop. An SMTP reply is a few
dozen bytes that a socket with an empty buffer takes at once, so we hand it to the socket directly
and fall back on ``write`` for anything it does not take (or when TLS, a pull producer or older
buffered data is involved, so ordering and back-pressure stay Twisted's). A streaming producer (the
server session's backpressure) is no obstacle: what the socket takes leaves nothing buffered, and what
it does not goes through ``write``, which pauses the producer past the transport's ``bufferSize``.

``write_pipe_now``: the same for a child process's input pipe (the spool writer's requests): one
``writev`` of the request and the message's chunks, where ``writeSequence`` would join them into one
more copy of the message and write it at the reactor's next turn.

``lean_poll``: Twisted's epoll loop wraps every ready descriptor in a logging context
(``callWithLogger``), four Python calls per event that only legacy ``log.msg`` prefixes use; we
dispatch directly and keep the error handling. It also hands over first what ``dispatch_first``
named: the spool writer's replies, each of which lets a 250 go. Measured inside the gateway under
latency.py's 20 sessions, a turn held up to 18 ready descriptors, and a writer's reply that epoll
listed after a dozen sessions' reads and delivery replies waited behind all their work (p99 9-19 ms
between the poll's return and the reply's read).
"""
from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import tcp
from twisted.python import log

_PLAIN_TCP = (tcp.Server, tcp.Client)
IOV_MAX = 1024


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, trying the socket first when nothing is queued before it."""
    if (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport.dataBuffer
            and not transport._tempDataBuffer
            and (transport.producer is None or transport.streamingProducer)):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0            # EAGAIN, or an error that write()'s own path will report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def write_pipe_now(writer: Any, chunks: list[bytes]) -> None:
    """``writer.writeSequence(chunks)`` for a process's input pipe (Twisted's ``ProcessWriter``),
    trying one ``writev`` first when nothing is queued before it; what the pipe does not take goes
    through ``writeSequence`` (ordering and buffering stay Twisted's)."""
    if (writer.connected and not writer.disconnecting and not writer.dataBuffer
            and not writer._tempDataBuffer and len(chunks) <= IOV_MAX):
        try:
            sent = os.writev(writer.fileno(), chunks)
        except OSError:
            sent = 0            # EAGAIN, or an error that the writer's own path will report
        if sent:
            if sent == sum(map(len, chunks)):      # the whole request (nearly always): no walk
                return
            i = 0
            while i < len(chunks) and sent >= len(chunks[i]):
                sent -= len(chunks[i])
                i += 1
            chunks = [chunks[i][sent:], *chunks[i + 1:]] if sent else chunks[i:]
    writer.writeSequence(chunks)


def lean_poll(reactor: Any) -> bool:
    """Swap the epoll reactor's iteration for one without the per-event logging context."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:         # pragma: no cover - not on Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False

    first: set[int] = set()
    reactor._smtpgw_first_fds = first

    def doPoll(timeout: float | None) -> None:
        try:
            events = reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = reactor._selectables
        dispatch = reactor._doReadOrWrite
        if first and len(events) > 1:
            head = [e for e in events if e[0] in first]
            if head:
                events = head + [e for e in events if e[0] not in first]
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except BaseException:
                    log.err(None, "smtpgw: error in the reactor's dispatch")

    reactor.doIteration = doPoll
    return True


def dispatch_first(reactor: Any, fd: int, first: bool = True) -> None:
    """Have ``lean_poll`` hand ``fd``'s readiness over before any other descriptor's in a turn (or no
    longer, with ``first=False``). A reactor without ``lean_poll`` keeps epoll's order."""
    fds = getattr(reactor, "_smtpgw_first_fds", None)
    if fds is not None:
        if first:
            fds.add(fd)
        else:
            fds.discard(fd)
