"""SMTP replies as values.

Every answer the gateway gives -- from its own state machine or from a plugin's verdict -- is a
``Reply``, so one place formats it onto the wire and hooks never write to a transport.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """A reply: basic code, enhanced status (RFC 3463) and text.

    ``disconnect`` asks the session to close after sending it (a 421 always does).
    """

    code: int
    status: str = ""
    text: str = ""
    disconnect: bool = False

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply's lines as text, multi-line replies joined with ``-`` (RFC 5321 4.2.1)."""
        texts = self.text.split("\n") if self.text else [""]
        out = []
        for i, t in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            prefix = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{sep}{prefix}{t}".rstrip())
        return out

    def to_bytes(self) -> bytes:
        return ("\r\n".join(self.lines()) + "\r\n").encode("utf-8", "replace")

    def __str__(self) -> str:
        return " / ".join(self.lines())


def accept(text: str = "OK", status: str = "2.0.0") -> Reply:
    return Reply(250, status, text)


def reject(text: str, status: str = "5.7.1", code: int = 550) -> Reply:
    return Reply(code, status, text)


def tempfail(text: str, status: str = "4.3.0", code: int = 451) -> Reply:
    return Reply(code, status, text)


def disconnect(text: str, status: str = "4.3.0") -> Reply:
    return Reply(421, status, text, disconnect=True)
