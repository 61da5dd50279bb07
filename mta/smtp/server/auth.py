"""SMTP AUTH on the server side (RFC 4954): the PLAIN (RFC 4616) and LOGIN SASL exchanges.

One :class:`ServerAuth` per virtual server with ``auth.users`` set. It is offered on a TLS session only,
or, when ``auth.allow_plaintext`` is true, also in clear text to clients on loopback (for testing and
for local submission programs). Credentials go through twisted.cred (a :class:`~twisted.cred.portal.Portal`
over :class:`mta.smtp.server.users.UsersFileChecker`, whose slow hash check runs in a thread); then the
``smtpgw_auth`` hook may still refuse. Failures are answered ``535 5.7.8`` and counted per connection;
the ``auth.max_failures``-th failure is followed by ``421 4.7.0`` and the connection is closed. They are
also counted per client address across connections (``auth.max_failures_per_client``,
mta/smtp/server/client_limits.py): past that, AUTH answers ``454 4.7.0`` to the address until its
window ends, so reconnecting does not buy more guesses.

While an exchange waits for the client's next line, the session hands that line here
(``protocol.sasl_continuation``) instead of reading it as a command, and never logs it.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from mta import maillog
from mta.smtp.server import mail_lines
from mta.smtp.server.users import UsersFileChecker, UsersFileError, thread_runner
from mta.config import VirtualServer
from mta.smtp.lines import Problem
from mta.smtp import replies as R
from mta.smtp.reply import Reply

log = Logger(namespace="smtpgw.auth")

MECHANISMS = ("PLAIN", "LOGIN")



@dataclass(frozen=True)
class Challenge(Reply):
    """``334 <base64>``: the space is mandatory even when the challenge is empty (RFC 4954 4)."""

    code: int = 334

    def lines(self) -> list[str]:
        return [f"334 {self.text}"]

    def to_bytes(self) -> bytes:
        return f"334 {self.text}\r\n".encode("ascii")


EMPTY_CHALLENGE = Challenge(text="")
USERNAME_CHALLENGE = Challenge(text=base64.b64encode(b"Username:").decode())
PASSWORD_CHALLENGE = Challenge(text=base64.b64encode(b"Password:").decode())


class IMailSubmitter(Interface):
    """An authenticated SMTP client; the avatar is its user name (a str)."""


@implementer(IRealm)
class SubmitterRealm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, str, Callable[[], None]]:
        if IMailSubmitter not in interfaces:
            raise NotImplementedError("only IMailSubmitter avatars")
        return IMailSubmitter, avatarId, lambda: None


class Refused(Exception):
    """The client's response ends the exchange with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def decode_response(item: bytes | str | Problem) -> bytes:
    """A client's SASL response line: base64, ``=`` for empty, ``*`` to cancel (RFC 4954 4)."""
    if isinstance(item, Problem):
        raise Refused(R.AUTH_BAD_RESPONSE)
    text = item.decode("ascii", "replace") if isinstance(item, bytes) else item
    text = text.strip()
    if text == "*":
        raise Refused(R.AUTH_CANCELLED)
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(R.AUTH_BAD_RESPONSE) from None


def utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(R.AUTH_BAD_RESPONSE) from None


def parse_plain(message: bytes) -> tuple[str, str, str]:
    """``(authzid, authcid, password)`` from a PLAIN message ``[authzid] NUL authcid NUL passwd``."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise Refused(R.AUTH_BAD_RESPONSE)
    authzid, authcid, password = (utf8(p) for p in parts)
    return authzid, authcid, password


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def mask_auth_command(text: str) -> str:
    """The AUTH command line as diagnostics may show it: the mechanism, never the initial response."""
    verb, _, rest = text.partition(" ")
    mechanism, _, initial = rest.strip().partition(" ")
    return f"{verb} {mechanism}" + (" ***" if initial else "")


class ServerAuth:
    """AUTH for one virtual server."""

    def __init__(self, vs: VirtualServer, portal: Portal) -> None:
        self.vs = vs
        self.portal = portal

    @classmethod
    def for_virtual_server(cls, vs: VirtualServer, reactor: Any,
                           run: Callable[..., defer.Deferred] | None = None) -> "ServerAuth | None":
        """None when the virtual server has no users file. ``run`` defaults to the reactor's threads."""
        if not vs.auth.users:
            return None
        portal = Portal(SubmitterRealm(), [UsersFileChecker(vs.auth.users, run or thread_runner(reactor))])
        return cls(vs, portal)

    def offered(self, session: Any) -> bool:
        return session.tls or (self.vs.auth.allow_plaintext and is_loopback(session.peer_host))

    def keyword(self, session: Any) -> str | None:
        """The EHLO keyword, when AUTH is offered on this session."""
        return "AUTH " + " ".join(MECHANISMS) if self.offered(session) else None

    def command(self, protocol: Any, argument: str) -> Reply | defer.Deferred:
        """``AUTH <mechanism> [initial-response]``."""
        session = protocol.session
        if not self.offered(session):
            return R.AUTH_ENCRYPTION_REQUIRED
        if session.authenticated_user:
            return R.AUTH_ALREADY
        locked = protocol.factory.client_limits.auth_locked(session.peer_host)
        if isinstance(locked, defer.Deferred):          # counted over the cluster: Redis is asked
            return locked.addCallback(self._start, protocol, argument)
        return self._start(locked, protocol, argument)

    def _start(self, locked: bool, protocol: Any, argument: str) -> Reply | defer.Deferred:
        if locked:
            protocol._event("authentication", "minimum", "authentication locked", peer=protocol.session.peer_host)
            return R.AUTH_LOCKED
        mechanism, _, initial = argument.strip().partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not mechanism:
            return R.AUTH_SYNTAX
        if mechanism not in MECHANISMS:
            return R.AUTH_UNKNOWN_MECHANISM
        return _Exchange(self, protocol, mechanism).begin(initial or None)


