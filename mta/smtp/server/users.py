"""Users and passwords for SMTP AUTH: the users file, its password hashes, and a twisted.cred checker.

The users file (``auth.users``) is plain text, one user per line::

    # comments and blank lines are ignored
    alice:scrypt$ln=14,r=8,p=1$<salt>$<hash>
    relay@example.test:pbkdf2-sha256$i=600000$<salt>$<hash>

A user name is 1 to 256 characters of ``A-Z a-z 0-9 . _ % + = @ -`` and is compared exactly (case
matters). Salt and hash are unpadded base64 (RFC 4648 alphabet). Two schemes, both from the standard
library: ``scrypt`` (``ln`` is log2 of N; the default, memory-hard) and ``pbkdf2-sha256`` (``i``
iterations). Checking a password is slow on purpose (a quarter of a second on a small machine), so it
always runs in a thread, never in the reactor thread, and in a small pool of its own
(:func:`thread_runner`), so a flood of AUTH attempts never delays a Maildir delivery. Parameters are
stored per line, so stronger settings can be introduced without invalidating the passwords already set.

``smtpgw passwd`` (mta/cli/passwd.py) writes this file; the gateway re-reads it when it changes.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from zope.interface import implementer
from mta.config import ConfigError

USER_NAME = re.compile(r"[A-Za-z0-9._%+=@-]{1,256}")
DEFAULT_SCHEME = "scrypt"
SCRYPT_LN, SCRYPT_R, SCRYPT_P = 14, 8, 1       # N = 16384: 16 MiB per check (Percival's interactive setting)
PBKDF2_ITERATIONS = 600_000                    # OWASP's figure for PBKDF2-HMAC-SHA256
SALT_BYTES, HASH_BYTES = 16, 32


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line; ``str()`` names the file (and line)."""


# -- password hashes -----------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _params(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        if not eq or not value.isdigit() or name in out:
            raise ValueError(f"bad parameter {item!r}")
        out[name] = int(value)
    return out


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, length: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * n * r * p + (1 << 20))


@dataclass(frozen=True)
class PasswordHash:
    """One stored hash: ``scheme$params$salt$hash``."""

    scheme: str
    params: dict[str, int]
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> "PasswordHash":
        """Raises ValueError with what is wrong."""
        parts = text.split("$")
        if len(parts) != 4:
            raise ValueError("expected scheme$parameters$salt$hash")
        scheme, params_text, salt_text, digest_text = parts
        params = _params(params_text)
        try:
            salt, digest = _unb64(salt_text), _unb64(digest_text)
        except ValueError:
            raise ValueError("salt and hash must be base64") from None
        if not salt or len(digest) < 16:
            raise ValueError("salt or hash too short")
        if scheme == "scrypt":
            if params.keys() != {"ln", "r", "p"} or not (1 <= params["ln"] <= 20) or not (
                    1 <= params["r"] <= 32) or not (1 <= params["p"] <= 16):
                raise ValueError("scrypt needs ln (1-20), r (1-32) and p (1-16)")
        elif scheme == "pbkdf2-sha256":
            if params.keys() != {"i"} or not (1000 <= params["i"] <= 100_000_000):
                raise ValueError("pbkdf2-sha256 needs i (1000-100000000)")
        else:
            raise ValueError(f"unknown scheme {scheme!r} (known: scrypt, pbkdf2-sha256)")
        return cls(scheme, params, salt, digest)

    def derive(self, password: str) -> bytes:
        secret = password.encode("utf-8")
        if self.scheme == "scrypt":
            p = self.params
            return _scrypt(secret, self.salt, p["ln"], p["r"], p["p"], len(self.digest))
        return hashlib.pbkdf2_hmac("sha256", secret, self.salt, self.params["i"], len(self.digest))

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self.derive(password), self.digest)

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.scheme}${params}${_b64(self.salt)}${_b64(self.digest)}"


def hash_password(password: str, scheme: str = DEFAULT_SCHEME, **params: int) -> str:
    """A new salted hash of ``password`` for the users file (slow: call it off the reactor thread).

    ``params`` overrides the defaults (``ln``/``r``/``p`` for scrypt, ``i`` for pbkdf2-sha256).
    """
    salt = os.urandom(SALT_BYTES)
    if scheme == "scrypt":
        chosen = {"ln": SCRYPT_LN, "r": SCRYPT_R, "p": SCRYPT_P, **params}
    elif scheme == "pbkdf2-sha256":
        chosen = {"i": PBKDF2_ITERATIONS, **params}
    else:
        raise ValueError(f"unknown scheme {scheme!r} (known: scrypt, pbkdf2-sha256)")
    unsalted = PasswordHash(scheme, chosen, salt, b"\0" * HASH_BYTES)
    PasswordHash.parse(str(unsalted))           # refuses parameters the file could not hold
    return str(replace(unsalted, digest=unsalted.derive(password)))


