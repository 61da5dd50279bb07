"""Delivery status notifications (RFC 3464): what the sender gets back when mail fails or lingers.

The report is a ``multipart/report; report-type=delivery-status`` with three parts: a note for the
person, the machine-readable ``message/delivery-status``, and what is returned of the original.
That third part follows the sender's RFC 3461 ``RET`` (kept in ``entry.extra["mail_params"]``):

* ``RET=FULL`` -- the whole message, ``message/rfc822``;
* ``RET=HDRS`` -- its headers only, ``text/rfc822-headers``;
* no ``RET`` -- as Postfix does by default: the whole message in a failure report, headers only in
  a delay notice (RFC 3461 lets a delay notice return headers whatever ``RET`` asked), headers only
  in a success report (``delivered``/``relayed``, sent only on ``NOTIFY=SUCCESS``).

A message received with ``REQUIRETLS`` (RFC 8689 5) gets its headers back, never its body: the
report is ordinary mail and may travel without the validated TLS the sender asked for.

The whole message is returned only up to :data:`RETURN_LIMIT` bytes (Postfix's ``bounce_size_limit``)
and only if the report then stays within every virtual server's and connector's message size limit
(a report that no connector may carry would only come back as a double bounce); beyond that the
headers are returned and the note says why. A message that cannot travel as a ``message/rfc822``
part over 8BITMIME (a NUL, or a line over 998 bytes) is returned as headers too.

A report on UTF-8 mail -- received with ``SMTPUTF8``, or with a non-ASCII sender or recipient -- is
RFC 6533's: the status part is ``message/global-delivery-status`` (8bit, a non-ASCII address written
as ``utf-8; <address>``), the returned message ``message/global`` and returned headers
``message/global-headers``, so nothing of the original is mangled to fit 7 bits; the note is
``charset=utf-8``. Any other report stays 7-bit (a non-ASCII address then in the ``\\x{HEX}`` form).

It is built by hand rather than with ``email.message`` so that the bytes are exactly what we spool:
CRLF line endings, no line over 998 characters, and 7-bit unless it returns an 8-bit message (then
the part and the report say ``Content-Transfer-Encoding: 8bit``, as RFC 2046 5.2.1 and RFC 6152 ask).
"""
from __future__ import annotations

import binascii
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable

from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply

FAILED, DELAYED = "failed", "delayed"
DELIVERED, RELAYED = "delivered", "relayed"      # success reports, only on NOTIFY=SUCCESS (RFC 3461)
SUCCESS_ACTIONS = (DELIVERED, RELAYED)
LOCAL_HOP = "maildir"            # the hop mta.delivery.attempt names for a Maildir delivery: no Remote-MTA
MAX_FIELD = 900
MAX_HEADERS = 256 * 1024
RETURN_LIMIT = 50_000            # bytes of original returned whole at most (Postfix bounce_size_limit)
FULL, HEADERS = "full", "headers"
# entry.extra: the client was neither relay-allowed nor authenticated (virtual_servers[].dsn.untrusted:
# headers), so success and delay notices return the headers whatever RET asked (mta.dsn.params)
NOTICES_HEADERS_ONLY = "dsn.notices_headers_only"
_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_UNICODE_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
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


def unitext_address(address: str) -> str:
    """An address as RFC 6533's ``utf-8-addr-unitext``: UTF-8 kept, only controls, space, ``\\``,
    ``+`` and ``=`` written ``\\x{HEX}``."""
    out = []
    for c in address:
        if c <= " " or c in "\\+=\x7f" or "\x80" <= c <= "\x9f":
            out.append(f"\\x{{{ord(c):X}}}")
        else:
            out.append(c)
    return "".join(out)[:MAX_FIELD]


