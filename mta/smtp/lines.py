"""Cutting the client's byte stream into command lines and message data, strictly.

Both readers work on ``(buffer, position)`` and return the new position, so the session keeps one
``bytes`` buffer and never copies what is still unread. They are strict where the smuggling attacks
live: only CRLF ends a line, only ``CRLF . CRLF`` ends a message, a bare CR or LF anywhere makes the
command or message refused (Postfix ``smtpd_forbid_bare_newline``), and no line is ever buffered past
its limit (RFC 5321 4.5.3.1.4 and 4.5.3.1.6).
"""
from __future__ import annotations

import enum

COMMAND_LIMIT = 2048    # octets of a command line, CRLF included: RFC 5321's 512, which extensions
                        # may raise (RFC 3461: +100 on MAIL, +500 on RCPT), as Postfix's line_length_limit
TEXT_LIMIT = 1000       # octets of a DATA line, CRLF included


class Problem(enum.Enum):
    """Why a command line or a message cannot be taken."""

    TOO_LONG = "line too long"
    BARE_NEWLINE = "bare CR or LF"
    NUL = "NUL character"
    TOO_BIG = "message too big"
    NO_MEMORY = "insufficient system storage"      # the gateway's message memory is full (mta/smtp/server/message_memory.py)


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
        if cr != lf - 1 or cr < 0:      # (cr < 0: an LF at the buffer's start, where lf - 1 is -1 too)
            return Problem.BARE_NEWLINE, lf + 1
        line = buf[pos:cr]
        if b"\0" in line:
            return Problem.NUL, lf + 1
        return line, lf + 1


_ALL_BUT_CR_LF = bytes(b for b in range(256) if b not in (10, 13))


def crlf_clean(data: bytes) -> bool:
    """Whether every CR and LF in ``data`` is part of a CRLF. In two passes instead of counting CR,
    LF and CRLF in three: every CRLF holds one CR and one LF, so the CRs and LFs together (what
    ``translate`` keeps when it drops everything else) are exactly twice the CRLFs only when none is
    bare."""
    return len(data.translate(None, _ALL_BUT_CR_LF)) == 2 * data.count(b"\r\n")


def has_long_line(region: bytes, pos: int = 0, end: int | None = None) -> bool:
    """Whether a line of ``region[pos:end]`` (whole CRLF lines, no bare CR or LF) is longer than
    ``TEXT_LIMIT`` octets with its CRLF. Without cutting the region into lines: each step asks
    ``rfind`` (memrchr) for the last LF within ``TEXT_LIMIT`` octets of a line's start; none means
    that line is too long, and otherwise every line up to that LF is short enough, so a step moves
    almost ``TEXT_LIMIT`` octets on (about 100 steps for 100 KB instead of one object per line)."""
    end = len(region) if end is None else end
    while end - pos > TEXT_LIMIT:
        lf = region.rfind(b"\n", pos, pos + TEXT_LIMIT)
        if lf < 0:
            return True
        pos = lf + 1
    return False


class _StoredMessage:
    """What DATA and BDAT share: the chunks kept so far, their size, and the first problem, after
    which nothing more is kept (the rest of the message is only counted off)."""

    __slots__ = ("max_size", "chunks", "size", "problem")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.chunks: list[bytes] = []
        self.size = 0
        self.problem: Problem | None = None

    def refuse(self, problem: Problem) -> None:
        """Drop what is stored and keep only counting (the session's memory budget ran out)."""
        self._fail(problem)

    def _fail(self, problem: Problem) -> None:
        if self.problem is None:
            self.problem = problem
            self.chunks = []


