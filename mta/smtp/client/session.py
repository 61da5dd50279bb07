"""One outbound SMTP connection: session set-up as a list of steps, then transactions.

The rule that keeps it safe is in :meth:`SMTPClientProtocol.dataReceived`: the client knows how many
replies it is waiting for, and everything a read brings is checked against that count *before* any
reply is acted on. A server (or a man in the middle) that sends more than was asked for -- lines
pipelined after the 220 to STARTTLS, a second reply after the greeting -- breaks the connection
instead of answering a command we have not sent yet (the Exim CVE-2021-38371 class).

Set-up is ``setup_steps``: greeting, EHLO (HELO fallback), STARTTLS, AUTH. Each is an ``async`` method,
so a later feature adds a step rather than a branch.
"""
from __future__ import annotations

import base64
import re
from collections import deque
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mta.smtp.client.wire import (DotStuffer, ProtocolError, ReplyParser, encode_all,
                             has_8bit, pieces)
from mta.smtp.client import policy as outbound
from mta.dsn.params import OutboundDSN, RelayedResult
from mta.io.fastpath import send_now
from mta.model.nexthop import HostUnusable, RecipientResult
from mta.smtp.client.policy import OutboundPolicy
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.smtp.client import smtputf8 as utf8
from mta.smtp.client import requiretls as requiretls_out

log = Logger(namespace="smtpgw.client")

STREAM_THRESHOLD = 256 * 1024     # smaller messages are written in one go, larger ones by a producer
QUIT_TIMEOUT = 10.0


class ConnectionBroken(HostUnusable):
    """The connection died or misbehaved. ``kind`` is ``lost``, ``timeout``, ``protocol`` or ``tls``
    (the STARTTLS handshake or the EHLO after it failed): the pool retries a reused connection that
    was ``lost`` on a fresh one, and a ``tls`` failure in plaintext."""

    def __init__(self, reply: Reply, kind: str) -> None:
        super().__init__(reply)
        self.kind = kind


_UNUSABLE = re.compile("[\r\n\0<> ]")      # characters an address on the wire may not hold


def _address_ok(address: str) -> bool:
    return len(address) <= 512 and _UNUSABLE.search(address) is None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii") or "="


def _path_bytes(address: str) -> bytes:
    return b"<" + address.encode("utf-8") + b">"


@implementer(IPullProducer)
class _DataProducer:
    """Feeds a large message to the transport as fast as it drains, encoding piece by piece."""

    def __init__(self, conn: "SMTPClientProtocol", chunks: list[bytes]) -> None:
        self.conn = conn
        self.pieces = pieces(chunks)
        self.stuffer = DotStuffer()
        self.done: defer.Deferred = defer.Deferred()
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.conn._touch()
        piece = next(self.pieces, None)
        if piece is not None:
            self.conn.transport.write(self.stuffer.encode(piece))
            return
        self.stopped = True
        self.conn.transport.unregisterProducer()
        d, self.done = self.done, None
        d.callback(self.stuffer.finish())

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            d, self.done = self.done, None
            if d is not None:
                d.errback(ConnectionBroken(R.link_failed("connection lost while sending the message"),
                                           "lost"))


class _Group:
    """The waiter of a pipelined group of commands (``expect_group``): takes their replies as
    ``callback`` calls in order and fires ``done`` with the list at the last; the first ``errback``
    (the connection broke) fails ``done``, later ones are the same failure and are dropped."""

    __slots__ = ("replies", "wanted", "done")

    def __init__(self, wanted: int) -> None:
        self.replies: list[Reply] = []
        self.wanted = wanted
        self.done: defer.Deferred = defer.Deferred()

    def callback(self, reply: Reply) -> None:
        self.replies.append(reply)
        if len(self.replies) == self.wanted:
            self.done.callback(self.replies)

    def errback(self, failure: Any) -> None:
        if not self.done.called:
            self.done.errback(failure)


