"""A real SMTP server to talk to in tests, running in background threads of the test process.

It deliberately uses plain sockets and threads rather than the Twisted reactor, so the same peer
serves plain pytest tests that block (smtplib, swaks) and trial tests whose reactor drives our own
client against it. Each peer listens on its own loopback address (127.0.0.x), so tests can stand for
several "hosts" at once on port 25.

Usage::

    with SMTPPeer("127.0.0.31") as peer:
        peer.set_reply("rcpt", lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("x") else None)
        ... send mail to 127.0.0.31:25 ...
        assert peer.wait_for(1)
        assert peer.messages[0].data == b"Subject: hi\\r\\n\\r\\nbody\\r\\n"

Replies given to :meth:`SMTPPeer.set_reply` are written verbatim (each ``\\n`` becomes CRLF), so a test
can also make the peer misbehave, e.g. ``"250 OK\\n250 injected"`` sends two lines.
"""
from __future__ import annotations

import base64
import binascii
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

STAGES = frozenset({"connect", "ehlo", "helo", "mail", "rcpt", "data", "dot",
                    "rset", "noop", "quit", "starttls", "auth"})
DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES")
MAX_LINE = 1024 * 1024          # a peer that reads forever would only hide client bugs

ReplySpec = str | Callable[[str], "str | None"] | None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` right now (for "connection refused" tests)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


@dataclass
class ReceivedMessage:
    """One message the peer accepted (its reply to the final dot was 2xx)."""

    sender: str
    recipients: list[str]
    data: bytes                 # dot-unstuffed, every line ending in CRLF as received
    helo: str | None
    peer_ip: str
    mail_params: str = ""       # everything after MAIL FROM:<...>, e.g. "SIZE=123 BODY=8BITMIME"
    tls: bool = False
    connection: int = 0         # 1-based number of the connection it came on
    auth_user: str | None = None    # the user that authenticated on that connection (peers with ``auth``)


@dataclass
class _Transaction:
    sender: str
    params: str
    recipients: list[str] = field(default_factory=list)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    # A burst of connections (a queue restarting with many messages) overflows socketserver's default
    # backlog of 5; Linux then leaves the extra clients "established" on their side with no greeting.
    request_queue_size = 1024
    daemon_threads = True
    block_on_close = False

    def __init__(self, peer: "SMTPPeer", address: tuple[str, int]) -> None:
        self.peer = peer
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    """One SMTP conversation, read as lines; pipelined commands are simply taken one by one."""

    def setup(self) -> None:
        self.peer: SMTPPeer = self.server.peer  # type: ignore[attr-defined]
        self.sock: socket.socket = self.request
        self.sock.settimeout(self.peer.socket_timeout)
        self.buf = bytearray()
        self.helo: str | None = None
        self.tls = False
        self.txn: _Transaction | None = None
        self.closing = False
        self.auth_user: str | None = None
        self.number = self.peer._connection_opened(self.sock)

    def finish(self) -> None:
        self.peer._connection_closed(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass

    # -- I/O -------------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
        payload = "".join(line + "\r\n" for line in lines).encode("utf-8")
        try:
            self.sock.sendall(payload)
        except OSError:
            self.closing = True

    def read_line(self) -> bytes | None:
        """The next line without its CRLF (None at EOF); a bare LF does not end a line."""
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                self.peer._record(line)
                return line
            if len(self.buf) > MAX_LINE:
                return None
            try:
                chunk = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self.peer._record_read(self.number, chunk)
            self.buf += chunk

    def reply(self, stage: str, argument: str, default: str) -> str:
        """Send the configured reply for ``stage`` (or ``default``) and return what was sent."""
        text = self.peer._reply_for(stage, argument) or default
        self.send(text)
        return text

    # -- the conversation ------------------------------------------------------------------------

    def handle(self) -> None:
        peer_ip = self.client_address[0]
        if self.peer._refusing:
            return
        greeting = self.reply("connect", peer_ip, f"220 {self.peer.hostname} ESMTP test peer")
        code = _code(greeting)
        if code == 421:
            return
        while not self.closing:
            line = self.read_line()
            if line is None:
                return
            if code >= 400:           # RFC 5321 3.1: after a 554 greeting only QUIT is useful
                if line.upper().startswith(b"QUIT"):
                    self.send("221 2.0.0 Bye")
                    return
                self.send("503 5.5.1 No service")
                continue
            self.command(line.decode("utf-8", "replace"), peer_ip)

    def command(self, line: str, peer_ip: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "smtp_" + verb, None)
        if handler is None:
            self.send("500 5.5.2 Command not recognized")
            return
        handler(arg.strip(), peer_ip)

    def smtp_EHLO(self, arg: str, peer_ip: str) -> None:
        lines = [self.peer.hostname] + [e for e in self.peer.extensions if self.tls is False or e != "STARTTLS"]
        if self.peer.auth is not None and (self.tls or not self.peer.auth_requires_tls):
            lines.append("AUTH " + " ".join(self.peer.auth_mechanisms))
        default = "\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{t}" for i, t in enumerate(lines))
        if _code(self.reply("ehlo", arg, default)) // 100 == 2:
            self.helo = arg
            self.txn = None

    def smtp_HELO(self, arg: str, peer_ip: str) -> None:
        if _code(self.reply("helo", arg, f"250 {self.peer.hostname}")) // 100 == 2:
            self.helo = arg
            self.txn = None

    def smtp_STARTTLS(self, arg: str, peer_ip: str) -> None:
        if self.peer.tls_context is None or "STARTTLS" not in self.peer.extensions or self.tls:
            self.send("502 5.5.1 STARTTLS not available")
            return
        if _code(self.reply("starttls", arg, "220 2.0.0 Ready to start TLS")) != 220:
            return
        if self.buf:                  # RFC 3207 4.2: pipelined data after STARTTLS is an attack
            self.peer._record(b"(peer: data pipelined after STARTTLS discarded)")
            self.buf.clear()
        raw = self.sock
        try:
            self.sock = self.peer.tls_context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            self.closing = True
            return
        self.peer._connection_swapped(raw, self.sock)
        self.tls = True
        self.helo = None
        self.txn = None
        self.auth_user = None

    def smtp_AUTH(self, arg: str, peer_ip: str) -> None:
        """AUTH PLAIN (with or without an initial response) and AUTH LOGIN, against ``peer.auth``."""
        peer = self.peer
        if peer.auth is None or (peer.auth_requires_tls and not self.tls):
            self.send("502 5.5.1 AUTH not available")
            return
        if self.helo is None or self.auth_user is not None or self.txn is not None:
            self.send("503 5.5.1 Bad sequence of commands")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in peer.auth_mechanisms:
            self.send("504 5.5.4 Unrecognized authentication type")
            return
        try:
            if mechanism == "PLAIN":
                token = initial.strip() or self._challenge("")
                if token is None:
                    return
                _authzid, user, password = _b64decode(token).split("\0", 2)
            else:
                user_b64 = initial.strip() or self._challenge("VXNlcm5hbWU6")
                if user_b64 is None:
                    return
                password_b64 = self._challenge("UGFzc3dvcmQ6")
                if password_b64 is None:
                    return
                user, password = _b64decode(user_b64), _b64decode(password_b64)
        except ValueError:
            self.send("501 5.5.2 Cannot decode the response")
            return
        default = ("235 2.7.0 Authentication successful" if peer.auth.get(user) == password
                   else "535 5.7.8 Authentication credentials invalid")
        if _code(self.reply("auth", f"{mechanism} {user}", default)) == 235:
            self.auth_user = user

    def _challenge(self, text: str) -> str | None:
        """Send a 334 and read the client's answer (None: connection gone or "*" cancelled)."""
        self.send(f"334 {text}".rstrip() if text else "334 ")
        line = self.read_line()
        if line is None:
            self.closing = True
            return None
        answer = line.decode("ascii", "replace").strip()
        if answer == "*":
            self.send("501 5.7.0 Authentication cancelled")
            return None
        return answer

    def smtp_MAIL(self, arg: str, peer_ip: str) -> None:
        if self.helo is None:
            self.send("503 5.5.1 Say hello first")
            return
        if self.txn is not None:
            self.send("503 5.5.1 Nested MAIL command")
            return
        if self.peer.auth is not None and self.auth_user is None:
            self.send("530 5.7.0 Authentication required")
            return
        if not arg.upper().startswith("FROM:"):
            self.send("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address, params = _path(arg[5:])
        limit = self.peer._size_limit()
        for p in params.split():
            key, _, value = p.partition("=")
            if key.upper() == "SIZE" and limit and value.isdigit() and int(value) > limit:
                self.send("552 5.3.4 Message size exceeds fixed maximum message size")
                return
        if _code(self.reply("mail", address, "250 2.1.0 Sender OK")) // 100 == 2:
            self.txn = _Transaction(address, params)

    def smtp_RCPT(self, arg: str, peer_ip: str) -> None:
        if self.txn is None:
            self.send("503 5.5.1 Need MAIL first")
            return
        if not arg.upper().startswith("TO:"):
            self.send("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, _ = _path(arg[3:])
        if _code(self.reply("rcpt", address, "250 2.1.5 Recipient OK")) // 100 == 2:
            self.txn.recipients.append(address)

    def smtp_DATA(self, arg: str, peer_ip: str) -> None:
        if self.txn is None:
            self.send("503 5.5.1 Need MAIL first")
            return
        if not self.txn.recipients:
            self.send("554 5.5.1 No valid recipients")
            return
        if _code(self.reply("data", "", "354 End data with <CR><LF>.<CR><LF>")) != 354:
            return
        lines: list[bytes] = []
        while True:
            line = self.read_line()
            if line is None:
                self.closing = True
                return
            if line == b".":
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        data = b"".join(line + b"\r\n" for line in lines)
        txn, self.txn = self.txn, None
        limit = self.peer._size_limit()
        if limit and len(data) > limit:
            self.send("552 5.3.4 Message too big")
            return
        text = self.peer._reply_for("dot", data.decode("latin-1")) or "250 2.0.0 Message accepted"
        if _code(text) // 100 == 2:      # recorded before the reply, so a client that saw 250 finds it
            self.peer._accepted(ReceivedMessage(txn.sender, list(txn.recipients), data, self.helo,
                                                peer_ip, txn.params, self.tls, self.number, self.auth_user))
        self.send(text)

    def smtp_RSET(self, arg: str, peer_ip: str) -> None:
        if _code(self.reply("rset", arg, "250 2.0.0 Reset")) // 100 == 2:
            self.txn = None

    def smtp_NOOP(self, arg: str, peer_ip: str) -> None:
        self.reply("noop", arg, "250 2.0.0 OK")

    def smtp_QUIT(self, arg: str, peer_ip: str) -> None:
        self.reply("quit", arg, "221 2.0.0 Bye")
        self.closing = True


def _code(reply: str) -> int:
    """The code of the last line of a reply (that is the one that counts)."""
    last = reply.replace("\r\n", "\n").rstrip("\n").split("\n")[-1]
    try:
        return int(last[:3])
    except ValueError:
        return 500


def _b64decode(text: str) -> str:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError) as e:
        raise ValueError(str(e)) from None


def _path(text: str) -> tuple[str, str]:
    """``<addr> PARAMS`` -> (addr, params); tolerant, as a test peer should be."""
    text = text.strip()
    if text.startswith("<"):
        end = text.find(">")
        if end >= 0:
            return text[1:end], text[end + 1:].strip()
    address, _, params = text.partition(" ")
    return address, params.strip()


class SMTPPeer:
    """An SMTP server on ``host:port`` that records what it receives and answers as told.

    Attributes (read them from the test thread; they are only appended to):

    - ``messages``: every accepted :class:`ReceivedMessage`, in order.
    - ``transcript``: every line received, CRLF removed, all connections together (DATA lines too).
    - ``reads``: ``(connection number, bytes)`` for every ``recv``, to see what came in one segment.
    - ``connections``: connections accepted so far.
    - ``extensions`` and ``hostname`` may be changed between connections.
    - ``tls_context``: an ``ssl.SSLContext`` (server side); with it and ``"STARTTLS"`` in
      ``extensions`` the peer offers STARTTLS.
    - ``auth``: ``{user: password}``; with it the peer offers ``AUTH PLAIN LOGIN`` (only after
      STARTTLS while ``auth_requires_tls``, the default) and refuses MAIL until a client logged in
      (530). The ``auth`` stage of :meth:`set_reply` gets ``"MECHANISM user"``.
    """

    def __init__(self, host: str = "127.0.0.2", port: int = 25, hostname: str = "peer.test",
                 extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
                 tls_context: ssl.SSLContext | None = None, auth: dict[str, str] | None = None,
                 auth_requires_tls: bool = True, auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.extensions = tuple(extensions)
        self.tls_context = tls_context
        self.auth = dict(auth) if auth is not None else None
        self.auth_requires_tls = auth_requires_tls
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.socket_timeout = 30.0
        self.messages: list[ReceivedMessage] = []
        self.transcript: list[bytes] = []
        self.reads: list[tuple[int, bytes]] = []
        self.connections = 0
        self._replies: dict[str, ReplySpec] = {}
        self._refusing = False
        self._cond = threading.Condition()
        self._open: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> "SMTPPeer":
        self._server = _Server(self, (self.host, self.port))
        self.port = self._server.server_address[1]      # port=0 picks a free one
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"SMTPPeer {self.host}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (clients see the connection drop)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self.drop_connections()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def __enter__(self) -> "SMTPPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour -------------------------------------------------------------------------------

    def set_reply(self, stage: str, reply: ReplySpec) -> None:
        """Answer ``stage`` with ``reply`` from now on (``None`` restores the default).

        A callable receives the argument (the address for mail/rcpt without brackets, the name for
        ehlo/helo, the client IP for connect, the message as latin-1 text for dot) and returns a reply
        or ``None`` for the default. A 421 greeting closes at once; another 4xx/5xx greeting answers
        every later command with 503 until QUIT.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGES)}")
        with self._cond:
            if reply is None:
                self._replies.pop(stage, None)
            else:
                self._replies[stage] = reply

    def drop_connections(self) -> None:
        """Cut every open connection at once, without a reply (the listener stays up)."""
        with self._cond:
            open_socks = list(self._open)
        for s in open_socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def refuse_connections(self, refuse: bool = True) -> None:
        """Accept and immediately close new connections (no greeting at all)."""
        self._refusing = refuse

    # -- waiting ---------------------------------------------------------------------------------

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` messages were accepted; False on timeout."""
        return self.wait_until(lambda: len(self.messages) >= count, timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate()`` is true (re-checked whenever the peer records something)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def open_connections(self) -> int:
        with self._cond:
            return len(self._open)

    # -- called from handler threads -------------------------------------------------------------

    def _reply_for(self, stage: str, argument: str) -> str | None:
        with self._cond:
            spec = self._replies.get(stage)
        if callable(spec):
            return spec(argument)
        return spec

    def _size_limit(self) -> int:
        for ext in self.extensions:
            parts = ext.split()
            if parts and parts[0].upper() == "SIZE" and len(parts) > 1 and parts[1].isdigit():
                return int(parts[1])
        return 0

    def _connection_opened(self, sock: socket.socket) -> int:
        with self._cond:
            self.connections += 1
            self._open.add(sock)
            self._cond.notify_all()
            return self.connections

    def _connection_swapped(self, old: socket.socket, new: socket.socket) -> None:
        with self._cond:
            self._open.discard(old)
            self._open.add(new)

    def _connection_closed(self, sock: socket.socket) -> None:
        with self._cond:
            self._open.discard(sock)
            self._cond.notify_all()

    def _record(self, line: bytes) -> None:
        with self._cond:
            self.transcript.append(line)
            self._cond.notify_all()

    def _record_read(self, number: int, chunk: bytes) -> None:
        with self._cond:
            self.reads.append((number, chunk))

    def _accepted(self, message: ReceivedMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
