"""Asking a mail server to send us the mail it holds: ETRN (RFC 1985), ATRN (RFC 2645) or a site's own
command (``DEQUEUE {domain}``), as the seed's "collecting your mail from a store and forward facility".

One short SMTP session: greeting, EHLO (HELO fallback), STARTTLS when offered or required, AUTH when
credentials are given, then the request, one reply per domain (one for ATRN), QUIT. For ATRN a 250
reverses the roles on the same connection: the transport goes to ``receiver(transport)`` -- the
gateway's own SMTP server protocol -- and the provider delivers to us; the request ends when the
provider hangs up.

A site whose ISP dequeues on something else -- a FINGER request, a web call -- names a program
instead (``run``): it is run once per domain with ``{domain}`` and ``{server}`` filled in, and exit
status 0 counts as accepted (:func:`run_trigger`).

Used by the etrn_dequeue plugin (scheduled requests) and by ``smtpgw etrn`` (mta/cli/etrn.py).
"""
from __future__ import annotations

import base64
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol

from mta.smtp.client.wire import MAX_REPLY_LINE, ProtocolError, ReplyParser
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.smtp.client.pool import default_tls_options

DEFAULT_PORTS = {"ETRN": 25, "ATRN": 366}


class DequeueError(Exception):
    """The request could not be made (connection, TLS, AUTH, a refused greeting); ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class DequeueRequest:
    host: str
    port: int
    domains: tuple[str, ...]
    command: str = "ETRN"                     # ETRN | ATRN | a template with {domain}
    helo: str = "localhost"
    tls: str = "opportunistic"                # none | opportunistic | required
    username: str | None = None
    password: str | None = None
    allow_plaintext_auth: bool = False
    source_address: str | None = None
    timeout: float = 60.0
    run: tuple[str, ...] = ()                 # a trigger program instead of SMTP: argv, {domain} {server}

    @property
    def label(self) -> str:
        """What the request is called in logs and output: the verb, or the program's name."""
        if self.run:
            return os.path.basename(self.run[0])
        return self.command.split()[0] if self.command else "ETRN"

    def lines(self) -> list[tuple[str, str]]:
        """(label, command line) per request: one per domain, one for ATRN."""
        if self.command == "ETRN":
            return [(d, f"ETRN {d}") for d in self.domains]
        if self.command == "ATRN":
            names = ",".join(self.domains)
            return [(names, f"ATRN {names}".rstrip())]
        return [(d, self.command.replace("{domain}", d)) for d in self.domains]


