"""What the ``smtpgw`` commands print, made safe for a terminal.

Much of it comes from strangers: EHLO names, addresses, headers and error texts from other servers
(``smtpgw queue``), DNS names (``smtpgw dns-check``), an ISP's reply (``smtpgw etrn``). Printed raw,
an escape sequence in a HELO name could retitle the administrator's terminal, hide a line or fake one.
So ``main`` sends every command's text output through :class:`EscapingWriter`: control characters
(C0 but newline and tab, DEL, C1) and the Unicode bidirectional overrides come out as ``\\xNN`` or
``\\uNNNN``, as Python writes them in a string. JSON output is already escaped (``json.dumps``); raw
bytes (``smtpgw queue cat`` into a pipe) pass as they are.
"""
from __future__ import annotations

import re
from typing import Any, TextIO

UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
UNSAFE_BYTES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every character that could drive a terminal written out as an escape."""
    return UNSAFE.sub(_escaped, text)


def escape_bytes(data: bytes) -> bytes:
    """A message shown on a terminal: control bytes but LF and tab written out as ``\\xNN``."""
    return UNSAFE_BYTES.sub(lambda m: b"\\x%02x" % m.group()[0], data)


class EscapingWriter:
    """A text stream that escapes what is written to it (see the module's docstring)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(escape(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:        # flush, isatty, buffer, fileno, encoding...
        return getattr(self.stream, name)
