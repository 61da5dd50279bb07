"""The message as received, handed to the ``smtpgw_data`` hook and then to the spool.

The body is kept as the list of chunks the server collected (CRLF line endings, dot-unstuffed), so
nothing is joined or copied on the hot path; headers are parsed only if somebody asks.
"""
from __future__ import annotations

import email.parser
import email.policy
from email.message import Message


class MessageData:
    def __init__(self, chunks: list[bytes], size: int | None = None) -> None:
        self._chunks = chunks
        self._prepended: list[bytes] = []
        self._size = size if size is not None else sum(len(c) for c in chunks)
        self._headers: Message | None = None

    @property
    def size(self) -> int:
        return self._size + sum(len(h) for h in self._prepended)

    def header_block(self) -> bytes:
        """The original header section (up to the first empty line), at most 256 KiB."""
        buf = bytearray()
        for chunk in self._chunks:
            buf += chunk
            if b"\r\n\r\n" in buf or len(buf) > 262144:
                break
        end = buf.find(b"\r\n\r\n")
        if buf.startswith(b"\r\n"):
            return b""
        return bytes(buf[: end + 2] if end >= 0 else buf)

    @property
    def headers(self) -> Message:
        """Parsed headers of the original message (read-only view; use prepend_header to add)."""
        if self._headers is None:
            self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
                self.header_block())
        return self._headers

    def header_count(self, name: str) -> int:
        """How many times header ``name`` occurs (case-insensitive), including prepended ones."""
        lname = name.lower().encode() + b":"
        n = sum(1 for h in self._prepended if h.lower().startswith(lname))
        for line in self.header_block().split(b"\r\n"):
            if line[:len(lname)].lower() == lname:
                n += 1
        return n

    def prepend_header(self, name: str, value: str) -> None:
        """Add a header on top (trace headers go first, RFC 5321 4.4)."""
        self._prepended.insert(0, f"{name}: {value}\r\n".encode("utf-8"))

    def chunks(self) -> list[bytes]:
        """The message to spool, prepended headers first."""
        return self._prepended + self._chunks

    def as_bytes(self) -> bytes:
        return b"".join(self.chunks())