def verify_password(password: str, encoded: str) -> bool:
    return PasswordHash.parse(encoded).matches(password)


# A hash to spend the same time on when the user does not exist, so timing tells nothing.
_DUMMY = PasswordHash("scrypt", {"ln": SCRYPT_LN, "r": SCRYPT_R, "p": SCRYPT_P}, b"\0" * SALT_BYTES,
                      b"\0" * HASH_BYTES)


# -- the users file ------------------------------------------------------------------------------

def parse_users(text: str, path: str = "users file") -> dict[str, PasswordHash]:
    """Users by name; raises :class:`UsersFileError` naming the line."""
    users: dict[str, PasswordHash] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, encoded = line.partition(":")
        where = f"{path}: line {number}"
        if not colon:
            raise UsersFileError(f"{where}: expected user:scheme$parameters$salt$hash")
        if not USER_NAME.fullmatch(name):
            raise UsersFileError(f"{where}: bad user name {name!r} (letters, digits and . _ % + = @ - only)")
        if name in users:
            raise UsersFileError(f"{where}: user {name!r} is listed twice")
        try:
            users[name] = PasswordHash.parse(encoded)
        except ValueError as e:
            raise UsersFileError(f"{where}: {e}") from None
    return users


def read_users(path: str) -> dict[str, PasswordHash]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsersFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsersFileError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    return parse_users(text, path)


def set_user_line(text: str, user: str, encoded: str | None) -> str:
    """The file's text with ``user``'s line replaced (or appended; removed when ``encoded`` is None),
    every other line kept as it was."""
    lines = text.splitlines()
    out, found = [], False
    for line in lines:
        name = line.strip().partition(":")[0]
        if not line.strip().startswith("#") and name == user:
            found = True
            if encoded is not None:
                out.append(f"{user}:{encoded}")
            continue
        out.append(line)
    if not found and encoded is not None:
        out.append(f"{user}:{encoded}")
    return "".join(f"{line}\n" for line in out)


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` in one step (temp file, fsync, rename, fsync of the folder).

    A new file gets ``mode``; an existing one keeps its mode (and owner, when we may set it).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        owner = None
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UsersFile:
    """The users file, re-read whenever it changes on disk (so ``smtpgw passwd`` needs no restart).

    Thread-safe: it is read from the password-checking threads.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, PasswordHash] = {}

    def lookup(self, user: str) -> PasswordHash | None:
        """Raises :class:`UsersFileError` when the file is missing or broken."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as e:
                raise UsersFileError(f"{self.path}: {e.strerror}") from None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._users = read_users(self.path)
                self._stamp = stamp
            return self._users.get(user)


# -- twisted.cred ---------------------------------------------------------------------------------

Runner = Callable[..., defer.Deferred]


AUTH_THREADS = 2        # password checks at once; the rest wait their turn in the pool's queue


class _AuthPool:
    """The password checks' own small thread pool. Hashing is slow on purpose and an attacker can
    ask for it over and over; in the reactor's shared pool it would queue ahead of Maildir
    deliveries and log writes, here it only delays other password checks."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pool: Any = None

    def get(self) -> Any:
        if self.pool is None:
            from twisted.python.threadpool import ThreadPool
            self.pool = ThreadPool(minthreads=0, maxthreads=AUTH_THREADS, name="smtpgw-auth")
            self.pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self.pool

    def stop(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop()


_pools: dict[int, _AuthPool] = {}


def thread_runner(reactor: Any) -> Runner:
    """Run a blocking function in the password checks' thread pool (one per reactor, made at the
    first check) and get a Deferred of its result."""
    from twisted.internet.threads import deferToThreadPool

    holder = _pools.setdefault(id(reactor), _AuthPool(reactor))

    def run(f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return deferToThreadPool(reactor, holder.get(), f, *args)
    return run


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """Checks a user name and password against the users file; the avatar id is the user name (str).

    ``run`` runs the slow check off the reactor thread (:func:`thread_runner`); tests may pass one that
    runs it at once. A broken or missing file fails with :class:`UsersFileError` (a temporary failure,
    not a wrong password).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: UsersFile | str, run: Runner) -> None:
        self.users = users if isinstance(users, UsersFile) else UsersFile(users)
        self.run = run

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        username, password = credentials.username, credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return self.run(self._check, username, password)

    def _check(self, username: str, password: str) -> str:
        stored = self.users.lookup(username)
        if stored is None:
            _DUMMY.matches(password)
            raise cred_error.UnauthorizedLogin("no such user")
        if not stored.matches(password):
            raise cred_error.UnauthorizedLogin("wrong password")
        return username


def check_users_files(config: Any) -> None:
    """At start-up: every ``auth.users`` file must exist and parse (a config error otherwise)."""
    for i, vs in enumerate(config.virtual_servers):
        if vs.auth.users:
            try:
                read_users(vs.auth.users)
            except UsersFileError as e:
                raise ConfigError(f"virtual_servers[{i}].auth.users", str(e)) from None
