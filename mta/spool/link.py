"""The gateway's end of the spool writer process (:mod:`mta.spool.writer`).

Kept apart from the child's module so that the child starts without importing Twisted.
"""
from __future__ import annotations

import fcntl
import os
import pwd
import sys
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger

import mta

from mta.io.fastpath import dispatch_first, write_pipe_now
from mta.spool.writer import BATCH, OK, ReplyReader, encode_request

log = Logger(namespace="smtpgw.spool")

PIPE_SIZE = 1 << 20             # Linux's default pipe-max-size


STDERR_KEEP = 4096              # the end of what a failing writer said, for the one line logged


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(mta.__file__)))     # the folder holding mta/


def child_command() -> tuple[str, list[str], dict[str, str]]:
    """Run the same checkout's writer in the child, whatever the parent's sys.path was built from.
    ``-P``: ``python -m`` would otherwise put the working directory first on the child's path, so a
    gateway started from a folder holding another checkout's ``mta`` ran that checkout's writer."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_root(), *filter(None, [env.get("PYTHONPATH")])])
    return sys.executable, [sys.executable, "-P", "-m", "mta.spool.writer"], env


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def what_to_do(uid: int) -> str:
    """The writer runs as the gateway's user, from the gateway's Python and installation."""
    return (f"the gateway runs as {user_name(uid)}, who must be able to run {sys.executable}, read {_root()} "
            "and write the spool (twistd --uid/--gid), or run it as a user who can")


def cannot_start(problem: str, uid: int | None = None) -> str:
    """The one line for a writer that cannot start: the cause, then what to do."""
    return f"the spool writer cannot start: {problem}; {what_to_do(os.geteuid() if uid is None else uid)}"


def os_problem(e: OSError) -> str:
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)


class WriterLink:
    """One child process, started on first use and again after it dies.

    ``request`` returns a Deferred that fires once the child reports the work done and durable, or
    fails with ``error_type`` if the child answered an error or died on the way (a message whose
    client is then told 4xx). ``stop`` closes the child's stdin: it finishes what it was sent, exits.
    """

    def __init__(self, reactor: Any, queue_dir: str, error_type: Callable[[str], Exception]) -> None:
        self._reactor = reactor
        self._queue_dir = queue_dir
        self._error = error_type
        self._proto: _WriterProtocol | None = None
        self._tag = 0
        self.batches = 0
        self.restarts = 0

    def request(self, op: bytes, tmp: str, final: str, chunks: list[bytes]) -> defer.Deferred:
        proto = self._proto
        if proto is None or proto.ended:
            try:
                proto = self._spawn()
            except OSError as e:
                return defer.fail(self._error(cannot_start(os_problem(e))))
            except Exception as e:
                return defer.fail(self._error(cannot_start(str(e))))
        self._tag = tag = (self._tag + 1) & 0xFFFFFFFF
        d: defer.Deferred = defer.Deferred()
        proto.pending[tag] = d
        request = encode_request(op, tag, tmp, final, chunks)
        stdin = getattr(proto.transport, "pipes", {}).get(0)
        if stdin is not None:
            write_pipe_now(stdin, request)
        else:
            proto.transport.writeSequence(request)
        return d

    @property
    def pid(self) -> int | None:
        """The running child's pid (tests kill it)."""
        proto = self._proto
        return None if proto is None or proto.ended else proto.transport.pid

    def _spawn(self) -> "_WriterProtocol":
        exe, args, env = child_command()
        proto = _WriterProtocol(self)
        transport = self._reactor.spawnProcess(proto, exe, [*args, self._queue_dir, str(os.getpid())],
                                               env=env, childFDs={0: "w", 1: "r", 2: "r"})
        try:    # room for a few big messages in the pipe: each written in one go, not in 64 KB turns
            fcntl.fcntl(transport.pipes[0].fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError, KeyError):
            pass
        try:    # its replies are read before anything else ready in the same turn: each lets a 250 go
            proto.first_fd = transport.pipes[1].fileno()
        except (AttributeError, KeyError):
            pass
        else:
            dispatch_first(self._reactor, proto.first_fd)
        if self._proto is not None:
            self.restarts += 1
        self._proto = proto
        return proto

    def stop(self) -> defer.Deferred:
        """Fires when the child has exited."""
        proto, self._proto = self._proto, None
        if proto is None or proto.ended:
            return defer.succeed(None)
        proto.transport.closeStdin()
        return proto.exited()

    def _answer(self, proto: "_WriterProtocol", kind: int, tag: int, text: str) -> None:
        d = proto.pending.pop(tag, None)
        if d is None:
            return
        if kind == BATCH:
            self.batches += 1
        if kind == OK or kind == BATCH:
            d.callback(None)
        else:
            d.errback(self._error(text))


class _WriterProtocol(protocol.ProcessProtocol):
    def __init__(self, link: WriterLink) -> None:
        self.link = link
        self.pending: dict[int, defer.Deferred] = {}
        self.ended = False
        self.answered = False
        self._said = b""
        self._reader = ReplyReader()
        self._waiters: list[defer.Deferred] = []
        self.first_fd: int | None = None

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:                     # only a writer in trouble says anything: keep the end of it
            self._said = (self._said + data)[-STDERR_KEEP:]
            return
        self.answered = True
        for kind, tag, text in self._reader.feed(data):
            self.link._answer(self, kind, tag, text)

    def last_said(self) -> str:
        """The writer's last line on stderr (a traceback's is the exception)."""
        lines = [line.strip() for line in self._said.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def childConnectionLost(self, fd: int) -> None:
        if fd == 1 and self.first_fd is not None:     # the number may now be given to anything else
            dispatch_first(self.link._reactor, self.first_fd, False)
            self.first_fd = None

    def processEnded(self, reason: Any) -> None:
        self.childConnectionLost(1)
        self.ended = True
        pending, self.pending = self.pending, {}
        said = self.last_said()
        status = getattr(reason.value, "exitCode", None)
        how = f"exit status {status}" if status is not None else str(reason.value)
        if not self.answered and (pending or status):
            # it never answered: it could not start (its Python, the installation, the queue folder);
            # whoever asked for a write logs this line (a session's message: 451 4.3.0)
            text = cannot_start(f"it ended at once ({how})" + (f": {said}" if said else ""))
        else:
            text = f"the spool writer exited before finishing ({how})" + (f": {said}" if said else "")
            if pending:
                log.error("{text}; {n} writes unfinished", text=text, n=len(pending))
        for d in pending.values():
            d.errback(self.link._error(text))
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def exited(self) -> defer.Deferred:
        if self.ended:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d