def _unescaped(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    return chr(code) if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else m.group(0)


def is_global(entry: QueueEntry, addresses: Iterable[str]) -> bool:
    """Whether a report on ``entry`` is RFC 6533's: the message came with SMTPUTF8, or its sender or
    one of ``addresses`` (the recipients reported on, the report's own recipient) is non-ASCII."""
    if "SMTPUTF8" in (entry.extra.get("mail_params") or {}):
        return True
    return not (entry.sender.isascii() and all(a.isascii() for a in addresses))


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
    if action in SUCCESS_ACTIONS:
        return status if status.startswith("2.") else "2.0.0"
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


def header_block(original: bytes | None, limit: int = MAX_HEADERS) -> bytes:
    """The original header section (at most ``limit`` bytes, whole lines), CRLF-terminated; empty
    when there is none."""
    if not original:
        return b""
    head = original[:limit]
    if head.startswith(b"\r\n"):
        return b""
    end = head.find(b"\r\n\r\n")
    block = head[: end + 2] if end >= 0 else head
    if not block.endswith(b"\r\n"):
        block = block[: block.rfind(b"\r\n") + 2] if b"\r\n" in block else block + b"\r\n"
    return block


REQUIRETLS = "REQUIRETLS"          # RFC 8689's MAIL parameter, kept in mail_params


def requested_return(entry: QueueEntry, action: str) -> str:
    """What the report should return: ``full`` or ``headers`` (RFC 3461 RET, else Postfix's default;
    a success report returns the whole message only when RET=FULL asked for it, and never for a
    message marked :data:`NOTICES_HEADERS_ONLY`)."""
    if action == DELAYED:
        return HEADERS
    ret = str((entry.extra.get("mail_params") or {}).get("RET") or "").strip().upper()
    if action in SUCCESS_ACTIONS:
        return FULL if ret == "FULL" and not entry.extra.get(NOTICES_HEADERS_ONLY) else HEADERS
    return HEADERS if ret == "HDRS" else FULL


def size_cap(config: Any) -> int | None:
    """The smallest message size any virtual server or connector of ``config`` takes (None: no limit)."""
    limits = [vs.limits.max_message_size for vs in getattr(config, "virtual_servers", ())]
    limits += [c.content_restrictions.max_message_size for c in getattr(config, "connectors", ())
               if c.content_restrictions.max_message_size]
    return min(limits) if limits else None


def whole_returnable(original: bytes) -> bool:
    """Whether ``original`` can be a ``message/rfc822`` part as it is: 7bit or 8bit, never binary
    (no NUL, no bare CR or LF, no line over 998 bytes; RFC 2045 2.7-2.8, RFC 2046 5.2.1)."""
    if b"\0" in original:
        return False
    lines = original.split(b"\r\n")
    return all(len(line) <= 998 and b"\r" not in line and b"\n" not in line for line in lines)


def _full_part(original: bytes, utf8: bool = False) -> tuple[list[bytes], bool]:
    """The message/rfc822 (RFC 6533: message/global) part and whether it is 8-bit."""
    eight_bit = not original.isascii()
    kind = b"message/global" if utf8 else b"message/rfc822"
    part = [b"Content-Description: Undelivered Message", b"Content-Type: " + kind]
    if eight_bit:
        part.append(b"Content-Transfer-Encoding: 8bit")
    body = original if original.endswith(b"\r\n") else original + b"\r\n"
    return part + [b""] + body.split(b"\r\n")[:-1], eight_bit


def _headers_part(block: bytes, utf8: bool = False) -> tuple[list[bytes], bool]:
    """The text/rfc822-headers part (RFC 6533: message/global-headers, 8bit as they are) and whether
    it is 8-bit; quoted-printable only when the headers cannot go as they are."""
    eight_bit = any(b > 127 or b == 0 for b in block)
    too_long = any(len(line) > 998 for line in block.split(b"\r\n"))
    kind = b"message/global-headers" if utf8 else b"text/rfc822-headers"
    part = [b"Content-Description: Undelivered Message Headers", b"Content-Type: " + kind]
    if utf8 and eight_bit and not too_long and b"\0" not in block:
        return part + [b"Content-Transfer-Encoding: 8bit", b""] + block.split(b"\r\n")[:-1], True
    if not (eight_bit or too_long):
        return part + [b""] + block.split(b"\r\n")[:-1], False
    part.append(b"Content-Transfer-Encoding: quoted-printable")
    part.append(b"")
    for line in block.split(b"\r\n")[:-1]:
        encoded = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        part.extend(encoded.split(b"\n"))
    return part, False


def _returned_note(returned: str | None, why: str | None) -> list[str]:
    """The sentence telling the person what of their message comes back, and why not all of it."""
    if returned == FULL:
        return ["The message is returned below in full.", ""]
    if returned is None:
        return []
    if why:
        return ["Only the headers of the message are returned below, because", f"{why}.", ""]
    return ["The headers of the message are returned below.", ""]


def _human_text(config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
                action: str, to_postmaster: bool, retry_until: float,
                returned: str | None = None, why: str | None = None, utf8: bool = False) -> list[str]:
    host = config.gateway.hostname
    lines = [f"This is the mail system at {host}.", ""]
    if to_postmaster:
        lines += ["A message with a null sender (a bounce or another automatic notice) could not be",
                  "delivered. Its sender cannot be told, so this report comes to the postmaster.", ""]
    if action == FAILED:
        lines += ["Your message could not be delivered to the recipients listed below. It has been",
                  "given up for them; the reason each one failed is shown beside it.", ""]
    elif action == DELIVERED:
        lines += ["Your message was delivered to the mailboxes of the recipients listed below.",
                  "You asked to be told of successful delivery; there is nothing more to do.", ""]
    elif action == RELAYED:
        lines += ["Your message was handed on for the recipients listed below to a mail server that",
                  "does not send delivery notifications. You asked to be told of successful delivery,",
                  "but this is the last report on them you can expect: later failures may go unreported.", ""]
    else:
        lines += ["Your message has not yet been delivered to the recipients listed below. Delivery",
                  f"will be retried until {rfc5322_date(retry_until)}; there is no need to send it",
                  "again. You will hear from us again only if it finally fails.", ""]
    for state, reply in results:
        address = unitext_address(state.address) if utf8 else ascii_address(state.address)
        line = f"<{address}>: " + ascii_text(" ".join(reply.lines()))
        lines.append(line.encode("utf-8")[:MAX_FIELD].decode("utf-8", "ignore"))
    lines.append("")
    lines += _returned_note(returned, why)
    lines += [f"For help, please write to the postmaster <{ascii_address(config.gateway.postmaster)}>."]
    return lines


def build_dsn(config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
              action: str, original: bytes | None, to: str | None = None,
              now: float | None = None, return_limit: int = RETURN_LIMIT) -> bytes:
    """An RFC 3464 report on ``results`` (each recipient's state and the reply that decided it).

    ``action`` is ``failed`` or ``delayed``. The report goes to ``to``, by default the sender, or the
    postmaster when the sender is null (the report is then a postmaster copy of a double bounce).
    ``original`` is the whole spooled message (or None when it could not be read); what of it is
    returned follows :func:`requested_return`, :data:`RETURN_LIMIT` and :func:`size_cap`.
    """
    if action not in (FAILED, DELAYED):
        raise ValueError(f"unsupported DSN action {action!r}")
    return _build(config, entry, results, action, original, to, now, return_limit)


def build_success_dsn(config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
                      action: str, original: bytes | None, to: str | None = None,
                      now: float | None = None, return_limit: int = RETURN_LIMIT) -> bytes:
    """A success report (``delivered`` or ``relayed``, RFC 3464 2.3.3) for recipients that asked
    NOTIFY=SUCCESS; it returns the headers, or the whole message if RET=FULL was given."""
    if action not in SUCCESS_ACTIONS:
        raise ValueError(f"unsupported success DSN action {action!r}")
    return _build(config, entry, results, action, original, to, now, return_limit)


def _build(config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]], action: str,
           original: bytes | None, to: str | None, now: float | None, return_limit: int) -> bytes:
    report = _Report(config, entry, results, action, to, time.time() if now is None else now)
    if not original:
        return report.assemble(None, None, [], False)
    cap = size_cap(config)
    wanted = requested_return(entry, action)
    why = None
    if wanted == FULL and REQUIRETLS in (entry.extra.get("mail_params") or {}):
        # RFC 8689 5: the body the sender asked to travel only over validated TLS is not sent back in
        # a report that may not (the report itself is ordinary mail)
        wanted, why = HEADERS, "the message was sent with REQUIRETLS and this report may travel without validated TLS"
    if wanted == FULL:
        limit = return_limit if cap is None else min(return_limit, cap)
        if len(original) > limit:
            why = f"the message is larger than the {limit} bytes returned in full"
        elif not whole_returnable(original):
            why = "the message holds NUL bytes, bare CR or LF, or lines over 998 bytes"
        else:
            part, eight_bit = _full_part(original, report.utf8)
            data = report.assemble(FULL, None, part, eight_bit)
            if cap is None or len(data) <= cap:
                return data
            why = f"the whole message would make this report larger than {cap} bytes"
    block_limit = MAX_HEADERS
    while block_limit >= 1024:
        block = header_block(original, block_limit)
        part, eight_bit = _headers_part(block, report.utf8) if block else ([], False)
        data = report.assemble(HEADERS if block else None, why, part, eight_bit)
        if cap is None or len(data) <= cap or not block:
            return data
        block_limit //= 2
    return report.assemble(None, None, [], False)