class DequeueClient(Protocol):
    """One request session; strict about replies (one outstanding command at a time)."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._buf = bytearray()
        self._parser = ReplyParser()
        self._waiting: deque[defer.Deferred] = deque()
        self._timer: Any = None
        self._closed: defer.Deferred = defer.Deferred()
        self._failure: DequeueError | None = None
        self.delegate: Protocol | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.delegate is not None:
            self.delegate.dataReceived(data)
            return
        self._buf += data
        try:
            while self._waiting:
                reply = self._parser.take(self._buf)
                if reply is None:
                    break
                self._stop_timer()
                self._waiting.popleft().callback(reply)
                if self.delegate is not None:       # the roles reversed inside that callback
                    rest, self._buf = bytes(self._buf), bytearray()
                    if rest:
                        self.delegate.dataReceived(rest)
                    return
            if not self._waiting and (self._buf or self._parser.partial):
                raise ProtocolError("data received when no reply was expected")
            if len(self._buf) > MAX_REPLY_LINE:
                raise ProtocolError("reply line too long")
        except ProtocolError as e:
            self._fail(R.protocol_error(f"protocol error: {e}"))

    def connectionLost(self, reason: Any = None) -> None:
        if self.delegate is not None:
            self.delegate.connectionLost(reason)
        self._fail(R.link_failed("connection closed"))
        if not self._closed.called:
            self._closed.callback(None)

    def when_closed(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._closed.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _fail(self, reply: Reply) -> None:
        self._stop_timer()
        if self._failure is None:
            self._failure = DequeueError(reply)
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(self._failure)
        if self.delegate is None and self.transport is not None and self.connected:
            self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def expect(self) -> defer.Deferred:
        if self._failure is not None:
            return defer.fail(self._failure)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        self._stop_timer()
        self._timer = self.clock.callLater(self.timeout, self._fail,
                                           R.link_failed("timeout waiting for a reply"))
        return d

    async def command(self, line: str) -> Reply:
        d = self.expect()
        self.transport.write(line.encode("utf-8") + b"\r\n")
        return await d

    def hand_over(self, receiver: Callable[[Any], Protocol]) -> None:
        """ATRN accepted: from now on we are the server on this connection."""
        self._stop_timer()
        self.delegate = receiver(self.transport)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii") or "="


async def _setup(conn: DequeueClient, req: DequeueRequest, tls_options: Any) -> None:
    greeting = await conn.expect()
    if not greeting.is_positive:
        raise DequeueError(greeting)
    extensions = await _hello(conn, req.helo)
    if req.tls != "none" and "STARTTLS" in extensions:
        reply = await conn.command("STARTTLS")
        if reply.code == 220:
            if tls_options is None:
                tls_options = default_tls_options()
            conn.transport.startTLS(tls_options)
            extensions = await _hello(conn, req.helo)
            conn.tls = True
        elif req.tls == "required":
            raise DequeueError(R.tls_unavailable(f"STARTTLS refused: {reply}"))
    elif req.tls == "required":
        raise DequeueError(R.tls_unavailable("TLS is required but the server does not offer STARTTLS"))
    if req.username is not None:
        if not getattr(conn, "tls", False) and not req.allow_plaintext_auth:
            raise DequeueError(R.tls_unavailable("credentials are only sent over TLS"))
        offered = extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in offered:
            raise DequeueError(R.auth_refused(f"the server does not offer AUTH PLAIN ({offered})"))
        blob = b"\0" + req.username.encode() + b"\0" + (req.password or "").encode()
        reply = await conn.command("AUTH PLAIN " + _b64(blob))
        if reply.code != 235:
            raise DequeueError(reply)


async def _hello(conn: DequeueClient, helo: str) -> dict[str, str]:
    reply = await conn.command(f"EHLO {helo}")
    if reply.is_positive:
        out = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                out[keyword.upper()] = params.strip()
        return out
    reply = await conn.command(f"HELO {helo}")
    if not reply.is_positive:
        raise DequeueError(reply)
    return {}


async def request_dequeue(reactor: Any, req: DequeueRequest, receiver: Callable[[Any], Protocol] | None = None,
                          tls_options: Any = None) -> list[tuple[str, Reply]]:
    """Make ``req``; the server's reply per domain (per request line). Raises :class:`DequeueError`
    when the session could not get as far as the request.

    For ATRN, ``receiver(transport)`` must connect and return the protocol that takes the mail; the
    Deferred then fires when the provider closes the connection. With ``run`` the program is run
    instead (:func:`run_trigger`).
    """
    if req.run:
        return await run_trigger(reactor, req)
    cls = TCP6ClientEndpoint if ":" in req.host else TCP4ClientEndpoint
    bind = (req.source_address, 0) if req.source_address else None
    endpoint = cls(reactor, req.host, req.port, timeout=req.timeout, bindAddress=bind)
    factory = Factory.forProtocol(lambda: DequeueClient(reactor, req.timeout))
    factory.noisy = False
    try:
        conn: DequeueClient = await endpoint.connect(factory)
    except Exception as e:
        raise DequeueError(R.connect_failed(f"connection to {req.host}:{req.port} failed: {e}")) from e
    conn.tls = False
    try:
        await _setup(conn, req, tls_options)
        results: list[tuple[str, Reply]] = []
        for label, line in req.lines():
            reply = await conn.command(line)
            results.append((label, reply))
            if req.command == "ATRN" and reply.code == 250 and receiver is not None:
                closed = conn.when_closed()
                conn.hand_over(receiver)
                await closed
                return results
            if reply.code == 421:
                return results
        try:
            await conn.command("QUIT")
        except DequeueError:
            pass
        if conn.connected:
            conn.transport.loseConnection()
        return results
    except BaseException:
        if conn.delegate is None and conn.connected:
            conn.transport.abortConnection()
        raise


# -- a site's trigger program ---------------------------------------------------------------------

OUTPUT_LIMIT = 64 * 1024        # what we keep of a trigger program's output (the last line is reported)


class _Collect(ProcessProtocol):
    """Output and exit status of one program; killed when it outlives ``timeout``."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred = defer.Deferred()
        self.killed = False
        self._clock, self._timeout = clock, timeout
        self._timer: Any = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()
        self._timer = self._clock.callLater(self._timeout, self._kill)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        del self.output[:-OUTPUT_LIMIT]

    def _kill(self) -> None:
        self.killed = True
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass

    def processEnded(self, reason: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.ended.callback(getattr(reason.value, "exitCode", None))


def trigger_argv(req: DequeueRequest, domain: str) -> list[str]:
    """``run`` with ``{domain}`` and ``{server}`` filled in (plain replacement: other braces stay)."""
    return [arg.replace("{domain}", domain).replace("{server}", req.host) for arg in req.run]


async def run_trigger(reactor: Any, req: DequeueRequest) -> list[tuple[str, Reply]]:
    """Run the trigger program once per domain; exit 0 is a 250, anything else a 451 (asked again
    on the schedule), each with the program's last line of output."""
    results: list[tuple[str, Reply]] = []
    for domain in req.domains:
        argv = trigger_argv(req, domain)
        collect = _Collect(reactor, req.timeout)
        try:
            reactor.spawnProcess(collect, argv[0], argv, env=dict(os.environ))
        except OSError as e:
            results.append((domain, R.local_failure(f"{req.label}: cannot run {argv[0]}: {e}")))
            continue
        status = await collect.ended
        lines = bytes(collect.output).decode("utf-8", "replace").strip().splitlines()
        said = f": {lines[-1].strip()}" if lines else ""
        if status == 0:
            results.append((domain, R.trigger_done(f"{req.label} exited 0{said}")))
        elif collect.killed:
            results.append((domain, R.link_failed(f"{req.label} killed after {req.timeout:g}s{said}")))
        else:
            results.append((domain, R.local_failure(f"{req.label} exited {status}{said}")))
    return results
