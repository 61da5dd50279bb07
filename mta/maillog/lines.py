"""The mail log's lines, as Postfix writes them (``postfix/smtp``, ``postfix/qmgr``, ``postfix/smtpd``).

A :class:`MailLine` is a queue id, an ordered list of fields and an optional tail. ``text()`` gives
the Postfix form::

    4F3A...: to=<a@b.test>, relay=mx.b.test[192.0.2.1]:25, delay=1.2, delays=0.1/0/0.5/0.6, dsn=2.0.0, status=sent (250 2.0.0 Ok)
    4F3A...: from=<c@d.test>, size=1234, nrcpt=1 (queue active)
    NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.7.1 Relaying denied; from=<c@d.test> to=<a@b.test> proto=ESMTP helo=<client.test>

and ``json()`` one object per line (``time``, ``event``, ``id``, then the fields by name; addresses
without angle brackets, ``delays`` as a list of four numbers, the tail as ``reply`` or ``note``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from mta.smtp.reply import Reply

NOQUEUE = "NOQUEUE"
DELAY_RESOLUTION = 0.01          # Postfix's delay_logging_resolution_limit = 2: below it, 0


def delay_text(seconds: float) -> str:
    """Postfix's figures: two significant digits below 10 s, whole seconds above, 0 below 10 ms."""
    if seconds < DELAY_RESOLUTION:
        return "0"
    if seconds < 0.1:
        return f"{seconds:.2f}".rstrip("0").rstrip(".")
    if seconds < 9.95:
        return f"{seconds:.2g}"
    return str(int(round(seconds)))


def delay_number(seconds: float) -> float:
    return 0.0 if seconds < DELAY_RESOLUTION else round(seconds, 3)


def reply_text(reply: Reply) -> str:
    """A reply on one line (a multi-line reply's lines joined with a space)."""
    return " ".join(reply.lines())


def dsn_status(reply: Reply) -> str:
    """The enhanced status code, or the class's generic one when the reply has none (RFC 3463)."""
    return reply.status or f"{reply.code // 100}.0.0"


def iso_time(when: float) -> str:
    t = time.gmtime(when)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
            f"{t.tm_sec:02d}.{int(when * 1000) % 1000:03d}Z")


class Address(str):
    """An envelope address: ``<a@b>`` in text (``<>`` for the null sender), bare in JSON."""


class Delays(tuple):
    """Postfix's ``delays=a/b/c/d``: before the queue, in the queue, connection set-up, transmission."""

    def __str__(self) -> str:
        return "/".join(delay_text(x) for x in self)


class Seconds(float):
    def __str__(self) -> str:
        return delay_text(self)


def one_line(value: Any) -> str:
    """``str(value)`` with CR and LF shown as ``\\r``/``\\n``: one log line stays one line."""
    text = str(value)
    if "\n" in text or "\r" in text:
        text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text


def _text_value(value: Any) -> str:
    return f"<{value}>" if isinstance(value, Address) else one_line(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, Delays):
        return [delay_number(x) for x in value]
    if isinstance(value, Seconds):
        return delay_number(value)
    return value


@dataclass(frozen=True)
class MailLine:
    """One mail log line. ``event`` names its kind for JSON (delivery, queued, client, reject...);
    ``head`` is text written before the fields (``reject: RCPT from ...: <reply>;``); ``separator``
    is ``", "`` for the delivery agents' and qmgr's lines and ``" "`` for smtpd's reject lines."""

    queue_id: str
    event: str
    fields: Sequence[tuple[str, Any]] = ()
    tail: str | None = None
    tail_name: str = "reply"
    head: str = ""
    head_fields: Sequence[tuple[str, Any]] = field(default=())
    separator: str = ", "
    about_message: bool = True      # False: a line about a client, with no queue id (Postfix's warnings)

    def text(self) -> str:
        # ``k=_text_value(v)`` per field, inlined: a few lines of about four fields each per message
        pairs = []
        for k, v in self.fields:
            if v is None:
                continue
            if type(v) is str:
                text = v
            elif isinstance(v, Address):
                pairs.append(f"{k}=<{v}>")
                continue
            else:
                text = str(v)
            if "\n" in text or "\r" in text:
                text = text.replace("\r", "\\r").replace("\n", "\\n")
            pairs.append(f"{k}={text}")
        body = self.separator.join(pairs)
        parts = [f"{self.queue_id or NOQUEUE}:"] if self.about_message else []
        if self.head:
            parts.append(self.head)
        if body:
            parts.append(body)
        line = " ".join(parts)
        if self.tail is not None:
            line += f" ({_text_value(self.tail)})"
        return line

    def record(self, when: float) -> dict[str, Any]:
        out: dict[str, Any] = {"time": iso_time(when), "event": self.event, "id": self.queue_id or None}
        for k, v in (*self.head_fields, *self.fields):
            if v is not None:
                out[k] = _json_value(v)
        if self.tail is not None:
            out[self.tail_name] = self.tail
        return out

    def json(self, when: float) -> str:
        return json.dumps(self.record(when), ensure_ascii=False, default=str)


