"""SMTPUTF8 (RFC 6531) on the way out: when a message must have it, and what happens without it.

The rule is Postfix's (``smtputf8_enable = yes``). A message received with the ``SMTPUTF8``
parameter keeps it towards a next hop that offers the extension. Towards a hop that does not, the
message goes without the parameter as long as nothing on the wire needs it -- envelope addresses
and header section all ASCII (a client that asks for SMTPUTF8 by habit); otherwise it cannot go
there at all (RFC 6531 3.4) and every recipient of the transaction fails with ``550 5.6.7``, so the
sender gets a DSN at once. Another MX of the same domain is not tried: the 5xx settles the
recipients, as in Postfix, because the hosts of one domain are nearly always configured alike.

Mail received without the parameter (nearly all of it) costs one dictionary lookup in
:func:`requested`; the message is scanned only for a hop that lacks SMTPUTF8 while the message asked
for it. A locally made message (a DSN) carries no parameters, but its envelope may be non-ASCII (a
report to a UTF-8 sender): the client treats a non-ASCII envelope as a request of its own
(:func:`envelope_is_ascii`), so such an address never goes out without SMTPUTF8 either.
"""
from __future__ import annotations

from typing import Iterable

from mta.model.queue_entry import QueueEntry
from mta.smtp import replies as R
from mta.smtp.reply import Reply

KEYWORD = "SMTPUTF8"


def requested(entry: QueueEntry) -> bool:
    """Whether the message came in with ``MAIL FROM:<..> SMTPUTF8`` (kept in ``mail_params``)."""
    params = entry.extra.get("mail_params")
    return bool(params) and KEYWORD in params


def envelope_is_ascii(sender: str, recipients: Iterable[str]) -> bool:
    return sender.isascii() and all(map(str.isascii, recipients))


def headers_are_ascii(chunks: Iterable[bytes]) -> bool:
    """Whether the header section (up to the first empty line) is 7-bit; reads no further than it.

    The message is CRLF-clean (the spool guarantees it); a blank line first means no headers.
    """
    carry = b"\r\n"                 # as if a line had just ended: an empty first line ends the section
    for chunk in chunks:
        window = carry + chunk
        end = window.find(b"\r\n\r\n")
        if end >= 0:
            return window[:end].isascii()
        if not chunk.isascii():
            return False
        carry = window[-3:]
    return True


def needs(sender: str, recipients: list[str], chunks: Iterable[bytes], asked: bool) -> bool:
    """Whether this transaction cannot be carried without SMTPUTF8: a non-ASCII envelope, or a
    message that asked for SMTPUTF8 and has non-ASCII headers. An 8-bit body alone is 8BITMIME's
    business, not this one's."""
    if not envelope_is_ascii(sender, recipients):
        return True
    return asked and not headers_are_ascii(chunks)


def not_offered(hop_label: str) -> Reply:
    """The permanent failure for a message that needs SMTPUTF8 at a hop that does not offer it."""
    return R.smtputf8_not_offered(hop_label)
