"""The server's lines in the mail log (Postfix's smtpd): ``reject:`` for every command refused with 4xx
or 5xx -- by the core, a plugin or a local hook -- and ``client=`` when a transaction's first recipient
is accepted (its queue id from then on)::

    NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.7.1 Relaying denied; from=<a@b.test> to=<c@d.test> proto=ESMTP helo=<client.test>
    01a2...: reject: END-OF-MESSAGE from unknown[192.0.2.7]: 552 5.3.4 Message too big; from=<a@b.test> to=<c@d.test> proto=ESMTP helo=<client.test>
    01a2...: client=unknown[192.0.2.7], sasl_username=alice

A failed AUTH is Postfix's ``warning: unknown[192.0.2.7]: SASL PLAIN authentication failed: <why>``
(what fail2ban reads), not a ``reject:``. Not written: sequence errors (503, as Postfix), unknown verbs,
and the gateway's own 421s (timeout, shutdown), which answer no command.
"""
from __future__ import annotations

from typing import Any

from mta.maillog import lines
from mta.maillog.lines import MailLine
from mta.model.envelope import Envelope, Session
from mta.smtp.reply import Reply

END_OF_MESSAGE = "END-OF-MESSAGE"
CONNECT = "CONNECT"
# the stages whose refusals are logged (ETRN/ATRN/TURN come through the smtpgw_command hook)
REJECT_STAGES = frozenset({CONNECT, "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", END_OF_MESSAGE, "VRFY",
                           "ETRN", "ATRN", "TURN"})
ORIGINAL_RECIPIENTS = "orig_rcpt"      # envelope.extra: {recipient: what the client wrote}, when rewritten


def path_in(argument: str) -> str | None:
    """The address in ``FROM:<a@b> ...``/``TO:<a@b>`` as the client wrote it (None when there is none)."""
    start = argument.find("<")
    if start < 0:
        return None
    end = argument.find(">", start)
    return argument[start + 1:end if end >= 0 else len(argument)]


def client_of(session: Session) -> str:
    return lines.client_name(session.peer_host)


def reject(session: Session, stage: str, argument: str, envelope: Envelope | None, reply: Reply) -> MailLine | None:
    """The ``reject:`` line for ``reply`` answering ``stage``, or None when it is not a refusal to log."""
    if reply.code < 400 or reply.code == 503 or stage not in REJECT_STAGES:
        return None
    sender = envelope.sender if envelope is not None else None
    recipient = envelope.recipients[0] if envelope is not None and envelope.recipients else None
    if stage == "MAIL":
        sender = path_in(argument)
    elif stage == "RCPT":
        recipient = path_in(argument)
    elif stage not in ("DATA", "BDAT", END_OF_MESSAGE):
        recipient = None
    helo = argument.strip() if stage in ("HELO", "EHLO") else session.helo
    queue_id = envelope.id if envelope is not None and (envelope.recipients or stage == END_OF_MESSAGE) else None
    return lines.reject(queue_id, stage, client_of(session), reply, sender, recipient,
                        "ESMTP" if session.esmtp or stage == "EHLO" else "SMTP", helo)


def auth_failed(session: Session, mechanism: str, why: str) -> MailLine:
    return lines.auth_failed(client_of(session), mechanism, why)


def client(session: Session, envelope: Envelope) -> MailLine:
    return lines.client(envelope.id, client_of(session), session.authenticated_user)


def note_rewrite(envelope: Envelope, recipient: str, written: str | None) -> None:
    """Keep what the client wrote when the gateway changed it (``<postmaster>``, a source route), for
    the delivery lines' ``orig_to=``; it travels with the message (``entry.extra``)."""
    if written is not None and written.lower() != recipient.lower():
        originals: dict[str, Any] = envelope.extra.setdefault(ORIGINAL_RECIPIENTS, {})
        originals[recipient] = written
