"""The message as received, handed to the ``smtpgw_data`` hook and then to the spool.

The body is kept as the list of chunks the server collected (CRLF line endings, dot-unstuffed), so
nothing is joined or copied on the hot path; headers are parsed only if somebody asks.
"""
from __future__ import annotations

import email.parser
import email.policy
from email.message import Message
from typing import Callable


HEADER_LIMIT = 262144         # the header section is looked for this far
_STEP = 8192                # octets of a chunk added to the search at a time


def _header_block(chunks: list[bytes]) -> bytes:
    """The header section of ``chunks`` (see ``MessageData.header_block``), a slice at a time."""
    buf = bytearray()
    for chunk in chunks:
        for offset in range(0, len(chunk), _STEP):
            start = max(len(buf) - 3, 0)
            buf += chunk[offset:offset + _STEP] if offset or len(chunk) > _STEP else chunk
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0 or len(buf) > HEADER_LIMIT:
                return b"" if buf.startswith(b"\r\n") else bytes(buf[:end + 2] if end >= 0 else buf)
    return b"" if buf.startswith(b"\r\n") else bytes(buf)


class MessageData:
    def __init__(self, chunks: list[bytes], size: int | None = None) -> None:
        self._chunks = chunks
        self._prepended: list[bytes] = []
        self._size = size if size is not None else sum(len(c) for c in chunks)
        self._headers: Message | None = None
        self._header_block: bytes | None = None

    @property
    def size(self) -> int:
        return self._size + sum(len(h) for h in self._prepended)

    def header_block(self) -> bytes:
        """The original header section (up to the first empty line), at most 256 KiB; found once.

        The chunks are taken a slice at a time: a big message's first chunk is most of the message,
        and copying it whole to find a header of a few hundred bytes was a measurable part of the
        cost of a 100 KB message."""
        if self._header_block is None:
            self._header_block = _header_block(self._chunks)
        return self._header_block

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

    def remove_headers(self, drop: Callable[[str, str], bool]) -> int:
        """Remove the original header fields for which ``drop(name, value)`` is true (``value``
        unfolded, as text); returns how many went. Used to take out what a sender may not say about
        itself, such as an Authentication-Results header naming this gateway (RFC 8601 5)."""
        block = self.header_block()
        block = block[: block.rfind(b"\r\n") + 2]       # whole lines only (a capped block may end mid-line)
        fields: list[bytes] = []
        for line in block.split(b"\r\n")[:-1]:
            if fields and line[:1] in (b" ", b"\t"):
                fields[-1] += line + b"\r\n"
            else:
                fields.append(line + b"\r\n")
        kept = []
        for field in fields:
            name, _, value = field.partition(b":")
            text = value.decode("utf-8", "replace").replace("\r\n", "").strip()
            if not drop(name.decode("utf-8", "replace").strip(), text):
                kept.append(field)
        removed = len(fields) - len(kept)
        if removed:
            self._replace_start(len(block), b"".join(kept))
        return removed

    def _replace_start(self, length: int, new: bytes) -> None:
        """Put ``new`` in place of the first ``length`` bytes of the original chunks."""
        rest, chunks, i = length, self._chunks, 0
        while i < len(chunks) and len(chunks[i]) <= rest:
            rest -= len(chunks[i])
            i += 1
        tail = [chunks[i][rest:]] if i < len(chunks) else []
        self._chunks = [new, *tail, *chunks[i + 1:]]
        self._size += len(new) - length
        self._headers = None
        self._header_block = None

    def original(self) -> list[bytes]:
        """The message as the client sent it, without the headers prepended here (what a sender's
        DKIM signature covers)."""
        return list(self._chunks)

    def chunks(self) -> list[bytes]:
        """The message to spool, prepended headers first."""
        return self._prepended + self._chunks

    def as_bytes(self) -> bytes:
        return b"".join(self.chunks())