class SMTPClientProtocol(Protocol):
    """An SMTP client connection. Created by :class:`mta.smtp.client.pool.SMTPClientPool`."""

    setup_steps = ("step_greeting", "step_ehlo", "step_starttls", "step_auth")

    def __init__(self, helo_name: str, command_timeout: float, clock: Any,
                 tls_options: Any = None, hop_label: str = "", policy: OutboundPolicy | None = None,
                 protocol_log: Any = None) -> None:
        """``policy`` (a connector's outbound settings) chooses HELO/EHLO, whether TLS is mandatory
        and the AUTH credentials; None behaves as opportunistic TLS with EHLO and no AUTH.
        ``protocol_log``: the connector's W3C log (mta/smtp/client/protocol_log.py), or None."""
        self.helo_name = helo_name
        self.policy = policy
        self.authenticated = False
        self.command_timeout = command_timeout
        self.clock = clock
        self.tls_options = tls_options          # None: never STARTTLS on this connection
        self.hop_label = hop_label
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.dead = False                        # broken: nothing more is read or written
        self.closing = False                     # QUIT sent or due: never handed out again
        self.needs_rset = False
        self.transactions = 0
        self.on_close: Callable[["SMTPClientProtocol"], None] | None = None
        self._buf = bytearray()
        self._parser = ReplyParser()
        self._waiters: deque[tuple[defer.Deferred | _Group, str]] = deque()
        self._timer: Any = None
        self._since = 0.0                   # the reply timer runs from here (_touch)
        self._streaming = False
        self._close_waiters: list[defer.Deferred] = []
        self._failure: ConnectionBroken | None = None
        self._plog = protocol_log.conversation(self) if protocol_log is not None else None

    # -- the wire --------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.dead:
            return
        self._buf += data
        expected = len(self._waiters)
        replies: list[Reply] = []
        try:
            while (reply := self._parser.take(self._buf)) is not None:
                replies.append(reply)
                if len(replies) > expected:
                    raise ProtocolError(f"unexpected reply {str(reply)[:80]!r}")
            if len(replies) == expected and (self._buf or self._parser.partial):
                raise ProtocolError("data received when no reply was expected")
        except ProtocolError as e:
            self._break(R.protocol_error(f"protocol error from {self.hop_label}: {e}"), "protocol")
            return
        self._touch()
        for reply in replies:
            if self.dead:                      # a callback gave up on the connection
                return
            d, _label = self._waiters.popleft()
            if self._plog is not None:
                self._plog.replied(reply)
            d.callback(reply)
        self._touch()

    def expect(self, label: str, line: bytes | str | None = None, size: int | None = None) -> defer.Deferred:
        """A Deferred for the next reply not yet claimed (register it before writing the command);
        ``line`` (the command) and ``size`` (octets sent) are for the protocol log."""
        if self._failure is not None:
            return defer.fail(self._failure)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((d, label))
        if self._plog is not None:
            self._plog.sent(label, line, size if size is not None else len(line) + 2 if line else 0)
        self._touch()
        return d

    def expect_group(self, lines: list[bytes]) -> defer.Deferred:
        """``expect`` for each line of a pipelined group (register before writing), as one Deferred
        firing with their replies in order once the last has come, or failing as the first of them
        fails (the connection broke: every later one fails with it). One Deferred a group rather than
        one per command and the list gathering them."""
        if self._failure is not None:
            return defer.fail(self._failure)
        group = _Group(len(lines))
        for line in lines:
            label = line.split(b" ", 1)[0].decode()
            self._waiters.append((group, label))
            if self._plog is not None:
                self._plog.sent(label, line, len(line) + 2)
        self._touch()
        return group.done

    async def command(self, line: str, label: str | None = None) -> Reply:
        d = self.expect(label or line.split(" ", 1)[0], line)
        send_now(self.transport, line.encode("utf-8") + b"\r\n")
        return await d

    def _touch(self) -> None:
        """The reply timer runs from now while something is outstanding. The deadline moves with an
        attribute, not by rescheduling a DelayedCall at every command and reply (about ten reactor
        heap operations a message): the timer, once armed, looks when it fires and sets itself again
        for what is left, or stops when nothing is outstanding (an idle connection keeps none)."""
        if self.dead:
            return
        if self._waiters or self._streaming:
            self._since = self.clock.seconds()
            if self._timer is None:
                self._timer = self.clock.callLater(self.command_timeout, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self.dead or not (self._waiters or self._streaming):
            return
        left = self._since + self.command_timeout - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._timer_fired)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        label = self._waiters[0][1] if self._waiters else "DATA content"
        self._break(R.link_failed(f"timeout waiting for {self.hop_label} ({label})"), "timeout")

    def _break(self, reply: Reply, kind: str) -> None:
        """Give up on the connection: fail everyone waiting, drop it without a goodbye."""
        if self._failure is None:
            self._failure = ConnectionBroken(reply, kind)
            if self._waiters or self._streaming:
                log.info("connection to {hop} broken: {reply}", hop=self.hop_label, reply=str(reply))
        self.dead = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._plog is not None:
            self._plog.broken(self._failure.reply)
        waiters, self._waiters = self._waiters, deque()
        for d, _ in waiters:
            d.errback(self._failure)
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        kind = "lost"
        if self._failure is None and (self._waiters or self._streaming):
            why = reason.getErrorMessage() if reason is not None else "closed"
            self._failure = ConnectionBroken(R.link_failed(f"connection to {self.hop_label} lost: {why}"),
                                             kind)
        self._break(self._failure.reply if self._failure else R.link_failed("closed"),
                    self._failure.kind if self._failure else kind)
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback(self)
        for d in self._close_waiters:
            d.callback(None)
        self._close_waiters = []

    def when_closed(self) -> defer.Deferred:
        if not self.connected and self.dead:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def quit(self) -> defer.Deferred:
        """Say goodbye politely (idle timeout, shutdown); fires when the connection is gone."""
        closed = self.when_closed()
        if self.dead or self.closing:
            return closed
        self.closing = True
        d = self.expect("QUIT", "QUIT")
        self.transport.write(b"QUIT\r\n")
        d.addBoth(lambda _: self.transport.loseConnection() if self.connected else None)
        # a server that never answers QUIT must not hold a shutdown for the full command timeout
        guard = self.clock.callLater(min(QUIT_TIMEOUT, self.command_timeout), self.abort)
        closed.addBoth(lambda r: (guard.cancel() if guard.active() else None, r)[1])
        return closed

    def discard(self) -> None:
        """Drop the connection now: its state is unknown (a cancelled or crashed transaction)."""
        self._break(R.local_failure("connection discarded"), "lost")

    @property
    def usable(self) -> bool:
        return self.connected and not self.dead and not self.closing

    def abort(self) -> None:
        if self.connected:
            self.transport.abortConnection()

    # -- session set-up ----------------------------------------------------------------------------

    async def setup(self) -> None:
        """Run the set-up steps; raises :class:`HostUnusable` when the host will not talk to us."""
        for name in self.setup_steps:
            await getattr(self, name)()

    def _refused(self, reply: Reply, tls_failure: str = "") -> HostUnusable:
        self.quit()
        return HostUnusable(reply, tls_failure)

    async def step_greeting(self) -> None:
        greeting = await self.expect("greeting")
        if not greeting.is_positive:
            raise self._refused(greeting)

    async def step_ehlo(self) -> None:
        if self.policy is not None and self.policy.helo == "helo":
            await self._helo_only()
            return
        reply = await self.command(f"EHLO {self.helo_name}")
        if reply.is_positive:
            self.esmtp = True
            self.extensions = {}
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            return
        if reply.code < 500:
            raise self._refused(reply)
        await self._helo_only()

    async def _helo_only(self) -> None:
        """Plain SMTP (``outbound.helo: helo``, or EHLO refused): no extensions, so no STARTTLS."""
        helo = await self.command(f"HELO {self.helo_name}")
        if not helo.is_positive:
            raise self._refused(helo)
        self.esmtp = False
        self.extensions = {}

    async def step_starttls(self) -> None:
        """STARTTLS when offered. Opportunistic (the default): a refusal leaves the session in
        plaintext. Mandatory (``tls: required`` or ``verify``): no STARTTLS makes the hop unusable."""
        if self.tls:
            return
        mandatory = self.policy is not None and self.policy.tls_mandatory
        if self.tls_options is None or "STARTTLS" not in self.extensions:
            if mandatory:
                raise self._refused(outbound.no_starttls(self.policy, self.hop_label), outbound.NO_STARTTLS)
            return
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            if mandatory:
                raise self._refused(outbound.starttls_refused(self.policy, self.hop_label, reply),
                                    outbound.NO_STARTTLS)
            return
        # dataReceived has already checked that nothing followed the 220 in the same read.
        self.transport.startTLS(self.tls_options)
        self.tls = True
        try:
            await self.step_ehlo()
        except ConnectionBroken as e:      # handshake failed, or the server broke right after it
            raise ConnectionBroken(e.reply, "tls") from e
        if self._plog is not None:         # what the handshake was checked against: tls=dane, ...
            self._plog.note("TLS", f"tls={outbound.tls_label(self.policy, True)}", reply.code)

    async def step_auth(self) -> None:
        """AUTH PLAIN or LOGIN (RFC 4954) with the connector's credentials, for ISP smart hosts.

        Credentials go only over TLS unless ``allow_plaintext_auth``; a host that does not offer the
        mechanism, or refuses the login, is unusable and the mail waits (never bounces).
        """
        policy = self.policy
        if policy is None or policy.auth is None:
            return
        if not self.tls and not policy.allow_plaintext_auth:
            raise self._refused(outbound.auth_needs_tls(policy, self.hop_label))
        mechanism = policy.auth.mechanism.upper()
        offered = self.extensions.get("AUTH", "")
        if mechanism not in offered.upper().split():
            raise self._refused(outbound.auth_not_offered(policy, self.hop_label, mechanism, offered))
        user = policy.auth.username.encode("utf-8")
        password = policy.auth.password.encode("utf-8")
        if mechanism == "PLAIN":
            reply = await self.command("AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password), "AUTH")
        else:
            reply = await self.command("AUTH LOGIN", "AUTH")
            if reply.code == 334:
                reply = await self.command(_b64(user), "AUTH username")
            if reply.code == 334:
                reply = await self.command(_b64(password), "AUTH password")
        if reply.code == 334:                  # a challenge we have no answer for: cancel it
            await self.command("*", "AUTH cancel")
        if reply.code != 235:
            raise self._refused(outbound.auth_failed(policy, self.hop_label, reply))
        self.authenticated = True

    # -- transactions ------------------------------------------------------------------------------

    @property
    def size_limit(self) -> int:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0


    async def deliver(self, sender: str, recipients: list[str], chunks: list[bytes],
                      hop_label: str, dsn: OutboundDSN | None = None,
                      smtputf8: bool = False, requiretls: bool = False) -> list[RecipientResult]:
        """One transaction. Raises HostUnusable if MAIL is refused or the connection fails before the
        message was handed over; from the 354 on, failures become 4xx results (status unknown).

        ``dsn``: the message's RFC 3461 parameters, sent on when the hop offers DSN; when it does not,
        a recipient that asked NOTIFY=SUCCESS comes back delivered as a :class:`RelayedResult`.
        ``smtputf8``: the message was received with SMTPUTF8 (RFC 6531); see :mod:`mta.smtp.client.smtputf8`.
        ``requiretls``: the sender asked for REQUIRETLS (RFC 8689): only over validated TLS (the
        policy's ``tls: verify``) to a hop that offers it; see :mod:`mta.smtp.client.requiretls`."""
        def each(reply: Reply) -> list[RecipientResult]:
            return [RecipientResult(r, reply, hop_label) for r in recipients]

        if not _address_ok(sender):
            return each(R.SENDER_UNUSABLE)
        size = sum(len(c) for c in chunks)
        limit = self.size_limit
        if limit and size > limit:
            return each(R.too_big_for_hop(size, limit, hop_label))

        mail = b"MAIL FROM:" + _path_bytes(sender)
        if self.esmtp:
            if "SIZE" in self.extensions:
                mail += b" SIZE=%d" % size
            if "8BITMIME" in self.extensions and has_8bit(chunks):
                # Without 8BITMIME on the other side 8-bit mail is sent unchanged anyway (as Postfix
                # does by default): converting MIME parts is out of scope and nearly all servers cope.
                mail += b" BODY=8BITMIME"
        if smtputf8 or not utf8.envelope_is_ascii(sender, recipients):
            if self.esmtp and utf8.KEYWORD in self.extensions:
                mail += b" SMTPUTF8"
            elif utf8.needs(sender, recipients, chunks, smtputf8):     # RFC 6531 3.4: not here at all
                return each(utf8.not_offered(hop_label))
        if requiretls:              # RFC 8689 4.2.1: not this hop (QUIT follows); the caller tries the next
            if not (self.tls and self.policy is not None and self.policy.tls == "verify"):
                raise HostUnusable(requiretls_out.not_validated(hop_label))
            if requiretls_out.KEYWORD not in self.extensions:
                raise HostUnusable(requiretls_out.not_offered(hop_label))
            mail += b" REQUIRETLS"
        dsn_hop = dsn is not None and self.esmtp and "DSN" in self.extensions
        if dsn_hop:
            mail += dsn.mail.encode("ascii")
        results: dict[int, Reply] = {}
        to_send: list[int] = []
        for i, rcpt in enumerate(recipients):
            if _address_ok(rcpt):
                to_send.append(i)
            else:
                results[i] = R.RECIPIENT_UNUSABLE
        if not to_send:
            return [RecipientResult(r, results[i], hop_label) for i, r in enumerate(recipients)]

        rcpt_lines = [b"RCPT TO:" + _path_bytes(recipients[i])
                      + (dsn.rcpt(recipients[i]).encode("ascii") if dsn_hop else b"") for i in to_send]
        pipelining = self.esmtp and "PIPELINING" in self.extensions
        rset_reply: Reply | None = None
        data_reply: Reply | None = None
        if pipelining:
            lines = ([b"RSET"] if self.needs_rset else []) + [mail] + rcpt_lines + [b"DATA"]
            group = self.expect_group(lines)
            send_now(self.transport, b"".join(line + b"\r\n" for line in lines))
            replies = await group
            if self.needs_rset:
                rset_reply, replies = replies[0], replies[1:]
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            if self.needs_rset:
                rset_reply = await self.command("RSET")
            mail_reply = await self.command(mail.decode("utf-8"), "MAIL")
            rcpt_replies = []
            if mail_reply.is_positive:
                for line in rcpt_lines:
                    reply = await self.command(line.decode("utf-8"), "RCPT")
                    rcpt_replies.append(reply)
                    if reply.code == 421:          # the server is closing: the rest get the same
                        rcpt_replies += [reply] * (len(rcpt_lines) - len(rcpt_replies))
                        break
        self.transactions += 1
        if rset_reply is not None and not rset_reply.is_positive:
            self._break(R.protocol_error(f"RSET refused by {hop_label}: {rset_reply}"), "lost")
            raise self._failure  # type: ignore[misc]
        self.needs_rset = True
        for i, reply in zip(to_send, rcpt_replies):
            results[i] = reply
        accepted = [i for i in to_send if results[i].is_positive]
        closing = next((r for r in [mail_reply, *rcpt_replies, data_reply] if r is not None and r.code == 421), None)
        if closing is not None:
            self.closing = True                    # RFC 5321 3.8: after a 421 the server hangs up
            if mail_reply.is_positive and (data_reply is None or data_reply.code != 354):
                for i in accepted:
                    results[i] = closing
                return [RecipientResult(r, results[i], hop_label) for i, r in enumerate(recipients)]

        if not mail_reply.is_positive or not accepted:
            if data_reply is not None and data_reply.code == 354:
                await self._send_empty()            # RFC 2920 3.1: a 354 must be answered with "."
            if not mail_reply.is_positive:
                raise HostUnusable(mail_reply)
            return [RecipientResult(r, results[i], hop_label) for i, r in enumerate(recipients)]

        if data_reply is None:
            data_reply = await self.command("DATA")
            if data_reply.code == 421:
                self.closing = True
        if data_reply.code != 354:
            for i in accepted:
                results[i] = data_reply
            return [RecipientResult(r, results[i], hop_label) for i, r in enumerate(recipients)]

        try:
            final = await self._send_data(chunks, size)
        except ConnectionBroken as e:
            final = R.maybe_delivered(e.reply)
        else:
            self.needs_rset = False
        for i in accepted:
            results[i] = final
        if dsn is not None and not dsn_hop and final.is_positive:      # RFC 3461 4.2.1
            return [(RelayedResult if i in accepted and dsn.wants_success(r) else RecipientResult)(
                r, results[i], hop_label) for i, r in enumerate(recipients)]
        return [RecipientResult(r, results[i], hop_label) for i, r in enumerate(recipients)]

    async def _send_empty(self) -> None:
        d = self.expect("end of data", size=3)
        self.transport.write(b".\r\n")
        await d
        self.needs_rset = False

    async def _send_data(self, chunks: list[bytes], size: int) -> Reply:
        """Send the dot-stuffed message and its terminator; the reply to the final dot."""
        if size <= STREAM_THRESHOLD:
            d = self.expect("end of data", size=size + 3)
            send_now(self.transport, b"".join(encode_all(chunks)))
            return await d
        producer = _DataProducer(self, chunks)
        self._streaming = True
        self._touch()
        self.transport.registerProducer(producer, False)
        try:
            tail = await producer.done
        finally:
            self._streaming = False
        d = self.expect("end of data", size=size + 3)
        self.transport.write(tail)
        return await d
