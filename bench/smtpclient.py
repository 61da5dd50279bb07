"""A minimal asyncio SMTP client for the latency and connection tests (not a general client).

It speaks plain ESMTP without pipelining: one command, one reply. It exists so the bench can time
the interval the issue asks for (end of DATA -> 250) and hold thousands of idle sessions, neither of
which smtp-source can do.
"""
from __future__ import annotations

import asyncio
import time


class SMTPError(Exception):
    def __init__(self, stage: str, reply: bytes) -> None:
        super().__init__(f"{stage}: {reply[:120]!r}")
        self.stage, self.reply = stage, reply

    @property
    def code(self) -> str:
        return self.reply[:3].decode("ascii", "replace") or "EOF"


def make_message(size: int, sender: str, recipient: str, seq: int = 0) -> bytes:
    """Headers plus ``size`` bytes of body in 78-character lines, CRLF, no line starting with '.'."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench {seq}\r\n"
            f"Message-ID: <bench.{seq}.{time.time_ns()}@bench.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest > 2:
        body += b"y" * (rest - 2) + b"\r\n"
    return head + body


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, source: str | None = None, helo: str = "bench-client.test",
                   timeout: float = 60) -> "Session":
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local, limit=1 << 16), timeout)
        s = cls(reader, writer)
        try:
            await s.expect("banner", b"2", timeout)
            s.writer.write(f"EHLO {helo}\r\n".encode())
            await s.expect("EHLO", b"2", timeout)
        except BaseException:
            s.abort()
            raise
        return s

    async def reply(self, timeout: float) -> bytes:
        """One whole (possibly multi-line) reply."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                lines.append(b"")
                break
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        return b"".join(lines)

    async def expect(self, stage: str, first: bytes, timeout: float) -> bytes:
        r = await self.reply(timeout)
        if not r.startswith(first):
            raise SMTPError(stage, r)
        return r

    async def send_mail(self, sender: str, recipient: str, message: bytes, timeout: float = 120) -> float:
        """One transaction; returns seconds from writing the final '.' to reading the 250."""
        w = self.writer
        w.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await self.expect("MAIL", b"250", timeout)
        w.write(f"RCPT TO:<{recipient}>\r\n".encode())
        await self.expect("RCPT", b"250", timeout)
        w.write(b"DATA\r\n")
        await self.expect("DATA", b"354", timeout)
        w.write(message)
        await w.drain()
        t0 = time.perf_counter()
        w.write(b".\r\n")
        await self.expect("end of DATA", b"250", timeout)
        return time.perf_counter() - t0

    async def quit(self, timeout: float = 10) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await self.reply(timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        self.abort()

    def abort(self) -> None:
        try:
            self.writer.transport.abort()
        except Exception:
            pass
