"""Delivery status notifications (RFC 3464): what the sender gets back when mail fails or lingers.

The report is a ``multipart/report; report-type=delivery-status`` with three parts: a note for the
person, the machine-readable ``message/delivery-status``, and the original headers
(``text/rfc822-headers``). It is built by hand rather than with ``email.message`` so that the bytes
are exactly what we spool: CRLF line endings, 7-bit, no line over 998 characters.
"""
from __future__ import annotations

import binascii
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable

from mta.queue_entry import QueueEntry, RecipientState
from mta.reply import Reply

FAILED, DELAYED = "failed", "delayed"
MAX_FIELD = 900
MAX_HEADERS = 256 * 1024
_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPLY_RE = re.compile(r"^(\d{3})[ -](?:([245]\.\d{1,3}\.\d{1,3}) )?(.*)$", re.S)


def rfc5322_date(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")


def ascii_text(text: str, limit: int = MAX_FIELD) -> str:
    """One line of printable ASCII: controls dropped, anything else replaced by '?'."""
    text = " ".join(text.replace("\r", " ").replace("\n", " ").split())
    out = "".join(c if " " <= c <= "~" else "?" for c in text)
    return out[:limit]


def ascii_address(address: str) -> str:
    """An address made 7-bit the RFC 6533 way (non-ASCII as ``\\x{HEX}``), so nothing is lost."""
    out = []
    for c in address:
        if "!" <= c <= "~" and c != "\\":
            out.append(c)
        else:
            out.append(f"\\x{{{ord(c):X}}}")
    return "".join(out)[:MAX_FIELD]


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext (``+2B`` style escapes), as used by ENVID and ORCPT."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def reply_from_text(text: str | None, default: Reply) -> Reply:
    """Turn a stored ``last_error`` (``str(Reply)``) back into a Reply."""
    if not text:
        return default
    m = _REPLY_RE.match(text)
    if not m:
        return Reply(default.code, default.status, text)
    return Reply(int(m.group(1)), m.group(2) or "", m.group(3))


def status_of(reply: Reply, action: str) -> str:
    """The RFC 3463 status for a report: the reply's own when it has one that fits the action."""
    status = reply.status if _STATUS_RE.match(reply.status or "") else ""
    if action == DELAYED:
        return status if status.startswith("4.") else "4.0.0"
    if status:
        return status
    return "5.0.0" if reply.code >= 500 else "4.0.0"


def remote_mta(hop: str | None) -> str | None:
    """``mx.example.test[192.0.2.1]:25`` -> ``mx.example.test``; ``[192.0.2.1]:25`` -> ``[192.0.2.1]``."""
    if not hop:
        return None
    m = re.match(r"^([^\[\]\s]+)\[[^\]]*\](?::\d+)?$", hop) or re.match(r"^(\[[^\]]*\])(?::\d+)?$", hop)
    return ascii_text(m.group(1) if m else hop, 255)


def header_block(original: bytes | None) -> bytes:
    """The original header section, CRLF-terminated; empty when there is none."""
    if not original:
        return b""
    head = original[:MAX_HEADERS]
    if head.startswith(b"\r\n"):
        return b""
    end = head.find(b"\r\n\r\n")
    block = head[: end + 2] if end >= 0 else head
    if not block.endswith(b"\r\n"):
        block = block[: block.rfind(b"\r\n") + 2] if b"\r\n" in block else block + b"\r\n"
    return block


def _headers_part(block: bytes) -> list[bytes]:
    """The text/rfc822-headers part; quoted-printable only when the headers are not 7-bit."""
    eight_bit = any(b > 127 or b == 0 for b in block)
    too_long = any(len(line) > 998 for line in block.split(b"\r\n"))
    part = [b"Content-Description: Undelivered Message Headers", b"Content-Type: text/rfc822-headers"]
    if not (eight_bit or too_long):
        return part + [b""] + block.split(b"\r\n")[:-1]
    part.append(b"Content-Transfer-Encoding: quoted-printable")
    part.append(b"")
    for line in block.split(b"\r\n")[:-1]:
        encoded = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        part.extend(encoded.split(b"\n"))
    return part


def _human_text(config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
                action: str, to_postmaster: bool, retry_until: float) -> list[str]:
    host = config.gateway.hostname
    lines = [f"This is the mail system at {host}.", ""]
    if to_postmaster:
        lines += ["A message with a null sender (a bounce or another automatic notice) could not be",
                  "delivered. Its sender cannot be told, so this report comes to the postmaster.", ""]
    if action == FAILED:
        lines += ["Your message could not be delivered to the recipients listed below. It has been",
                  "given up for them; the reason each one failed is shown beside it.", ""]
    else:
        lines += ["Your message has not yet been delivered to the recipients listed below. Delivery",
                  f"will be retried until {rfc5322_date(retry_until)}; there is no need to send it",
                  "again. You will hear from us again only if it finally fails.", ""]
    for state, reply in results:
        lines.append(ascii_text(f"<{ascii_address(state.address)}>: " + " ".join(reply.lines())))
    lines += ["", f"For help, please write to the postmaster <{ascii_address(config.gateway.postmaster)}>."]
    return lines


def build_dsn(config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
              action: str, original: bytes | None, to: str | None = None,
              now: float | None = None) -> bytes:
    """An RFC 3464 report on ``results`` (each recipient's state and the reply that decided it).

    ``action`` is ``failed`` or ``delayed``. The report goes to ``to``, by default the sender, or the
    postmaster when the sender is null (the report is then a postmaster copy of a double bounce).
    """
    if action not in (FAILED, DELAYED):
        raise ValueError(f"unsupported DSN action {action!r}")
    now = time.time() if now is None else now
    host = ascii_text(config.gateway.hostname, 255)
    to_postmaster = not entry.sender
    recipient = to if to is not None else (entry.sender or config.gateway.postmaster)
    retry_until = entry.received_at + config.gateway.queue.expire
    boundary = f"{uuid.uuid4().hex}/{host}"
    mail_params = entry.extra.get("mail_params") or {}
    rcpt_params = entry.extra.get("rcpt_params") or {}

    if action == FAILED:
        subject = "Undelivered Mail Returned to Sender"
        if to_postmaster:
            subject = "Postmaster Copy: Undelivered Mail"
    else:
        subject = "Delayed Mail (still being retried)"

    out: list[str | bytes] = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{ascii_address(recipient)}>",
        f"Subject: {subject}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{uuid.uuid4().hex}.{ascii_text(entry.id, 128)}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated delivery status notification (RFC 3464).",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *_human_text(config, entry, results, action, to_postmaster, retry_until),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
    ]
    envid = mail_params.get("ENVID")
    if envid:
        out.append(f"Original-Envelope-Id: {ascii_text(xtext_decode(envid), 100)}")
    if entry.sender:
        out.append(f"X-Original-Sender: rfc822; {ascii_address(entry.sender)}")
    out.append(f"Arrival-Date: {rfc5322_date(entry.received_at)}")
    for state, reply in results:
        out.append("")
        out.append(f"Final-Recipient: rfc822; {ascii_address(state.address)}")
        orcpt = (rcpt_params.get(state.address) or {}).get("ORCPT")
        if orcpt and ";" in orcpt:
            kind, _, value = orcpt.partition(";")
            out.append(f"Original-Recipient: {ascii_text(kind, 20)}; {ascii_address(xtext_decode(value))}")
        out.append(f"Action: {action}")
        out.append(f"Status: {status_of(reply, action)}")
        mta = remote_mta(state.last_hop)
        if mta:
            out.append(f"Remote-MTA: dns; {mta}")
        out.append(f"Diagnostic-Code: smtp; {ascii_text(' '.join(reply.lines()))}")
        out.append(f"Last-Attempt-Date: {rfc5322_date(now)}")
        if action == DELAYED:
            out.append(f"Will-Retry-Until: {rfc5322_date(retry_until)}")
    out.append("")
    block = header_block(original)
    if block:
        out.append(f"--{boundary}")
        out.extend(_headers_part(block))
        out.append("")
    out.append(f"--{boundary}--")
    return _join(out)


def _join(lines: Iterable[str | bytes]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else line.encode("ascii")) + b"\r\n" for line in lines)
