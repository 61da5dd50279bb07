"""The RFC5322.From domain of a message: whose keys sign it.

Asked for every message dkim_sign might sign. The general answer parses the whole header section
with the ``email`` package and the From field with ``email.utils.getaddresses``: a few hundred
Python calls a message, about as much as the rest of the hook besides the signature. Nearly every
message has a plain header section and one From field of the form ``addr``, ``<addr>`` or
``Name <addr>``; for those the domain is read off the field here, the same answer the parsers give
(tests/test_dkim_sign.py compares the two). Anything else goes to the parsers.
"""
from __future__ import annotations

import email.utils
import re

from mta.model.message import HEADER_LIMIT, MessageData
from mta.smtp.lines import crlf_clean

# A field's first line as the email package's parser takes it (name: printable ASCII but the colon).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDRESS = _ATOM + rb"(?:\." + _ATOM + rb")*@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?)"
_PHRASE = rb"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+|\"[^\"\\<>@,;:]*\")"
# addr, <addr>, Name <addr>, "Quoted Name" <addr>: white space around and between, no comments.
_SIMPLE_FROM = re.compile(rb"[ \t]*(?:" + _ADDRESS.replace(b"domain", b"bare") + rb"|(?:" + _PHRASE
                          + rb"(?:[ \t]+" + _PHRASE + rb")*[ \t]*)?<" + _ADDRESS + rb">)[ \t]*")
_UNKNOWN = object()


def _read_off(block: bytes) -> object:
    """The From domain read off a plain header section, None when it has no From field or more
    than one, ``_UNKNOWN`` when the section or the field is anything but plain."""
    if len(block) >= HEADER_LIMIT or not block.isascii() or not crlf_clean(block):
        return _UNKNOWN
    value: bytes | None = None
    count = 0
    lines = block.split(b"\r\n")
    if lines[-1] or lines[0][:1] in (b" ", b"\t"):
        return _UNKNOWN                 # not whole lines, or a continuation first
    in_from = False
    for line in lines[:-1]:
        if line[:1] in (b" ", b"\t"):
            if in_from:
                value += line
            continue
        if not _FIELD.match(line):
            return _UNKNOWN
        in_from = line[:5].lower() == b"from:"
        if in_from:
            count += 1
            value = line[5:]
    if count != 1:
        return None if count == 0 else _UNKNOWN
    match = _SIMPLE_FROM.fullmatch(value)
    if match is None:
        return _UNKNOWN
    domain = (match.group("bare") or match.group("domain")).decode("ascii")
    return domain.lower().rstrip(".") or None


def from_domain(message: MessageData) -> str | None:
    """The RFC5322.From domain when the message has exactly one author address, else None
    (no From, several From fields or addresses: nothing to align a signature with)."""
    quick = _read_off(message.header_block())
    if quick is not _UNKNOWN:
        return quick                    # type: ignore[return-value]
    values = message.headers.get_all("From") or []
    addresses = [a for _, a in email.utils.getaddresses([str(v) for v in values]) if a]
    if len(values) != 1 or len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].strip().lower().rstrip(".") or None