class _Report:
    """The fixed parts of one report; :meth:`assemble` adds what is returned of the original."""

    def __init__(self, config: Any, entry: QueueEntry, results: list[tuple[RecipientState, Reply]],
                 action: str, to: str | None, now: float) -> None:
        self.config, self.entry, self.results, self.action = config, entry, results, action
        self.host = ascii_text(config.gateway.hostname, 255)
        self.to_postmaster = not entry.sender
        self.recipient = to if to is not None else (entry.sender or config.gateway.postmaster)
        self.retry_until = entry.received_at + config.gateway.queue.expire
        self.now = now
        self.boundary = f"{uuid.uuid4().hex}/{self.host}"
        self.message_id = f"<{uuid.uuid4().hex}.{ascii_text(entry.id, 128)}@{self.host}>"
        self.utf8 = is_global(entry, [self.recipient, *(state.address for state, _ in results)])
        self.status = self._status_part()

    def _subject(self) -> str:
        if self.action in SUCCESS_ACTIONS:
            return "Successful Mail Delivery Report"
        if self.action == DELAYED:
            return "Delayed Mail (still being retried)"
        if self.to_postmaster:
            return "Postmaster Copy: Undelivered Mail"
        return "Undelivered Mail Returned to Sender"

    def _status_part(self) -> list[str]:
        """The message/delivery-status part (RFC 3464 2.2, 2.3)."""
        entry, action, now = self.entry, self.action, self.now
        mail_params = entry.extra.get("mail_params") or {}
        rcpt_params = entry.extra.get("rcpt_params") or {}
        kind = "message/global-delivery-status" if self.utf8 else "message/delivery-status"
        out = ["Content-Description: Delivery report", f"Content-Type: {kind}"]
        if self.utf8:
            out.append("Content-Transfer-Encoding: 8bit")
        out += ["", f"Reporting-MTA: dns; {self.host}"]
        envid = mail_params.get("ENVID")
        if envid:
            out.append(f"Original-Envelope-Id: {ascii_text(xtext_decode(envid), 100)}")
        if entry.sender:
            out.append(f"X-Original-Sender: {self._address_field(entry.sender)}")
        out.append(f"Arrival-Date: {rfc5322_date(entry.received_at)}")
        for state, reply in self.results:
            out.append("")
            out.append(f"Final-Recipient: {self._address_field(state.address)}")
            orcpt = (rcpt_params.get(state.address) or {}).get("ORCPT")
            if orcpt and ";" in orcpt:
                kind, _, value = orcpt.partition(";")
                value, utf8_type = xtext_decode(value), kind.strip().lower() == "utf-8"
                if utf8_type:           # RFC 6533 utf-8-addr-xtext: non-ASCII as \x{HEX}
                    value = _UNICODE_ESCAPE.sub(_unescaped, value)
                if self.utf8 and (utf8_type or not value.isascii()):
                    out.append(f"Original-Recipient: utf-8; {unitext_address(value)}")
                else:
                    out.append(f"Original-Recipient: {ascii_text(kind, 20)}; {ascii_address(value)}")
            out.append(f"Action: {action}")
            out.append(f"Status: {status_of(reply, action)}")
            mta = remote_mta(state.last_hop) if state.last_hop != LOCAL_HOP else None
            if mta:
                out.append(f"Remote-MTA: dns; {mta}")
            out.append(f"Diagnostic-Code: smtp; {ascii_text(' '.join(reply.lines()))}")
            out.append(f"Last-Attempt-Date: {rfc5322_date(now)}")
            if action == DELAYED:
                out.append(f"Will-Retry-Until: {rfc5322_date(self.retry_until)}")
        return out

    def _address_field(self, address: str) -> str:
        """``rfc822; ADDR``, or RFC 6533's ``utf-8; ADDR`` for a non-ASCII address in a global report."""
        if self.utf8 and not address.isascii():
            return f"utf-8; {unitext_address(address)}"
        return f"rfc822; {ascii_address(address)}"

    def assemble(self, returned: str | None, why: str | None, part: list[bytes], eight_bit: bool) -> bytes:
        """The report with ``part`` (already formatted lines) as its third part, if any."""
        boundary = self.boundary
        out: list[str | bytes] = [
            f"From: Mail Delivery System <MAILER-DAEMON@{self.host}>",
            f"To: <{unitext_address(self.recipient) if self.utf8 else ascii_address(self.recipient)}>",
            f"Subject: {self._subject()}",
            f"Date: {rfc5322_date(self.now)}",
            f"Message-ID: {self.message_id}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;",
            f'\tboundary="{boundary}"',
            f"Content-Transfer-Encoding: {'8bit' if eight_bit or self.utf8 else '7bit'}",
            "",
            "This is a MIME-encapsulated delivery status notification (RFC 3464).",
            "",
            f"--{boundary}",
            "Content-Description: Notification",
            f"Content-Type: text/plain; charset={'utf-8' if self.utf8 else 'us-ascii'}",
            "",
            *_human_text(self.config, self.entry, self.results, self.action, self.to_postmaster,
                         self.retry_until, returned, why, self.utf8),
            "",
            f"--{boundary}",
            *self.status,
            "",
        ]
        if part and self.action in SUCCESS_ACTIONS:     # the part names what it holds, not a failure
            part = [part[0].replace(b"Undelivered ", b"Delivered "), *part[1:]]
        if part:
            out.append(f"--{boundary}")
            out.extend(part)
            out.append("")
        out.append(f"--{boundary}--")
        return _join(out)


def _join(lines: Iterable[str | bytes]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\r\n" for line in lines)