# -- the lines -------------------------------------------------------------------------------------

STATUS_SENT, STATUS_DEFERRED, STATUS_BOUNCED, STATUS_EXPIRED = "sent", "deferred", "bounced", "expired"


def delivery(queue_id: str, to: str, relay: str, delay: float, delays: Sequence[float], reply: Reply,
             status: str, orig_to: str | None = None, tls: str | None = None) -> MailLine:
    """``postfix/smtp`` (and ``local``): one recipient's outcome of one attempt; ``tls``: how the
    connection that answered was protected (verified, mta-sts, dane, opportunistic, none)."""
    return MailLine(queue_id, "delivery", (
        ("to", Address(to)), ("orig_to", Address(orig_to) if orig_to and orig_to != to else None),
        ("relay", relay), ("tls", tls or None), ("delay", Seconds(delay)), ("delays", Delays(delays)),
        ("dsn", dsn_status(reply)), ("status", status)), tail=reply_text(reply))


def queued(queue_id: str, sender: str, size: int, nrcpt: int) -> MailLine:
    """``postfix/qmgr``: a message entered the queue."""
    return MailLine(queue_id, "queued", (("from", Address(sender)), ("size", size), ("nrcpt", nrcpt)),
                    tail="queue active", tail_name="note")


def removed(queue_id: str) -> MailLine:
    """``postfix/qmgr``: the message left the queue (every recipient settled)."""
    return MailLine(queue_id, "removed", tail=None, head="removed")


NOTIFICATIONS = {"failed": "sender non-delivery notification", "delayed": "sender delay notification",
                 "delivered": "sender delivery status notification",
                 "relayed": "sender delivery status notification"}


def notification(queue_id: str, action: str, report_id: str) -> MailLine:
    """``postfix/bounce``: a DSN about this message was queued as ``report_id``."""
    what = NOTIFICATIONS.get(action, f"sender {action} notification")
    return MailLine(queue_id, "notification", head=f"{what}: {report_id}",
                    head_fields=(("action", action), ("report", report_id)))


def client(queue_id: str, client_name: str, sasl_username: str | None = None) -> MailLine:
    """``postfix/smtpd``: the client a queued message came from."""
    return MailLine(queue_id, "client", (("client", client_name), ("sasl_username", sasl_username)))


def reject(queue_id: str | None, stage: str, client_name: str, reply: Reply, sender: str | None,
           recipient: str | None, proto: str, helo: str | None) -> MailLine:
    """``postfix/smtpd``: a command refused with 4xx/5xx. ``stage`` is the verb (CONNECT, HELO, MAIL,
    RCPT, DATA, END-OF-MESSAGE...)."""
    return MailLine(
        queue_id or "", "reject",
        (("from", Address(sender) if sender is not None else None),
         ("to", Address(recipient) if recipient is not None else None),
         ("proto", proto), ("helo", Address(helo) if helo else None)),
        head=f"reject: {stage} from {client_name}: {reply_text(reply)};",
        head_fields=(("stage", stage), ("client", client_name), ("reply", reply_text(reply)),
                     ("dsn", dsn_status(reply))),
        separator=" ")


def auth_failed(client_name: str, mechanism: str, reason: str) -> MailLine:
    """``postfix/smtpd``'s ``warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: ...`` (what
    fail2ban's postfix-sasl filter reads)."""
    return MailLine("", "auth_failed", head=f"warning: {client_name}: SASL {mechanism} authentication failed: {reason}",
                    head_fields=(("client", client_name), ("mechanism", mechanism), ("reason", reason)),
                    about_message=False)


def client_name(ip: str) -> str:
    """Postfix's ``name[address]`` for a client whose name is not looked up (``unknown``, as Postfix
    writes with ``smtpd_peername_lookup = no``)."""
    return f"unknown[{ip}]"


def relay_name(hop: str) -> str:
    """``relay=`` from a next hop's label (``mx.b.test[192.0.2.1]:25``, ``[192.0.2.1]:25``): Postfix
    writes ``host[address]:port``, the address twice when there is no name; ``none`` when no hop
    answered (no route, DNS)."""
    if not hop:
        return "none"
    if hop.startswith("["):
        address = hop[1:hop.index("]")] if "]" in hop else hop[1:]
        return address + hop
    return hop
