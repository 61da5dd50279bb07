"""The ESMTP server: one ``SMTPServerProtocol`` per client connection, one factory per virtual server.

Built on ``Protocol`` with our own byte buffer (``mta.smtp.lines``) rather than LineReceiver or
twisted.mail.smtp, for the reasons in docs/architecture.md "Protocol traps". The shape follows chasquid and
OpenSMTPD: an explicit :class:`State`, one logged transition function (``_enter``), a table of verbs
with the states that refuse them (``COMMANDS``), one ``smtp_<VERB>`` method per verb returning a
:class:`Reply` (or a Deferred of one when a hook answers later), and one place that writes to the
transport (``_send``).

While a hook's Deferred is pending the transport is paused and buffered input is left alone, so
pipelined replies always come back in order; a hook that answers at once costs no Deferred.

Backpressure: the protocol is its transport's streaming producer. When more than the transport's
``bufferSize`` (64 KB) of replies waits unsent -- a client that pipelines and never reads -- Twisted
calls ``pauseProducing``: the session stops reading and stops answering buffered commands until the
replies have drained (``resumeProducing``). So a session holds at most 64 KB of replies and one read of
input, whatever the client sends or fails to read.

Intake: while the process has :data:`mta.smtp.server.intake.LIMIT` transactions open, a session whose next
command is MAIL stops reading and answering until one closes (or :data:`~mta.smtp.server.intake.MAX_WAIT`
has passed), so a burst from thousands of connections is held in the kernel's buffers, not in envelopes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from email.utils import formatdate
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from mta.smtp import address
from mta.dsn import params as dsn_params
from mta.workers import identity as workers
from mta.smtp.server import bdat as server_bdat
from mta.smtp.server import intake, message_memory
from mta.smtp import replies as R
from mta.smtp.address import AddressError
from mta.config import VirtualServer
from mta.model.envelope import Envelope, Session
from mta.io.deadlines import Deadlines
from mta.io.fastpath import send_now
from mta.smtp.lines import ChunkedMessage, CommandSplitter, DataReader, Problem
from mta.model.message import MessageData
from mta.smtp.reply import Reply
from mta.smtp.server.auth import ServerAuth, mask_auth_command
from mta.workers.counts import SharedConnectionLimit
from mta.smtp.server.tls import ServerTLS
from mta.smtp.server.client_limits import ClientLimits
from mta.smtp.server.protocol_log import ProtocolLog, RejectedCommands, counted
from mta.smtp.server import mail_lines
from mta import maillog
from mta.spool.store import SpoolError

log = Logger(namespace="smtpgw.server")

MAX_PENDING_INPUT = 1 << 20     # unread input kept while a hook is pending; more means a flood
DATA_RATE_GRACE = 60.0          # seconds of a message before limits.min_data_rate applies (or timeout, if shorter)
# Replies that say "not now" rather than "you erred": not counted against limits.max_errors (as
# Postfix does not count 452 recipient overshoot); a local error is ours, not the client's.
_NOT_ERRORS = frozenset({R.TOO_MANY_RECIPIENTS, R.INSUFFICIENT_STORAGE, R.INTERNAL_ERROR})

# The replies sent most, already on the wire format (constants live forever, so their ids are unique).
_WIRE = {id(r): r.to_bytes() for r in vars(R).values() if isinstance(r, Reply)}
_date_cache: list[Any] = [None, ""]


def rfc5322_date(now: float) -> str:
    """The local date for banners and Received headers, formatted once per second."""
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[:] = [second, formatdate(second, localtime=True)]
    return _date_cache[1]


class State(enum.Enum):
    GREETING = "greeting"       # waiting for the smtpgw_connect verdict
    CONNECTED = "connected"     # banner sent, no HELO/EHLO yet
    GREETED = "greeted"         # HELO/EHLO done, no transaction
    MAIL = "mail"               # MAIL accepted
    RCPT = "rcpt"               # at least one RCPT accepted
    DATA = "data"               # reading the message
    BDAT = "bdat"               # counting off the octets of one BDAT chunk (mta/smtp/server/bdat.py)
    CHUNKING = "chunking"       # BDAT chunks taken, waiting for the next BDAT
    CLOSED = "closed"


# a session's place at the intake gate (mta/smtp/server/intake.py)
GATE_FREE = "free"              # a MAIL goes in unless the gate is full
GATE_WAITING = "waiting"        # waiting for room: not reading, the MAIL left in the buffer
GATE_PASS = "pass"              # its turn came: the next MAIL goes in whatever the count


@dataclass(frozen=True)
class Command:
    """A verb: the method that runs it, and the states in which it is refused (with what)."""

    handler: str
    refusals: dict[State, Reply]


# MAIL FROM parameters taken (see mail_parameters); RET/ENVID are RFC 3461's (mta/dsn/params.py)
_MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "REQUIRETLS"}) | dsn_params.MAIL_KEYWORDS
_MAIL_PARAMETERS_AUTH = _MAIL_PARAMETERS | {"AUTH"}
COMMANDS: dict[str, Command] = {
    "EHLO": Command("smtp_EHLO", {}),
    "HELO": Command("smtp_HELO", {}),
    "MAIL": Command("smtp_MAIL", {State.CONNECTED: R.NEED_HELO, State.MAIL: R.NESTED_MAIL,
                                  State.RCPT: R.NESTED_MAIL, State.CHUNKING: R.NESTED_MAIL}),
    "RCPT": Command("smtp_RCPT", {State.CONNECTED: R.NEED_MAIL, State.GREETED: R.NEED_MAIL,
                                  State.CHUNKING: R.BDAT_IN_PROGRESS}),
    "DATA": Command("smtp_DATA", {State.CONNECTED: R.NEED_MAIL, State.GREETED: R.NEED_MAIL,
                                  State.MAIL: R.NO_VALID_RECIPIENTS,
                                  State.CHUNKING: R.DATA_AFTER_BDAT}),
    "BDAT": Command("smtp_BDAT", {}),       # refuses in smtp_BDAT, after the octets are skipped
    "RSET": Command("smtp_RSET", {}),
    "NOOP": Command("smtp_NOOP", {}),
    "QUIT": Command("smtp_QUIT", {}),
    "VRFY": Command("smtp_VRFY", {}),
    "HELP": Command("smtp_HELP", {}),
    "STARTTLS": Command("smtp_STARTTLS", {State.MAIL: R.IN_TRANSACTION, State.RCPT: R.IN_TRANSACTION,
                                          State.CHUNKING: R.IN_TRANSACTION}),
    "AUTH": Command("smtp_AUTH", {State.CONNECTED: R.NEED_HELO, State.MAIL: R.IN_TRANSACTION,
                                  State.RCPT: R.IN_TRANSACTION, State.CHUNKING: R.IN_TRANSACTION}),
}


# HELP's list: the verbs always taken, then those an EHLO keyword of the same name offers
_BASE_VERBS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP")
_EXTENSION_VERBS = ("STARTTLS", "AUTH", "ETRN", "ATRN")


class _LoggedCommand:
    """A command on its way to the protocol log: counts the bytes of every step until its final reply."""

    __slots__ = ("verb", "line", "bytes_in", "bytes_out", "started", "reply")

    def __init__(self, verb: str, line: str, bytes_in: int, started: float) -> None:
        self.verb, self.line, self.bytes_in, self.bytes_out, self.started = verb, line, bytes_in, 0, started
        self.reply: Reply | None = None


@implementer(IPushProducer)
class SMTPServerProtocol(Protocol):
    """One client connection; also its transport's producer (backpressure, see the module's docstring).

    Slotted: an idle connection is mostly this object, and a dict of its forty attributes cost about
    1.5 KB more per connection (15 MB at 10,000 connections)."""

    __slots__ = ("transport", "connected", "factory", "gateway", "vs", "hooks", "reactor", "hostname", "state",
                 "session", "envelope", "_buf", "_pos", "_splitter", "_reader", "_chunk", "_chunked", "_memory",
                 "_held", "_waiting", "_paused", "_unsent_full", "_producing", "_log_behind", "errors",
                 "_processing", "_after_send", "_timer", "_delegate", "client_bucket", "_last_input",
                 "_line_started", "_data_started", "_data_bytes", "sasl_continuation", "auth_failures",
                 "_diagnostics", "_detail", "_plog", "_plog_cmd", "_plog_rejects", "_mail_log", "_stage",
                 "_intake", "_gate", "_in_flight")

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.transport: Any = None
        self.connected = 0
        self.factory = factory
        self.gateway = factory.gateway
        self.vs = factory.vs
        self.hooks = factory.gateway.hooks
        self.reactor = factory.gateway.reactor
        self.hostname = factory.gateway.config.gateway.hostname
        self.state = State.GREETING
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self._buf = b""
        self._pos = 0
        self._splitter = CommandSplitter()
        self._reader: DataReader | None = None
        self._chunk: server_bdat.Chunk | None = None    # the BDAT chunk being read (State.BDAT)
        self._chunked: ChunkedMessage | None = None     # the BDAT transaction's message so far
        self._memory = factory.memory   # the gateway's message memory (mta/smtp/server/message_memory.py)
        self._held = 0                  # bytes of it this session's message holds
        self._waiting = False           # a hook's Deferred is pending: input stays in the buffer
        self._paused = False            # reading is paused (a pending hook, or replies not drained)
        self._unsent_full = False       # the transport holds more unsent replies than its bufferSize
        self._producing = False         # registered as the transport's producer
        self._log_behind = False        # the protocol log's writer is behind (mta/io/linebuffer.py)
        self.errors = 0                 # error replies so far (limits.max_errors)
        self._processing = False
        self._after_send: list[Any] | None = None   # what to do once the reply being worked out is sent
        self._timer: int | None = None  # this session's key in factory.deadlines
        self._delegate: Any = None      # the protocol the connection was handed to (ATRN/TURN)
        self.client_bucket = 0          # the client's place in the per-client table (factory.client_limits)
        self._last_input = 0.0
        self._line_started = 0.0        # when the command line now being read could start
        self._data_started: float | None = None     # when the transaction's DATA or first BDAT began
        self._data_bytes = 0            # message octets read since then
        # AUTH (mta/smtp/server/auth.py): the exchange waiting for the client's next line, and failures so far
        self.sasl_continuation: Any = None
        self.auth_failures = 0
        # Diagnostics listeners are looked up once per connection: events stay free when nobody listens.
        self._diagnostics = self.hooks.listening()
        # does anyone write the per-command events (smtp_protocol/maximum)? A listener may say with a
        # ``wants_event(category, level)`` method on its plugin object (diag_logging does); one without
        # it gets everything. Asked once per connection (about twenty places a message would ask), so
        # SIGHUP'd levels apply to new connections.
        self._detail = self._diagnostics and self.hooks.wants_event("smtp_protocol", "maximum")
        # W3C protocol log (mta/smtp/server/protocol_log.py): the command waiting for the reply that settles it
        self._plog = factory.protocol_log
        self._plog_cmd: _LoggedCommand | None = None
        self._plog_rejects = RejectedCommands() if self._plog is not None else None
        # the mail log (mta/smtp/server/mail_lines.py): the command being answered, for its reject: line
        self._mail_log = maillog.of(factory.gateway)
        self._stage: tuple[str, str, Envelope | None] | None = None
        # open transactions of this process, and this session's place at its gate (mta/smtp/server/intake.py)
        self._intake = factory.intake
        self._gate = GATE_FREE
        self._in_flight = False         # this session's transaction counts in self._intake.open

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer, local = self.transport.getPeer(), self.transport.getHost()
        self.session = Session(
            id=workers.fresh_id(), virtual_server=self.vs.name,
            peer_host=getattr(peer, "host", ""), peer_port=getattr(peer, "port", 0),
            local_host=getattr(local, "host", ""), local_port=getattr(local, "port", 0),
            tls=ISSLTransport.providedBy(self.transport))
        self._last_input = self._line_started = self.reactor.seconds()
        self._timer = self.factory.deadlines.add(self._last_input + self.vs.limits.timeout, self)
        self.transport.registerProducer(self, True)
        self._producing = True
        self._event("connection_manager", "medium", "connect", peer=self.session.peer_host,
                    virtual_server=self.vs.name)
        self._stage = (mail_lines.CONNECT, "", None)
        self._respond(self._ask(self.hooks.connect(self.session), self._greeting))

    def connectionLost(self, reason: Any = None) -> None:
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
        self._stop_timer()
        if self.state is not State.CLOSED:
            self._enter(State.CLOSED, "connection lost")
        self._buf, self._pos, self._reader = b"", 0, None
        if self._held:                  # a message cut off mid-DATA/BDAT gives its memory back
            self._release_held()
        if self._in_flight:
            self._end_in_flight()
        if self._plog_rejects is not None:
            self._plog_left_out()
        self.factory.connection_closed(self)
        if self.session is not None:
            self._event("connection_manager", "medium", "disconnect")

    def shut_down(self) -> None:
        """The gateway is stopping: ``421 4.3.2`` now, or right after the reply being worked out when
        a hook or the spool write of a message is pending (that message gets its 250 first)."""
        if self._delegate is not None:
            self.transport.loseConnection()
        elif self.state is not State.CLOSED:
            if self._waiting:
                self._then(lambda: self._send(R.SHUTTING_DOWN))
            else:
                self._send(R.SHUTTING_DOWN)

    def _greeting(self, verdict: Reply | None) -> Reply:
        if verdict is None or verdict.is_positive:
            self._enter(State.CONNECTED, "greeted client")
            return verdict or self.factory.banner(self.hostname, self.reactor.seconds())
        return replace(verdict, disconnect=True)

    def _deadline(self) -> tuple[float, str]:
        """When the client will have been too slow, and the reply's text then. Deadlines run from
        the last complete command line (or message, or chunk), not from the last byte: a command line
        must be complete within ``timeout``; inside a message, no byte for ``timeout`` is too slow,
        and so is moving less than ``min_data_rate`` bytes a second once the first minute (or
        ``timeout``, if shorter) has passed -- Postfix's ``smtpd_per_request_deadline`` and
        ``smtpd_min_data_rate``."""
        limits = self.vs.limits
        if self.state in (State.DATA, State.BDAT):
            deadline, why = self._last_input + limits.timeout, "timeout exceeded"
        else:
            deadline, why = self._line_started + limits.timeout, "timeout exceeded"
        if self._data_started is not None and limits.min_data_rate:
            slowest = (self._data_started + min(limits.timeout, DATA_RATE_GRACE)
                       + self._data_bytes / limits.min_data_rate)
            if slowest < deadline:
                deadline, why = slowest, "data rate too low"
        return deadline, why

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self.factory.deadlines.remove(self._timer, self)
            self._timer = None

    def deadline_passed(self) -> None:
        """The deadline this session last set in ``factory.deadlines`` has come (mta/io/deadlines.py):
        set the next one, or answer the client that was too slow."""
        self._timer = None
        if self.state is State.CLOSED:
            return
        now = self.reactor.seconds()
        if self._waiting or self._log_behind or self._gate is GATE_WAITING:     # we are the slow one
            self._timer = self.factory.deadlines.add(now + self.vs.limits.timeout, self)
            return
        deadline, why = self._deadline()
        if now < deadline:
            self._timer = self.factory.deadlines.add(deadline, self)
            return
        if self._unsent_full:           # the client has not read our replies for the whole timeout
            self._abort("replies not read")
            return
        self._event("smtp_protocol", "minimum", "client too slow", why=why)
        self._send(R.too_slow(self.hostname, why))

    # -- input -----------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        self._last_input = self.reactor.seconds()
        if self.state is State.CLOSED:
            return
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0
        if (self._waiting or self._unsent_full) and len(self._buf) > MAX_PENDING_INPUT:
            log.warn("session {session}: input flood while waiting, dropping", session=self.session.id)
            self._enter(State.CLOSED, "input flood")
            self.transport.abortConnection()
            return
        self._process()

    def _process(self) -> None:
        """Answer every complete command (or message) in the buffer, in order, until a hook is pending."""
        if self._processing:
            return
        self._processing = True
        try:
            while (not (self._waiting or self._unsent_full or self._log_behind)
                   and self.state is not State.CLOSED and self._pos < len(self._buf)):
                if (self.state is State.GREETED and (self._intake.full or self._gate is GATE_WAITING)
                        and self._waits_for_intake()):
                    break
                try:
                    if not self._step():
                        break
                except Exception:
                    self._internal_error()
        finally:
            self._processing = False
            if self._pos >= len(self._buf):
                self._buf, self._pos = b"", 0

    def _step(self) -> bool:
        """Handle one unit of input; False when more input is needed."""
        if self.state is State.DATA:
            reader = self._reader
            stored = reader.size
            pos = reader.feed(self._buf, self._pos)
            self._hold(reader, stored)
            moved = self._advance(pos)
            if reader.done:
                self._line_started = self._last_input
                self._respond(self._end_of_data(reader))
                return True
            return moved
        if self.state is State.BDAT:
            chunk = self._chunk
            message = chunk.message
            stored = message.size if message is not None else 0
            pos = chunk.feed(self._buf, self._pos)
            if message is not None:         # None: a refused chunk, only counted off
                self._hold(message, stored)
            moved = self._advance(pos)
            if chunk.done:
                self._line_started = self._last_input
                self._respond(self._chunk_done(chunk))
                return True
            return moved
        item, self._pos = self._splitter.next_line(self._buf, self._pos)
        if item is None:
            return False
        self._line_started = self._last_input
        self._respond(self._line(item))
        return True

    def _line(self, item: bytes | Problem) -> Reply | defer.Deferred:
        if self.sasl_continuation is not None:     # a SASL response, not a command: never logged
            continuation, self.sasl_continuation = self.sasl_continuation, None
            if self._plog_cmd is not None and not isinstance(item, Problem):
                self._plog_cmd.bytes_in += len(item) + 2
            return continuation(item)
        self._stage = None              # a line that is no command is refused without a reject: line
        if isinstance(item, Problem):
            self._event("smtp_protocol", "maximum", "bad command line", problem=item.value)
            if self._plog is not None:
                self._plog_cmd = _LoggedCommand("-", f"- {item.value}", 0, self.reactor.seconds())
            return R.COMMAND_PROBLEMS[item]
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            return R.BAD_CHARACTERS
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        self._stage = (verb, argument, self.envelope)
        if self._detail:
            self._event("smtp_protocol", "maximum", "command",
                        line=mask_auth_command(text) if verb == "AUTH" else text)
        if self._plog is not None:
            self._plog_cmd = _LoggedCommand(verb, mask_auth_command(text) if verb == "AUTH" else text,
                                            len(item) + 2, self.reactor.seconds())
        if verb == "DATA" and self._pos < len(self._buf):
            return self._improper_pipelining()
        command = COMMANDS.get(verb)
        if command is None:
            return self._ask(self.hooks.command(self.session, verb, argument), self._unknown_answered)
        refusal = command.refusals.get(self.state)
        if refusal is not None:
            return refusal
        return getattr(self, command.handler)(argument)

    def _improper_pipelining(self) -> Reply:
        """Input after DATA that came before DATA's reply (RFC 2920 3.1: DATA ends a pipelined group):
        message content sent before the 354, or commands. Taken as content it would be a message the
        client never saw accepted; taken as commands, a message body could run as a transaction
        (what smuggling probes try). As Postfix 3.9 (smtpd_forbid_unauth_pipelining): 554 and close."""
        text = repr(self._buf[self._pos:self._pos + 100])[2:-1]     # printable, as Postfix logs it
        log.info("improper command pipelining after DATA from {peer}: {text}",
                 peer=self.session.peer_host, text=text)
        self._event("smtp_protocol", "minimum", "improper command pipelining after DATA", input=text)
        return R.IMPROPER_PIPELINING

    # -- output: the one place that writes -------------------------------------------------------

    def _respond(self, result: Reply | defer.Deferred | None) -> None:
        if result is None:              # BDAT: the reply waits for the chunk's octets
            return
        # a Reply is told by its type first: isinstance against Deferred (an ABC) costs two more calls
        if type(result) is Reply or not isinstance(result, defer.Deferred):
            if result.code >= 400:
                self._log_refusal(result)
            self._send(result)
            return
        self._waiting = True
        result.addCallbacks(self._resume, self._resume_failed)
        self._update_reading()

    def _resume(self, reply: Any) -> None:
        try:
            self._waiting = False
            if not isinstance(reply, Reply):
                log.error("session {session}: not a Reply: {reply!r}", session=self.session.id, reply=reply)
                reply = R.INTERNAL_ERROR
            self._last_input = self._line_started = self.reactor.seconds()
            if reply.code >= 400:
                self._log_refusal(reply)
            self._send(reply)
            self._update_reading()
            self._process()
        except Exception:
            log.failure("session {session}: resuming failed", session=self.session.id)
            self._abort("internal error")

    def _resume_failed(self, failure: Any) -> None:
        log.failure("session {session}: internal error", failure, session=self.session.id)
        self._resume(R.INTERNAL_ERROR)

    def _send(self, reply: Reply) -> None:
        if self.state is not State.CLOSED:
            wire = _WIRE.get(id(reply)) or reply.to_bytes()
            send_now(self.transport, wire)
            if self._detail:
                self._event("smtp_protocol", "maximum", "reply", reply=reply)
            if self._plog_cmd is not None:
                self._plog_reply(reply, len(wire))
            if reply.disconnect or reply.code == 421:
                self._enter(State.CLOSED, f"closing after {reply.code}")
                self._unregister()          # else a paused producer keeps the close waiting
                self.transport.loseConnection()
            elif reply.code >= 400 and reply not in _NOT_ERRORS:
                self._count_error()
            if reply.code != 334:       # the command is settled: an idle session keeps none of it
                self._stage = None
        if self._after_send:
            actions, self._after_send = self._after_send, None
            for action in actions:
                action()

    def _then(self, action: Any) -> None:
        """Run ``action`` once the reply being worked out has been sent."""
        if self._after_send is None:
            self._after_send = []
        self._after_send.append(action)

    def _log_refusal(self, reply: Reply) -> None:
        """The mail log's ``reject:`` line for a command's answer (not for the gateway's own 421s)."""
        if self._stage is None or self.state is State.CLOSED:
            return
        verb, argument, envelope = self._stage
        line = mail_lines.reject(self.session, verb, argument, envelope, reply)
        if line is not None:
            self._mail_log.write(line)

    def _plog_reply(self, reply: Reply, size: int) -> None:
        """One protocol log line per command, once a reply settles it (334/354 only lead on)."""
        cmd = self._plog_cmd
        cmd.bytes_out += size
        if reply.code in (334, 354):
            return
        self._plog_cmd = None
        now = self.reactor.seconds()
        line = cmd.line
        if reply.code >= 400:           # rejected: at most one line per kind per second
            cmd.reply = reply
            kind = (cmd.verb if cmd.verb in COMMANDS else "?", reply.code)
            count = self._plog_rejects.admit(kind, now, cmd)
            if not count:
                return
            line = counted(line, count)
        self._plog.command(self.session, cmd.verb, line, reply, cmd.bytes_in, cmd.bytes_out, now - cmd.started)
        if self._plog.buffer.full and not self._log_behind:    # wait for the disk rather than grow
            self._log_behind = True
            self._update_reading()
            self._plog.buffer.when_drained(self._log_caught_up)

    def _log_caught_up(self) -> None:
        self._log_behind = False
        self._update_reading()
        self._process()

    def _plog_left_out(self) -> None:
        """At the end of the session: one line for each kind of rejected command still unwritten."""
        now = self.reactor.seconds()
        for cmd, count in self._plog_rejects.left_out():
            self._plog.command(self.session, cmd.verb, counted(cmd.line, count), cmd.reply, cmd.bytes_in,
                               cmd.bytes_out, now - cmd.started)

    def _count_error(self) -> None:
        """Postfix's ``smtpd_hard_error_limit``: a client that keeps getting errors is cut off, so a
        flood of bad lines costs a bounded number of replies (and protocol log lines)."""
        self.errors += 1
        if self.errors >= self.vs.limits.max_errors:
            self._event("smtp_protocol", "minimum", "too many errors", errors=self.errors)
            self._send(R.TOO_MANY_ERRORS)

    def _abort(self, why: str) -> None:
        """Drop the connection now, unsent replies and all."""
        self._enter(State.CLOSED, why)
        self.transport.abortConnection()

    # -- backpressure: the transport calls these (IPushProducer) ----------------------------------

    def pauseProducing(self) -> None:
        """More than the transport's bufferSize of replies waits unsent: stop reading and answering."""
        self._unsent_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The replies have drained: read and answer again."""
        self._unsent_full = False
        self._update_reading()
        self._process()

    def stopProducing(self) -> None:
        """The connection is gone; ``connectionLost`` cleans up."""

    def _unregister(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def _update_reading(self) -> None:
        """Read from the client unless a hook is pending, our replies are not drained, or the
        protocol log is behind. Over TLS, undrained replies do not stop reading: the TLS layer also
        pauses us while its handshake holds our writes, and the handshake needs to read. There the
        session only stops answering, and input beyond ``MAX_PENDING_INPUT`` ends the connection."""
        stop = (self._waiting or self._log_behind or self._gate is GATE_WAITING
                or (self._unsent_full and not self.session.tls))
        if stop != self._paused and self.state is not State.CLOSED:
            self._paused = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _internal_error(self) -> None:
        log.failure("session {session}: internal error", session=self.session.id)
        if self.state in (State.DATA, State.BDAT):     # never fall back to command mode inside a message
            self._send(replace(R.INTERNAL_ERROR, code=421, disconnect=True))
            return
        self._reset_transaction()
        self._send(R.INTERNAL_ERROR)

    # -- state -----------------------------------------------------------------------------------

    def _enter(self, state: State, why: str) -> None:
        old, self.state = self.state, state
        if self._detail and self.session is not None:
            self._event("smtp_protocol", "maximum", "state", old=old.value, new=state.value, why=why)

    def _reset_transaction(self) -> None:
        self.envelope = None
        if self._in_flight:             # (checked here: HELO/EHLO and RSET with nothing open are common)
            self._end_in_flight()
        self._data_started = None
        self._reader = None
        self._chunked = None
        if self._held:
            self._release_held()
        if self.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT, State.CHUNKING):
            self._enter(State.GREETED, "transaction reset")

    @staticmethod
    def _ask(verdict: Reply | defer.Deferred | None, then: Any) -> Reply | defer.Deferred:
        """Continue with ``then(verdict)`` once a verdict hook (``self.hooks.<hook>(...)``) has
        answered: at once when the answer is at hand."""
        if verdict is not None and type(verdict) is not Reply and isinstance(verdict, defer.Deferred):
            return verdict.addCallback(then)
        return then(verdict)

    def _date(self) -> str:
        return rfc5322_date(self.reactor.seconds())

    def _event(self, category: str, level: str, message: str, **fields: Any) -> None:
        if self._diagnostics:
            self.hooks.event(category, level, message, session=self.session.id, **fields)

    # -- verbs -----------------------------------------------------------------------------------

    def extensions(self) -> list[str]:
        """The EHLO keywords; STARTTLS/AUTH add theirs here."""
        keywords = ["PIPELINING", f"SIZE {self.vs.limits.max_message_size}", "8BITMIME",
                    "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8", "CHUNKING"]
        if self.factory.tls_context is not None and not self.session.tls:
            keywords.append("STARTTLS")
        if self.session.tls:            # RFC 8689 4: only over TLS; kept with the message (mail_params)
            keywords.append("REQUIRETLS")
        if self.factory.auth is not None:
            auth = self.factory.auth.keyword(self.session)
            if auth:
                keywords.append(auth)
        keywords.extend(k for k in self.hooks.ehlo_keywords(self.session) if k not in keywords)
        return keywords

    def mail_parameters(self) -> frozenset[str]:
        """MAIL FROM parameters we take; AUTH= (RFC 4954 5) is taken, and ignored, where AUTH is offered.
        RET/ENVID (RFC 3461, mta/dsn/params.py) are kept with the envelope for the queue's reports."""
        if self.factory.auth is not None:
            return _MAIL_PARAMETERS_AUTH
        return _MAIL_PARAMETERS

    def rcpt_parameters(self) -> frozenset[str]:
        """RCPT TO parameters we take: NOTIFY/ORCPT (RFC 3461), kept per recipient for the queue."""
        return dsn_params.RCPT_KEYWORDS

    def smtp_EHLO(self, argument: str) -> Reply | defer.Deferred:
        return self._hello(argument.strip(), esmtp=True)

    def smtp_HELO(self, argument: str) -> Reply | defer.Deferred:
        return self._hello(argument.strip(), esmtp=False)

    def _hello(self, name: str, esmtp: bool) -> Reply | defer.Deferred:
        if not name:
            return R.syntax("EHLO hostname" if esmtp else "HELO hostname")
        if not address.is_helo_name(name):     # it goes into Received: as is (RFC 5321 4.1.1.1, 4.4)
            self._event("smtp_protocol", "medium", "bad HELO/EHLO argument", name=name)
            return R.BAD_HELO
        return self._ask(self.hooks.helo(self.session, name), partial(self._hello_answered, name, esmtp))

    def _hello_answered(self, name: str, esmtp: bool, verdict: Reply | None) -> Reply:
        if verdict is not None and not verdict.is_positive:
            return verdict
        self._reset_transaction()
        self.session.helo, self.session.esmtp = name, esmtp
        if self.state is State.CONNECTED:
            self._enter(State.GREETED, "HELO/EHLO")
        if not esmtp:
            return self.factory.helo_reply(self.hostname)
        lines = [f"{self.hostname} Hello {name} [{self.session.peer_host}]", *self.extensions()]
        return R.hello("\n".join(lines))

    def smtp_MAIL(self, argument: str) -> Reply | defer.Deferred:
        if argument[:5].upper() != "FROM:":
            return R.syntax("MAIL FROM:<address>")
        if self.vs.tls.required and not self.session.tls:
            return R.TLS_REQUIRED
        if self.vs.auth.required and not self.session.authenticated_user:
            return R.AUTH_REQUIRED
        rest = ""
        try:
            path, rest = address.split_argument(argument, "FROM")
            params = address.parse_params(rest, utf8=True) if rest else {}
            sender = address.parse_path(path, allow_null=True, utf8="SMTPUTF8" in params)
        except AddressError as e:
            return _param_error(e, rest)
        refusal = self._check_mail_params(params, rest)
        if refusal is not None:
            return refusal
        envelope = Envelope(id=workers.queue_id(self.gateway))     # owned by this worker (mta/workers/identity.py)
        return self._ask(self.hooks.mail_from(self.session, envelope, sender, params),
                         partial(self._mail_answered, envelope, sender, params))

    def _check_mail_params(self, params: dict[str, str | None], text: str) -> Reply | None:
        if not params:
            return None
        if not self.session.esmtp:
            return R.PARAMS_AFTER_HELO
        if not params.keys() <= self.mail_parameters():
            return R.UNSUPPORTED_PARAM
        if "SMTPUTF8" not in params and not text.isascii():
            return R.BAD_PARAMS
        if "SIZE" in params:
            size = params["SIZE"]
            if size is None or not (size.isascii() and size.isdigit()) or len(size) > 20:
                return R.BAD_SIZE
            if int(size) > self.vs.limits.max_message_size:
                return R.MESSAGE_TOO_BIG
        if "BODY" in params and (params["BODY"] or "").upper() not in ("7BIT", "8BITMIME"):
            return R.BAD_BODY
        if params.get("SMTPUTF8", None) is not None:
            return R.UNSUPPORTED_PARAM
        if "REQUIRETLS" in params and (params["REQUIRETLS"] is not None or not self.session.tls):
            return R.UNSUPPORTED_PARAM
        if "RET" in params or "ENVID" in params:
            return dsn_params.check_mail(params)
        return None

    def _mail_answered(self, envelope: Envelope, sender: str, params: dict[str, str | None],
                       verdict: Reply | None) -> Reply:
        reply = verdict or R.SENDER_OK
        if not reply.is_positive:
            return reply
        envelope.sender, envelope.mail_params = sender, params
        if params.get("SIZE"):
            envelope.declared_size = int(params["SIZE"])
        self.envelope = envelope
        if self.state is not State.CLOSED:
            self._intake.begin()
            self._in_flight = True
            self._gate = GATE_FREE
        self._enter(State.MAIL, "sender accepted")
        return reply

    def smtp_RCPT(self, argument: str) -> Reply | defer.Deferred:
        if argument[:3].upper() != "TO:":
            return R.syntax("RCPT TO:<address>")
        envelope = self.envelope
        if len(envelope.recipients) >= self.vs.limits.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        rest = ""
        try:
            path, rest = address.split_argument(argument, "TO")
            params = address.parse_params(rest) if rest else {}
            recipient = address.parse_path(path, allow_null=False, utf8="SMTPUTF8" in envelope.mail_params,
                                           allow_postmaster=True)
        except AddressError as e:
            return _param_error(e, rest)
        if params:
            refusal = self._check_rcpt_params(params)
            if refusal is not None:
                return refusal
        if recipient == "postmaster":
            recipient = self.gateway.config.gateway.postmaster
            self._event("categorizer", "medium", "postmaster resolved", recipient=recipient)
        mail_lines.note_rewrite(envelope, recipient, mail_lines.path_in(path))
        cost = message_memory.recipient_cost(argument, len(params))
        return self._ask(self.hooks.rcpt_to(self.session, envelope, recipient, params),
                         partial(self._rcpt_answered, envelope, recipient, params, cost))

    def _check_rcpt_params(self, params: dict[str, str | None]) -> Reply | None:
        if not self.session.esmtp:
            return R.PARAMS_AFTER_HELO
        if not params.keys() <= self.rcpt_parameters():
            return R.UNSUPPORTED_PARAM
        return dsn_params.check_rcpt(params)

    def _rcpt_answered(self, envelope: Envelope, recipient: str, params: dict[str, str | None], cost: int,
                       verdict: Reply | None) -> Reply:
        reply = verdict or R.RELAY_DENIED       # nobody claimed it: never an open relay
        if not reply.is_positive:
            return reply
        if recipient not in envelope.rcpt_params:
            if self.state is State.CLOSED or not self._memory.reserve(cost):
                return self._no_room_for_recipient(envelope)
            self._held += cost                  # the envelope counts against the message memory
            if not envelope.recipients:     # the transaction has its queue id from now on (Postfix's smtpd)
                self._mail_log.write(mail_lines.client(self.session, envelope))
            envelope.recipients.append(recipient)
        envelope.rcpt_params[recipient] = params
        if self.state is State.MAIL:
            self._enter(State.RCPT, "recipient accepted")
        return reply

    def smtp_DATA(self, argument: str) -> Reply:
        if argument.strip():
            return R.syntax("DATA")
        if self._no_room_for_declared_size():
            return R.INSUFFICIENT_STORAGE
        self._reader = DataReader(self.vs.limits.max_message_size)
        self._data_started, self._data_bytes = self.reactor.seconds(), 0
        self._enter(State.DATA, "DATA")
        return R.START_DATA

    def smtp_BDAT(self, argument: str) -> Reply | defer.Deferred | None:
        """RFC 3030. The reply comes once the announced octets are in (``_chunk_done``); a refused
        chunk is counted off too, so its octets never run as commands. No BINARYMIME: BODY=BINARYMIME
        is refused at MAIL, and content follows the line rules in ``mta.smtp.lines.ChunkedMessage``."""
        size, last, valid = server_bdat.parse_argument(argument)
        if size is None:
            return R.BDAT_SYNTAX
        refusal, message = None, None
        if not valid:
            refusal = R.BDAT_SYNTAX
        elif self.state in (State.CONNECTED, State.GREETED):
            refusal = R.NEED_MAIL
        elif self.state is State.MAIL:
            refusal = R.NEED_RCPT
        elif self._chunked is None and self._no_room_for_declared_size():
            refusal = R.INSUFFICIENT_STORAGE
        else:
            limit = self.vs.limits.max_message_size
            message = self._chunked or ChunkedMessage(limit)
            if message.size + size > limit:     # refused before a byte is stored
                self._event("smtp_protocol", "medium", "message refused", envelope=self.envelope.id,
                            problem=Problem.TOO_BIG.value)
                self._reset_transaction()
                refusal, message = R.MESSAGE_TOO_BIG, None
            else:
                self._chunked = message
        chunk = server_bdat.Chunk(size, last, message, refusal, resume=self.state)
        if message is not None and self._data_started is None:     # the transaction's first chunk
            self._data_started, self._data_bytes = self.reactor.seconds(), 0
        if chunk.done:
            return self._chunk_done(chunk)
        self._chunk = chunk
        self._enter(State.BDAT, "BDAT")
        return None

    def _chunk_done(self, chunk: server_bdat.Chunk) -> Reply | defer.Deferred:
        self._chunk = None
        if chunk.refusal is not None:
            if self.state is State.BDAT:
                self._enter(chunk.resume, "BDAT octets skipped")
            return chunk.refusal
        message = chunk.message
        if chunk.last:
            message.finish()
        if chunk.last or message.problem is not None:
            return self._end_of_data(message)       # resets the transaction, refuses a problem
        self._enter(State.CHUNKING, "chunk received")
        return R.chunk_received(chunk.size)

    def smtp_RSET(self, argument: str) -> Reply:
        if argument.strip():
            return R.syntax("RSET")
        self._reset_transaction()
        return R.OK

    def smtp_NOOP(self, argument: str) -> Reply:
        return R.OK

    def smtp_QUIT(self, argument: str) -> Reply:
        return R.BYE

    def smtp_VRFY(self, argument: str) -> Reply:
        return R.VRFY_REPLY if argument.strip() else R.syntax("VRFY address")

    def smtp_HELP(self, argument: str) -> Reply:
        """The verbs offered to this session now: STARTTLS, AUTH, ETRN... only where EHLO offers them."""
        offered = {keyword.split(" ", 1)[0] for keyword in self.extensions()}
        return R.help_reply([*_BASE_VERBS, *(verb for verb in _EXTENSION_VERBS if verb in offered)])

    def smtp_STARTTLS(self, argument: str) -> Reply:
        if self.factory.tls_context is None:
            return R.TLS_UNAVAILABLE
        if self.session.tls:
            return R.TLS_ACTIVE
        if argument.strip():
            return R.syntax("STARTTLS")
        self._then(self._start_tls)
        return R.START_TLS

    def _start_tls(self) -> None:
        """RFC 3207 4.2: forget everything said in plaintext, including what was pipelined after us."""
        if self.state is State.CLOSED:
            return
        self._buf, self._pos = b"", 0
        self._splitter.reset()
        self._reset_transaction()
        self.session.helo, self.session.esmtp, self.session.tls = None, False, True
        self.session.authenticated_user, self.sasl_continuation = None, None
        self._enter(State.CONNECTED, "STARTTLS")
        self._event("transport_security", "medium", "STARTTLS: TLS handshake started", peer=self.session.peer_host)
        self.transport.startTLS(self.factory.tls_context)

    def smtp_AUTH(self, argument: str) -> Reply | defer.Deferred:
        if self.factory.auth is None:
            return R.AUTH_NOT_ENABLED
        return self.factory.auth.command(self, argument)

    def _unknown_answered(self, verdict: Reply | None) -> Reply:
        take_over = getattr(verdict, "take_over", None)
        if take_over is not None and verdict.is_positive:
            self._then(partial(self._hand_over, take_over))
        return verdict or R.UNKNOWN_COMMAND

    def _hand_over(self, take_over: Any) -> None:
        """The roles reverse (ATRN/TURN): this session ends but the connection stays open; input
        already read and all that follows goes to the protocol ``take_over`` connects."""
        if self.state is State.CLOSED:
            return
        pending = self._buf[self._pos:]
        self._buf, self._pos, self._reader = b"", 0, None
        self._enter(State.CLOSED, "connection handed over")
        self._stop_timer()
        self._unregister()                      # the new protocol may register its own
        self._unsent_full = False
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._delegate = take_over(self.transport, pending)

    # -- end of DATA -----------------------------------------------------------------------------

    def _end_of_data(self, reader: DataReader | ChunkedMessage) -> Reply | defer.Deferred:
        envelope = self.envelope
        self._stage = (mail_lines.END_OF_MESSAGE, "", envelope)
        held, self._held = self._held, 0    # the message's memory: given back once it is queued or refused
        counted, self._in_flight = self._in_flight, False   # the transaction stays open until then too
        self._reset_transaction()
        try:
            if reader.problem is not None:
                self._settled(held, counted)
                self._event("smtp_protocol", "medium", "message refused", envelope=envelope.id,
                            problem=reader.problem.value)
                return R.DATA_PROBLEMS[reader.problem]
            message = MessageData(reader.chunks, reader.size)
            if message.header_count("Received") >= self.gateway.config.gateway.queue.max_hops:
                self._settled(held, counted)
                return R.TOO_MANY_HOPS
            message.prepend_header("Received", self._received(envelope))
            envelope.size = message.size
            result = self._ask(self.hooks.data(self.session, envelope, message),
                               partial(self._data_answered, envelope, message))
        except BaseException:
            self._settled(held, counted)
            raise
        if not (held or counted):
            return result
        if isinstance(result, defer.Deferred):
            return result.addBoth(self._released, held, counted)
        self._settled(held, counted)
        return result

    def _released(self, result: Any, held: int, counted: bool) -> Any:
        self._settled(held, counted)
        return result

    def _settled(self, held: int, counted: bool) -> None:
        """A message was queued or refused: its memory goes back, its transaction closes."""
        if held:
            self._memory.release(held)
        if counted:
            self._intake.end()

    # -- the intake gate (mta/smtp/server/intake.py) ---------------------------------------------------

    def _waits_for_intake(self) -> bool:
        """Whether the next command, a MAIL, waits for room among the process's open transactions
        (only called when the gate is full or this session already waits at it)."""
        if self._gate is GATE_PASS or self._buf[self._pos:self._pos + 4].upper() != b"MAIL":
            return False
        if self._gate is GATE_FREE:
            self._gate = GATE_WAITING
            self._update_reading()
            self._intake.wait(self._intake_room)
        return True

    def _intake_room(self) -> None:
        """Our turn at the gate (or the longest wait is over): this session's next MAIL goes in."""
        self._gate = GATE_PASS
        if self.state is State.CLOSED:
            return
        self._update_reading()
        self._process()

    def _end_in_flight(self) -> None:
        if self._in_flight:
            self._in_flight = False
            self._intake.end()

    # -- message memory (mta/smtp/server/message_memory.py) --------------------------------------------------

    def _hold(self, message: DataReader | ChunkedMessage, stored: int) -> None:
        """Reserve what the last read added to ``message`` (once per read, not per line: the memory
        budget's whole cost on the hot path)."""
        grown = message.size - stored
        if grown and message.problem is None and self._memory.reserve(grown):
            self._held += grown
        elif grown or message.problem is not None:
            self._over_budget(message)

    def _advance(self, pos: int) -> bool:
        """Move past what a message reader consumed; True if it consumed anything."""
        if self._plog_cmd is not None:
            self._plog_cmd.bytes_in += pos - self._pos
        self._data_bytes += pos - self._pos
        moved, self._pos = pos != self._pos, pos
        return moved

    def _over_budget(self, reader: DataReader | ChunkedMessage) -> None:
        """The last read did not fit in the message memory, or the message was refused anyway: drop
        what it holds at once so other sessions can go on; the rest is read off and answered 452."""
        if reader.problem is None:
            memory = self._memory
            self._event("smtp_protocol", "minimum", "message memory full", envelope=self.envelope.id,
                        held=memory.held, limit=memory.limit, size=reader.size)
            reader.refuse(Problem.NO_MEMORY)
        self._release_held()

    def _release_held(self) -> None:
        if self._held:
            self._memory.release(self._held)
            self._held = 0

    def _no_room_for_recipient(self, envelope: Envelope) -> Reply:
        """452 4.3.1 for a recipient the message memory has no room for: the client sends it later."""
        if self.state is not State.CLOSED:
            memory = self._memory
            self._event("smtp_protocol", "minimum", "message memory full", envelope=envelope.id,
                        held=memory.held, limit=memory.limit, recipients=len(envelope.recipients))
        return R.INSUFFICIENT_STORAGE

    def _no_room_for_declared_size(self) -> bool:
        """At DATA or the first BDAT: refuse at once when the free memory is less than MAIL FROM's
        SIZE= (the transaction is reset, as after a message refused at its end)."""
        declared = self.envelope.declared_size
        memory = self._memory
        if not declared or declared <= memory.free:
            return False
        memory.refusals += 1
        self._event("smtp_protocol", "minimum", "message memory full", envelope=self.envelope.id,
                    held=memory.held, limit=memory.limit, declared=declared)
        self._reset_transaction()
        return True

    def _data_answered(self, envelope: Envelope, message: MessageData,
                       verdict: Reply | None) -> Reply | defer.Deferred:
        if verdict is not None and not verdict.is_positive:
            return verdict
        if not (self.session.relay_allowed or self.session.authenticated_user):
            dsn_params.limit_untrusted(envelope, self.vs.dsn.untrusted)    # F4: no DSN reflection
        edits = self.hooks.before_queue(self.session, envelope, message)
        if edits is None:
            d = defer.maybeDeferred(self.gateway.queue.submit, self.session, envelope, message)
        else:
            d = edits.addCallback(lambda _: self.gateway.queue.submit(self.session, envelope, message))
        return d.addCallbacks(partial(self._queued, envelope), partial(self._queue_failed, envelope))

    def _queued(self, envelope: Envelope, queue_id: str) -> Reply:
        if self._plog_cmd is not None:      # the W3C DATA line names the message, as IIS's does
            self._plog_cmd.line = f"{self._plog_cmd.verb} <{queue_id}>"
        self._event("smtp_protocol", "medium", "message accepted", id=queue_id, sender=envelope.sender or "<>",
                    recipients=len(envelope.recipients), size=envelope.size)
        self._then(partial(self.hooks.queued, envelope))
        self.errors = 0                 # as Postfix: the limit is on errors "without delivering mail"
        return R.queued(queue_id)

    def _queue_failed(self, envelope: Envelope, failure: Any) -> Reply:
        if failure.check(SpoolError):       # the spool said why (a writer that cannot start): one line
            log.error("session {session}: queueing {envelope} failed: {why}", session=self.session.id,
                      envelope=envelope.id, why=failure.getErrorMessage())
        else:
            log.failure("session {session}: queueing {envelope} failed", failure,
                        session=self.session.id, envelope=envelope.id)
        return R.INTERNAL_ERROR

    def _received(self, envelope: Envelope) -> str:
        """The trace header of RFC 5321 4.4 (``with`` per RFC 3848 / RFC 6531)."""
        s = self.session
        ip = f"IPv6:{s.peer_host}" if ":" in s.peer_host else s.peer_host
        base = "UTF8SMTP" if "SMTPUTF8" in envelope.mail_params else "ESMTP"
        suffix = ("S" if s.tls else "") + ("A" if s.authenticated_user else "")
        protocol = base + suffix if (s.esmtp or suffix) else "SMTP"
        rcpt = f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
        # user names are restricted to comment-safe characters (mta/smtp/server/users.py USER_NAME)
        who = f"\r\n\t(Authenticated sender: {s.authenticated_user})" if s.authenticated_user else ""
        return (f"from {s.helo} ([{ip}]){who}\r\n\tby {self.hostname} (smtpgw) with {protocol} id {envelope.id}"
                f"{rcpt};\r\n\t{self._date()}")


def _param_error(error: AddressError, params_text: str) -> Reply:
    """A repeated DSN parameter is a 501 (RFC 3461, as Postfix answers); other repeats keep the 555."""
    if error.reply is R.DUPLICATE_PARAM:
        return dsn_params.duplicate_refusal(params_text) or error.reply
    return error.reply


class _TooBusy(Protocol):
    """Answers a connection over a limit and hangs up."""

    def __init__(self, hooks: Any, reply: Reply = R.TOO_MANY_CONNECTIONS, why: str = "too many connections") -> None:
        self.hooks = hooks
        self.reply = reply
        self.why = why

    def connectionMade(self) -> None:
        self.hooks.event("connection_manager", "minimum", self.why,
                         peer=getattr(self.transport.getPeer(), "host", ""), reply=self.reply.text)
        self.transport.write(self.reply.to_bytes())
        self.transport.loseConnection()


class SMTPServerFactory(ServerFactory):
    """The listener side of one virtual server: its limits, its TLS context, its connections."""

    noisy = False                       # no "Starting/Stopping factory" lines: the gateway logs its stop

    def __init__(self, gateway: Any, vs: VirtualServer) -> None:

        self.gateway = gateway
        self.vs = vs
        self.active = 0                 # this process's connections (the metrics endpoint reads it)
        self.sessions: set[SMTPServerProtocol] = set()     # open ones, told 421 when the gateway stops
        self.deadlines = Deadlines(gateway.reactor)         # their timeouts, one timer for all
        # With several workers, max_connections is the gateway's total, counted in a file they all
        # map (gateway.worker is set before tap builds the factories); None: this process is all.
        self.shared = SharedConnectionLimit.for_factory(gateway, vs)
        self.memory = gateway.message_memory     # one per process, shared by the virtual servers
        self.intake = intake.of(gateway)         # the open transactions, likewise
        self.client_limits = ClientLimits(gateway, vs)      # anvil-style, over every worker
        self.tls_context = None         # mta.smtp.server.tls.ServerTLS: re-read on SIGHUP
        if vs.tls.certificate and vs.tls.key:
            self.tls_context = ServerTLS(vs.tls.certificate, vs.tls.key, name=vs.name)
        self.auth = ServerAuth.for_virtual_server(vs, gateway.reactor)
        self.protocol_log = None        # mta.smtp.server.protocol_log.ProtocolLog: flushed by tap's ProtocolLogService
        if vs.protocol_log.enabled:
            self.protocol_log = ProtocolLog.for_virtual_server(gateway, vs)
        self._banner: tuple[int, str, Reply] | None = None     # (second, hostname, the 220)
        self._helo: tuple[str, Reply] | None = None            # (hostname, HELO's 250)

    def banner(self, hostname: str, now: float) -> Reply:
        """The 220 greeting, the same for every connection within one second: made once a second
        (and hostname: a reload may change it) rather than once a connection."""
        second = int(now)
        cached = self._banner
        if cached is not None and cached[0] == second and cached[1] == hostname:
            return cached[2]
        reply = R.banner(hostname, rfc5322_date(now))
        self._banner = (second, hostname, reply)
        return reply

    def helo_reply(self, hostname: str) -> Reply:
        """HELO's 250, the same for every session of a hostname: made once, not once a session."""
        cached = self._helo
        if cached is None or cached[0] != hostname:
            cached = self._helo = (hostname, R.hello(hostname))
        return cached[1]

    def buildProtocol(self, addr: Any) -> Protocol:
        drain = getattr(self.gateway, "drain", None)        # smtpgw cluster drain (mta/ops/drain.py)
        if drain is not None and drain.active:
            return _TooBusy(self.gateway.hooks, R.draining(self.gateway.config.gateway.hostname), "node draining")
        shared = self.shared
        total = self.active if shared is None else shared.total(self.active)
        if total >= self.vs.limits.max_connections:
            return _TooBusy(self.gateway.hooks)
        bucket, refusal = self.client_limits.admit(getattr(addr, "host", ""))
        if refusal is not None:
            return _TooBusy(self.gateway.hooks, refusal)
        self.active += 1
        if shared is not None:
            shared.publish(self.active)
        protocol = SMTPServerProtocol(self)
        protocol.client_bucket = bucket
        self.sessions.add(protocol)
        return protocol

    def connection_closed(self, protocol: SMTPServerProtocol) -> None:
        self.sessions.discard(protocol)
        self.client_limits.closed(protocol.client_bucket)
        self.active -= 1
        if self.shared is not None:
            self.shared.publish(self.active)
