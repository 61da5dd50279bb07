"""CHUNKING (RFC 3030): the ``BDAT <size> [LAST]`` command's argument, its replies, and its octets.

The session (mta/smtp/server/session.py ``smtp_BDAT``) decides whether a chunk is taken or refused; either way,
once the size argument is readable the announced octets are counted off the input before the reply
goes out, so a refused or oversized chunk is never read as commands (the BDAT form of the "over-long
line inside DATA" trap in docs/architecture.md). Counting needs no buffer of the announced size: the octets
are handed on (or dropped) as each TCP read brings them.
"""
from __future__ import annotations

from typing import Any

from mta.smtp.lines import ChunkedMessage
from mta.smtp.reply import Reply

MAX_SIZE_DIGITS = 20        # as for SIZE=: a longer number is not a size anybody can send



def parse_argument(argument: str) -> tuple[int | None, bool, bool]:
    """``(size, last, valid)``: ``size`` is None when no octet count can be read (nothing to skip);
    a readable size with a bad rest (``BDAT 10 LATER``) still names the octets that follow."""
    words = argument.split(" ")
    size_text = words[0]
    if not (size_text.isascii() and size_text.isdigit()) or len(size_text) > MAX_SIZE_DIGITS:
        return None, False, False
    size = int(size_text)
    rest = words[1:]
    if not rest:
        return size, False, True
    if len(rest) == 1 and rest[0].upper() == "LAST":
        return size, True, True
    return size, False, False


class Chunk:
    """One BDAT command's octets, counted off the input into ``message`` (or dropped when None).

    ``refusal`` is the reply owed once the octets are in, when the chunk was refused up front, and
    ``resume`` the session state to go back to then.
    """

    __slots__ = ("size", "remaining", "last", "message", "refusal", "resume")

    def __init__(self, size: int, last: bool, message: ChunkedMessage | None,
                 refusal: Reply | None = None, resume: Any = None) -> None:
        self.size = size
        self.remaining = size
        self.last = last
        self.message = message
        self.refusal = refusal
        self.resume = resume

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, buf: bytes, pos: int) -> int:
        """Take what ``buf[pos:]`` holds of this chunk; returns the new position."""
        end = min(len(buf), pos + self.remaining)
        if end > pos:
            self.remaining -= end - pos
            if self.message is not None:
                self.message.take(buf[pos:end])     # the whole read is no copy: bytes[0:len] is itself
        return end
