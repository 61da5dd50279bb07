"""Cutting the client's byte stream into command lines and message data, strictly.

Both readers work on ``(buffer, position)`` and return the new position, so the session keeps one
``bytes`` buffer and never copies what is still unread. They are strict where the smuggling attacks
live: only CRLF ends a line, only ``CRLF . CRLF`` ends a message, a bare CR or LF anywhere makes the
command or message refused (Postfix ``smtpd_forbid_bare_newline``), and no line is ever buffered past
its limit (RFC 5321 4.5.3.1.4 and 4.5.3.1.6).
"""
from __future__ import annotations

import enum

COMMAND_LIMIT = 512     # octets of a command line, CRLF included
TEXT_LIMIT = 1000       # octets of a DATA line, CRLF included


class Problem(enum.Enum):
    """Why a command line or a message cannot be taken."""

    TOO_LONG = "line too long"
    BARE_NEWLINE = "bare CR or LF"
    NUL = "NUL character"
    TOO_BIG = "message too big"


class CommandSplitter:
    """Command lines, one at a time; an over-long line is dropped up to its end, never stored."""

    __slots__ = ("_discarding",)

    def __init__(self) -> None:
        self._discarding = False

    def reset(self) -> None:
        self._discarding = False

    def next_line(self, buf: bytes, pos: int) -> tuple[bytes | Problem | None, int]:
        """``(line without CRLF, new pos)``, ``(Problem, new pos)``, or ``(None, pos)`` for "need more".

        A bare LF ends the line too -- so a command can never swallow the next one -- but the line is
        then refused as a whole.
        """
        lf = buf.find(b"\n", pos)
        if self._discarding:
            if lf < 0:
                return None, len(buf)
            self._discarding = False
            return Problem.TOO_LONG, lf + 1
        if lf < 0:
            if len(buf) - pos >= COMMAND_LIMIT:
                self._discarding = True
                return None, len(buf)
            return None, pos
        if lf + 1 - pos > COMMAND_LIMIT:
            return Problem.TOO_LONG, lf + 1
        cr = buf.find(b"\r", pos, lf)
        if cr != lf - 1:
            return Problem.BARE_NEWLINE, lf + 1
        line = buf[pos:cr]
        if b"\0" in line:
            return Problem.NUL, lf + 1
        return line, lf + 1


class DataReader:
    """One message body after DATA: dot-unstuffed chunks, counted, checked line by line.

    A problem never ends the message early: the reader stops storing and goes on to the real
    ``CRLF . CRLF``, so the rest of a refused body is never taken for commands. The position the
    session holds is always just after a real CRLF (or at the start of DATA), which is what makes a
    ``.`` at that position a real end.
    """

    __slots__ = ("max_size", "chunks", "size", "problem", "done", "_skipping")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.chunks: list[bytes] = []
        self.size = 0
        self.problem: Problem | None = None
        self.done = False
        self._skipping = False          # inside an over-long line: drop bytes up to its CRLF

    def feed(self, buf: bytes, pos: int) -> int:
        """Consume what can be consumed of ``buf[pos:]``; returns the new position.

        Unconsumed bytes are either a partial line (shorter than the limit) or input after the end.
        """
        n = len(buf)
        if self._skipping:
            crlf = buf.find(b"\r\n", pos)
            if crlf < 0:
                return n - 1 if buf.endswith(b"\r") and n > pos else n
            pos = crlf + 2
            self._skipping = False
        if buf.startswith(b".\r\n", pos):
            self.done = True
            return pos + 3
        end = buf.find(b"\r\n.\r\n", pos)
        if end >= 0:
            self._take(buf[pos:end + 2])
            self.done = True
            return end + 5
        last = buf.rfind(b"\r\n", pos)
        if last >= 0:
            self._take(buf[pos:last + 2])
            pos = last + 2
        if n - pos >= TEXT_LIMIT:
            tail = buf[pos:]
            self._fail(Problem.BARE_NEWLINE if b"\n" in tail or b"\r" in tail[:-1] else Problem.TOO_LONG)
            self._skipping = True
            return n - 1 if tail.endswith(b"\r") else n
        return pos

    def _take(self, region: bytes) -> None:
        """Store complete lines (``region`` starts at a line start and ends with CRLF)."""
        if self.problem is not None:
            return
        crlfs = region.count(b"\r\n")
        if region.count(b"\n") != crlfs or region.count(b"\r") != crlfs:
            return self._fail(Problem.BARE_NEWLINE)
        if b"\0" in region:
            return self._fail(Problem.NUL)
        if len(region) > TEXT_LIMIT and max(map(len, region.split(b"\r\n"))) > TEXT_LIMIT - 2:
            return self._fail(Problem.TOO_LONG)
        if b"\r\n." in region:
            region = b"\r\n".join(region.split(b"\r\n."))
        if region.startswith(b"."):
            region = region[1:]
        self.size += len(region)
        if self.size > self.max_size:
            return self._fail(Problem.TOO_BIG)
        self.chunks.append(region)

    def _fail(self, problem: Problem) -> None:
        if self.problem is None:
            self.problem = problem
            self.chunks = []
