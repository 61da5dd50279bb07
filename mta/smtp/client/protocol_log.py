"""Outbound SMTP protocol logs in the W3C Extended Log File Format, for the connectors that turn them on
(``connectors[].protocol_log``, the same keys as a virtual server's): what the gateway said to each next
hop and what it answered, one line per command, as the inbound log (mta/smtp/server/protocol_log.py).

Files are under ``<directory>/SMTPOUT<n>/`` (n: the connector's position in the configuration, from 1),
named and rolled over as IIS does (:mod:`mta.io.w3c`). The fields are the inbound log's, seen from the
side of the client, which here is the gateway:

* ``c-ip`` the address the connection left from; ``cs-username`` the AUTH user once logged in, else
  the HELO name we gave; ``s-ip``/``s-port`` the next hop's address and port, ``cs-host`` its name as
  routing found it (``mx.example.com[192.0.2.1]:25``); ``s-sitename`` ``SMTPOUT<n>``;
* ``cs-method`` the verb sent (``-`` for the next hop's greeting), ``cs-uri-query`` its arguments,
  ``sc-status`` the reply code; a command answered in steps (DATA and the message, AUTH and its SASL
  lines) is one line with the final reply, the bytes of every step (``cs-bytes`` sent, ``sc-bytes``
  received) and the time from the command to that reply. AUTH arguments are never written.
* Once a STARTTLS handshake succeeded, a ``TLS`` line says what checked it, as the mail log's
  ``tls=`` does (``tls=dane``, ``tls=mta-sts``, ``tls=verified``, ``tls=opportunistic``).
* A connection that breaks (timeout, lost, a protocol error) settles what was waiting with the
  ``4xx`` the delivery attempt sees.
"""
from __future__ import annotations

from collections import deque
from typing import Any

from mta.io.w3c import W3CLog, software

# Labels of the steps that continue the command before them (mta/smtp/client/session.py) rather than start one.
CONTINUATIONS = frozenset({"end of data", "AUTH username", "AUTH password", "AUTH cancel"})


def site_name(config: Any, connector: Any) -> str:
    """``SMTPOUT<n>``: the connector's log folder and ``s-sitename``."""
    names = [c.name for c in config.connectors]
    return f"SMTPOUT{names.index(connector.name) + 1 if connector.name in names else 1}"


class OutboundProtocolLog(W3CLog):
    """The outbound protocol log of one connector."""

    @classmethod
    def for_connector(cls, config: Any, connector: Any, reactor: Any) -> "OutboundProtocolLog":
        return cls(connector.protocol_log, site_name(config, connector), config.gateway.hostname, reactor,
                   software=software())

    def command(self, conn: Any, ends: tuple[Any, Any, Any], verb: str, query: str, status: Any,
                bytes_out: int, bytes_in: int, time_taken: float) -> None:
        """One line for a command ``conn`` (an SMTPClientProtocol) sent and the reply that settled it;
        ``ends`` is the connection's (local address, next hop's address, next hop's port)."""
        now = self.reactor.seconds()
        date, clock = self.stamp.at(now)
        policy = conn.policy
        user = policy.auth.username if conn.authenticated and policy is not None and policy.auth else conn.helo_name
        self.write_row(now, (
            date, clock, ends[0], user, self.site, self.computer, ends[1], ends[2],
            verb, None, query,                                    # cs-method, cs-uri-stem, cs-uri-query
            status, 0, bytes_in, bytes_out, int(time_taken * 1000),   # sc-status .. time-taken
            "SMTP", conn.hop_label))

    def conversation(self, conn: Any) -> "Conversation":
        return Conversation(self, conn)


class _Step:
    __slots__ = ("verb", "query", "bytes_out", "bytes_in", "started", "continues")

    def __init__(self, verb: str, query: str, bytes_out: int, started: float, continues: bool) -> None:
        self.verb, self.query, self.bytes_out, self.started = verb, query, bytes_out, started
        self.bytes_in, self.continues = 0, continues


class Conversation:
    """One connection's commands on their way to the log: what was sent, in order, until its reply."""

    def __init__(self, log: OutboundProtocolLog, conn: Any) -> None:
        self.log = log
        self.conn = conn
        self._pending: deque[_Step] = deque()
        self._open: _Step | None = None         # answered 334/354: the next step continues it
        self._ends: tuple[Any, Any, Any] | None = None      # read once: a closed transport has none

    def _addresses(self) -> tuple[Any, Any, Any]:
        if self._ends is None:
            try:
                local, peer = self.conn.transport.getHost(), self.conn.transport.getPeer()
                self._ends = (getattr(local, "host", None), getattr(peer, "host", None),
                              getattr(peer, "port", None))
            except Exception:
                return (None, None, None)
        return self._ends

    def sent(self, label: str, line: bytes | str | None, size: int) -> None:
        """A command (or the step of one, or nothing: the greeting) now waits for its reply."""
        now = self.log.reactor.seconds()
        self._addresses()
        if label in CONTINUATIONS:
            self._pending.append(_Step("", "", size, now, True))
            return
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else (line or "")
        verb, _, rest = text.partition(" ")
        if label == "AUTH":
            rest = rest.split(" ", 1)[0]                        # the mechanism only, never credentials
        self._pending.append(_Step(verb.upper() or "-", f" {rest}" if rest else "", size, now, False))

    def replied(self, reply: Any) -> None:
        if not self._pending:
            return
        step = self._pending.popleft()
        step.bytes_in = len(reply.to_bytes())
        if step.continues and self._open is not None:
            opened, self._open = self._open, None
            opened.bytes_out += step.bytes_out
            opened.bytes_in += step.bytes_in
            step = opened
        if reply.code in (334, 354):
            self._open = step
            return
        self._write(step, reply.code)

    def note(self, verb: str, query: str, status: int) -> None:
        """A line for something the session did that is not a command: ``TLS tls=dane`` once the
        STARTTLS handshake (and the check of the certificate it brought) succeeded."""
        now = self.log.reactor.seconds()
        self._write(_Step(verb, f" {query}", 0, now, False), status)

    def broken(self, reply: Any) -> None:
        """The connection broke: what still waited is settled with ``reply``'s code."""
        steps = ([self._open] if self._open is not None else []) + list(self._pending)
        self._open, self._pending = None, deque()
        for step in steps:
            if not step.continues:
                self._write(step, reply.code)

    def _write(self, step: _Step, status: int) -> None:
        self.log.command(self.conn, self._addresses(), step.verb, step.query, status, step.bytes_out,
                         step.bytes_in, self.log.reactor.seconds() - step.started)