class _Exchange:
    """One AUTH command, from the mechanism to 235/535; a collaborator of SMTPServerProtocol."""

    def __init__(self, auth: ServerAuth, protocol: Any, mechanism: str) -> None:
        self.auth = auth
        self.protocol = protocol
        self.mechanism = mechanism
        self.username = ""

    def begin(self, initial: str | None) -> Reply | defer.Deferred:
        if self.mechanism == "PLAIN":
            return self._step(self._plain, initial, EMPTY_CHALLENGE)
        return self._step(self._login_user, initial, USERNAME_CHALLENGE)

    def _step(self, handler: Callable[[bytes | Problem], Reply | defer.Deferred],
              response: str | None, challenge: Challenge) -> Reply | defer.Deferred:
        """Feed ``response`` to ``handler`` now, or ask for it with ``challenge``."""
        if response is not None:
            return self._guarded(handler, response)
        self.protocol.sasl_continuation = lambda item: self._guarded(handler, item)
        return challenge

    def _guarded(self, handler: Callable[[Any], Reply | defer.Deferred], item: Any) -> Reply | defer.Deferred:
        try:
            return handler(item)
        except Refused as e:
            self.protocol.sasl_continuation = None
            return e.reply

    def _plain(self, item: Any) -> Reply | defer.Deferred:
        authzid, authcid, password = parse_plain(decode_response(item))
        if authzid and authzid != authcid:      # acting for another identity is not supported
            return self._failed("authorization identity differs")
        return self._check(authcid, password)

    def _login_user(self, item: Any) -> Reply:
        self.username = utf8(decode_response(item))
        if not self.username:
            raise Refused(R.AUTH_BAD_RESPONSE)
        return self._step(self._login_password, None, PASSWORD_CHALLENGE)

    def _login_password(self, item: Any) -> Reply | defer.Deferred:
        return self._check(self.username, utf8(decode_response(item)))

    # -- the verdict -----------------------------------------------------------------------------

    def _check(self, username: str, password: str) -> defer.Deferred:
        self.username = username
        d = self.auth.portal.login(UsernamePassword(username, password), None, IMailSubmitter)
        return d.addCallbacks(self._checked_good, self._checked_bad)

    def _checked_good(self, login: tuple[Any, str, Callable[[], None]]) -> Reply | defer.Deferred:
        _, user, _ = login
        protocol = self.protocol
        return protocol._ask(protocol.hooks.auth(protocol.session, self.mechanism, user), self._hook_answered)

    def _hook_answered(self, verdict: Reply | None) -> Reply:
        if verdict is not None and not verdict.is_positive:
            return self._failed("refused by the smtpgw_auth hook", verdict)
        self.protocol.session.authenticated_user = self.username
        self.protocol._event("authentication", "minimum", "authenticated", mechanism=self.mechanism,
                             user=self.username, peer=self.protocol.session.peer_host)
        return verdict or R.AUTH_OK

    def _checked_bad(self, failure: Any) -> Reply:
        if failure.check(cred_error.UnauthorizedLogin):
            return self._failed("invalid credentials")
        if failure.check(UsersFileError):
            log.error("AUTH: {error}", error=str(failure.value))
        else:
            log.failure("AUTH: checking credentials failed", failure)
        self.protocol._event("authentication", "minimum", "authentication unavailable",
                             mechanism=self.mechanism)
        return R.AUTH_TEMPORARY_FAILURE

    def _failed(self, why: str, reply: Reply = R.AUTH_FAILED) -> Reply:
        protocol = self.protocol
        protocol.auth_failures += 1
        protocol.factory.client_limits.auth_failed(protocol.session.peer_host)
        limit = self.auth.vs.auth.max_failures
        protocol._event("authentication", "medium", "authentication failed", mechanism=self.mechanism,
                        why=why, failures=protocol.auth_failures, peer=protocol.session.peer_host)
        maillog.of(protocol.gateway).write(mail_lines.auth_failed(protocol.session, self.mechanism, why))
        if protocol.auth_failures >= limit and not reply.disconnect:
            protocol._then(lambda: protocol._send(R.AUTH_TOO_MANY_FAILURES))
        return reply
