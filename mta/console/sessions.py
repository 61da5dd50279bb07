"""Console sessions: who is logged in, behind an unguessable cookie, and the CSRF token of each form.

A session is created for the login form (so the form itself carries a token: no login CSRF) and
replaced by a new one when the password is right (no session fixation). The cookie is HttpOnly and
SameSite=Strict, and Secure when the console speaks TLS. Sessions live in the memory of the process
serving the console: a restart logs everyone out, which is what an administrator expects of a
daemon restart.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Callable

COOKIE = "smtpgw_console"
IDLE_TIMEOUT = 3600.0               # an hour without a request logs the user out
MAX_AGE = 12 * 3600.0               # and twelve hours after the login in any case
MAX_SESSIONS = 10000                # anonymous login forms beyond this push out the oldest


@dataclass
class Session:
    id: str
    csrf: str
    created: float
    seen: float
    user: str | None = None         # None until the password was right
    notices: list[str] = field(default_factory=list)     # shown once on the next page (action results)

    def token_ok(self, token: str | bytes | None) -> bool:
        """Whether a form's ``csrf`` field is this session's token (compared in constant time)."""
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        return isinstance(token, str) and bool(token) and hmac.compare_digest(token, self.csrf)


class Sessions:
    """The live sessions of one console; ``clock`` gives the time (the reactor's ``seconds``)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def _alive(self, s: Session, now: float) -> bool:
        return now - s.seen < IDLE_TIMEOUT and now - s.created < MAX_AGE

    def get(self, session_id: str | bytes | None) -> Session | None:
        """The live session with this cookie value, touched; None when unknown or expired."""
        if isinstance(session_id, bytes):
            session_id = session_id.decode("ascii", "replace")
        if not session_id:
            return None
        s = self._by_id.get(session_id)
        now = self.clock()
        if s is None:
            return None
        if not self._alive(s, now):
            del self._by_id[s.id]
            return None
        s.seen = now
        return s

    def new(self, user: str | None = None) -> Session:
        now = self.clock()
        if len(self._by_id) >= MAX_SESSIONS:
            self._prune(now)
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now, user)
        self._by_id[s.id] = s
        return s

    def login(self, old: Session | None, user: str) -> Session:
        """A fresh session for ``user`` in place of the anonymous one the login form used."""
        if old is not None:
            self._by_id.pop(old.id, None)
        return self.new(user)

    def end(self, s: Session) -> None:
        self._by_id.pop(s.id, None)

    def _prune(self, now: float) -> None:
        for s in [s for s in self._by_id.values() if not self._alive(s, now)]:
            del self._by_id[s.id]
        anonymous = sorted((s for s in self._by_id.values() if s.user is None), key=lambda s: s.seen)
        for s in anonymous[:max(0, len(self._by_id) - MAX_SESSIONS + 1)]:
            del self._by_id[s.id]


def cookie_header(session: Session | None, secure: bool) -> bytes:
    """The ``Set-Cookie`` value for ``session`` (None: clear the cookie)."""
    value, extra = (session.id, "") if session is not None else ("", "; Max-Age=0")
    flags = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    return f"{COOKIE}={value}{flags}{extra}".encode("ascii")