class DataReader(_StoredMessage):
    """One message body after DATA: dot-unstuffed chunks, counted, checked line by line.

    A problem never ends the message early: the reader stops storing and goes on to the real
    ``CRLF . CRLF``, so the rest of a refused body is never taken for commands. The position the
    session holds is always just after a real CRLF (or at the start of DATA), which is what makes a
    ``.`` at that position a real end.
    """

    __slots__ = ("done", "_skipping")

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
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
        # One search finds both the end and whether any line starts with a dot: the first CRLF "."
        # is the end when CRLF follows; otherwise it is a stuffed line, and the end is looked for after it.
        dot = buf.find(b"\r\n.", pos)
        if dot >= 0 and buf.startswith(b"\r\n", dot + 3):
            end, dots = dot, False
        else:
            end, dots = (buf.find(b"\r\n.\r\n", dot + 1) if dot >= 0 else -1), dot >= 0
        if end >= 0:
            self._take(buf[pos:end + 2], dots)
            self.done = True
            return end + 5
        last = buf.rfind(b"\r\n", pos)
        if last >= 0:
            self._take(buf[pos:last + 2], dots)
            pos = last + 2
        if n - pos >= TEXT_LIMIT:
            tail = buf[pos:]
            self._fail(Problem.BARE_NEWLINE if b"\n" in tail or b"\r" in tail[:-1] else Problem.TOO_LONG)
            self._skipping = True
            return n - 1 if tail.endswith(b"\r") else n
        return pos

    def _take(self, region: bytes, dots: bool = True) -> None:
        """Store complete lines (``region`` starts at a line start and ends with CRLF); ``dots``:
        a line after the first may start with a dot (False when ``feed`` knows none does)."""
        if self.problem is not None:
            return
        if not crlf_clean(region):
            return self._fail(Problem.BARE_NEWLINE)
        if b"\0" in region:
            return self._fail(Problem.NUL)
        if len(region) > TEXT_LIMIT and has_long_line(region):
            return self._fail(Problem.TOO_LONG)
        if dots and b"\r\n." in region:
            region = b"\r\n".join(region.split(b"\r\n."))
        if region.startswith(b"."):
            region = region[1:]
        self.size += len(region)
        if self.size > self.max_size:
            return self._fail(Problem.TOO_BIG)
        self.chunks.append(region)



class ChunkedMessage(_StoredMessage):
    """The message of a BDAT transaction (RFC 3030), chunk by chunk, stored as DATA would store it.

    BDAT frames the message by octet count, so nothing in the content can end it early and there is no
    dot-stuffing to undo. But the rest of the pipeline (the ``smtpgw_data`` hook, the spool, the
    outbound client's dot-stuffing) expects CRLF lines, and a bare LF that we relayed would be the
    next hop's smuggling problem. So, as Postfix does for BDAT, a bare LF is *normalised* to CRLF (a
    UNIX client's ``\\n`` message is stored as the CRLF message it means), and the same checks as
    DATA apply to the result: a bare CR (one not followed by LF, also across chunk ends) is refused,
    as are NUL and lines over 998 octets; a message that does not end with CRLF gets one at the end
    (DATA's final CRLF belongs to the message). The message stored for a given text is therefore
    byte for byte the one DATA stores. BINARYMIME is not offered, so binary content is never taken.

    Chunks arrive in arbitrary pieces: ``take`` keeps a trailing CR back until it knows what follows,
    and counts the length of the unfinished line across pieces. Nothing past ``max_size`` is kept:
    the first problem drops what was stored and the rest is only counted off.
    """

    __slots__ = ("_cr", "_line")

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._cr = False            # a CR ended the last piece: held back until we see what follows
        self._line = 0              # octets of the unfinished line so far (CRLF excluded)

    def take(self, data: bytes) -> None:
        """Add a piece of chunk content (any split, any length)."""
        if self.problem is not None or not data:
            return
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
            if not data:
                return
        crlfs = data.count(b"\r\n")
        if data.count(b"\r") != crlfs:
            return self._fail(Problem.BARE_NEWLINE)
        if data.count(b"\n") != crlfs:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if b"\0" in data:
            return self._fail(Problem.NUL)
        longest = TEXT_LIMIT - 2
        first = data.find(b"\r\n")
        if first < 0:
            self._line += len(data)
        else:
            last = data.rfind(b"\r\n")
            if self._line + first > longest or (
                    last - first - 2 > longest and has_long_line(data, first + 2, last + 2)):
                return self._fail(Problem.TOO_LONG)
            self._line = len(data) - last - 2
        if self._line > longest:
            return self._fail(Problem.TOO_LONG)
        self.size += len(data)
        if self.size > self.max_size:
            return self._fail(Problem.TOO_BIG)
        self.chunks.append(data)

    def finish(self) -> None:
        """The LAST chunk is in: a CR still held back is bare; an unfinished last line gets its CRLF."""
        if self.problem is not None:
            return
        if self._cr:
            return self._fail(Problem.BARE_NEWLINE)
        if self.size and not self.chunks[-1].endswith(b"\r\n"):
            self.size += 2
            if self.size > self.max_size:
                return self._fail(Problem.TOO_BIG)
            self.chunks.append(b"\r\n")

