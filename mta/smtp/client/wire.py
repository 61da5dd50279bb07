"""Byte-level pieces of the outbound SMTP client: strict reply parsing and DATA encoding.

Both are kept free of I/O so the tricky parts -- where a reply ends, how a dot at a chunk boundary is
escaped -- are plain functions with plain tests.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from mta.smtp.lines import crlf_clean
from mta.smtp.reply import Reply

MAX_REPLY_LINE = 4096        # RFC 5321 4.5.3.1.5 says 512; be generous, but bounded
MAX_REPLY_LINES = 100
SEND_PIECE = 65536           # DATA is encoded and written in pieces of at most this many bytes

_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])?(.*)\Z", re.S)
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |\Z)")
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


class ProtocolError(Exception):
    """The server broke the protocol (a bad reply line, a reply nobody asked for...)."""


class ReplyParser:
    """Turns CRLF-terminated reply lines into :class:`Reply` values, one multi-line reply at a time."""

    def __init__(self) -> None:
        self._code: int | None = None
        self._texts: list[str] = []

    @property
    def partial(self) -> bool:
        """True while a multi-line reply has started but not ended."""
        return self._code is not None

    def take(self, buf: bytearray) -> Reply | None:
        """Consume complete lines from ``buf`` up to the end of the next reply and return it, or None
        when ``buf`` holds no complete reply yet (what is left stays in ``buf``). One reader for every
        client that talks SMTP to a server (delivery, ETRN), so none of them parses replies its own way."""
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > MAX_REPLY_LINE:
                    raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
                return None
            line = bytes(buf[:end])
            del buf[:end + 2]
            reply = self.feed(line)
            if reply is not None:
                return reply

    def feed(self, line: bytes) -> Reply | None:
        """Take one line (without CRLF); return the reply when this line ended one."""
        if len(line) > MAX_REPLY_LINE:
            raise ProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
        if b"\r" in line or b"\n" in line or b"\0" in line:
            raise ProtocolError("bare CR, LF or NUL in a reply line")
        m = _LINE.match(line)
        if m is None:
            raise ProtocolError(f"malformed reply line {line[:80]!r}")
        code = int(m.group(1))
        if m.group(2) is None and m.group(3):
            raise ProtocolError(f"malformed reply line {line[:80]!r}")
        if self._code is not None and code != self._code:
            raise ProtocolError(f"reply code changed within a multi-line reply ({self._code} -> {code})")
        self._code = code
        self._texts.append(m.group(3).decode("utf-8", "replace"))
        if len(self._texts) > MAX_REPLY_LINES:
            raise ProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
        if m.group(2) == b"-":
            return None
        texts, self._texts, self._code = self._texts, [], None
        return _make_reply(code, texts)


def _make_reply(code: int, texts: list[str]) -> Reply:
    """Split an RFC 3463 enhanced status off the lines when the first line carries one."""
    m = _STATUS.match(texts[0])
    status = ""
    if m and int(m.group(1)) == code // 100:
        status = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        prefix = status + " "
        texts = [t[len(prefix):] if t.startswith(prefix) else (t[len(status):] if t == status else t)
                 for t in texts]
    return Reply(code, status, "\n".join(texts))


def has_8bit(chunks: Iterable[bytes]) -> bool:
    return not all(c.isascii() for c in chunks)


class DotStuffer:
    """Encodes a message for DATA, one piece at a time, correct across any piece boundary.

    Every line ending becomes CRLF (a bare CR or LF is turned into CRLF: spooled mail is CRLF-clean,
    and nothing a lenient next hop could read as a line end may leave here unescaped), a line that
    starts with '.' gets a second '.', even when the previous piece ended the line; :meth:`finish`
    adds the missing CRLF and the terminating ``.``.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False          # the previous piece ended in CR: its LF may start this one

    def encode(self, piece: bytes) -> bytes:
        if not piece:
            return b""
        prefix = b""
        if self._held_cr:
            self._held_cr = False
            prefix = b"\r\n"
            if piece[:1] == b"\n":
                piece = piece[1:]
            self._line_start = True
        if piece.endswith(b"\r"):
            self._held_cr = True
            piece = piece[:-1]
        if not crlf_clean(piece):
            piece = _ANY_EOL.sub(b"\r\n", piece)
        if not piece:
            return prefix
        out = piece.replace(b"\r\n.", b"\r\n..") if b"." in piece else piece     # (memchr first)
        if self._line_start and out[:1] == b".":
            out = b"." + out
        self._line_start = out.endswith(b"\r\n")
        return prefix + out if prefix else out

    def finish(self) -> bytes:
        if self._held_cr:
            self._held_cr = False
            self._line_start = True
            return b"\r\n.\r\n"
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


def pieces(chunks: Iterable[bytes], size: int = SEND_PIECE) -> Iterator[bytes]:
    """The chunks cut into pieces of at most ``size`` bytes (big spooled chunks are not copied whole)."""
    for chunk in chunks:
        if len(chunk) <= size:
            yield chunk
            continue
        view = memoryview(chunk)
        for i in range(0, len(chunk), size):
            yield bytes(view[i:i + size])


def encode_all(chunks: Iterable[bytes]) -> list[bytes]:
    """The whole DATA payload, terminator included, as a list for ``writeSequence``."""
    stuffer = DotStuffer()
    out = [stuffer.encode(p) for p in pieces(chunks)]
    out.append(stuffer.finish())
    return out
