"""Several worker processes on one gateway (``gateway.workers``), so that both cores work.

One Python process runs one reactor thread, and that thread is what limits smtpgw's throughput.
With ``workers: N`` the twistd process is worker 0 and also the supervisor: it binds every listen
address itself (before dropping privileges), then starts N-1 more twistd processes (workers 1..N-1)
that inherit those listening sockets and accept from them too, so the kernel hands each connection
to whichever process is free to take it. Nothing else is shared but the spool directory:

* **Ownership.** A queue id made by worker *i* > 0 ends in ``-i`` (``0190f2c3d4e5a1b2c3d4e5f6-1``);
  an id without that suffix belongs to worker 0 (so a spool written with ``workers: 1``, or by
  ``smtpgw queue`` on a stopped gateway, is worker 0's). Each worker scans, delivers, retries and
  cleans up only the entries it owns (``owner = suffix % N``, so lowering N hands the entries of
  a removed worker to a remaining one). Files never change hands while two processes run.
* **One owner at a time.** Each worker holds ``<spool>/worker.<i>.lock`` (flock) while its queue
  runs; a worker that finds the lock taken (an earlier worker *i* still finishing) waits for it, so
  no two processes ever deliver the same entry.
* **Parent death.** A worker reads its stdin, a pipe from the supervisor: at end of file (the
  supervisor is gone, even by ``kill -9``) it stops listening at once and shuts down cleanly.
* **Worker death.** The supervisor restarts a worker that exits (after 1 s, backing off to 30 s
  when it keeps dying young); its entries wait on disk meanwhile.
* **Logs.** A worker logs to its stdout, which the supervisor relays into its own log, prefixed
  ``worker i:``. SIGHUP to the supervisor is passed on to every worker.
* **Control.** Worker *i* > 0 answers ``smtpgw queue`` requests on ``<control socket>.<i>``; worker 0
  answers on the control socket itself and forwards each request to the owner of the ids it names,
  or to every worker for a list, a domain or ``all``, merging the answers (:mod:`mta.workers_control`).

* **Connection limits.** A virtual server's ``max_connections`` is the gateway's total: every
  worker counts its connections in ``<spool>/worker.counts``, a file they all map, and a worker
  admits a client only while the sum over all workers is below the limit
  (:mod:`mta.worker_counts`; two workers admitting at the same instant may overshoot by at most
  N-1). A connector's outbound ``max_connections`` and ``max_connections_per_host`` are split
  instead: each worker may open ``ceil(limit / N)`` of them (at least 1, :meth:`WorkerInfo.share`),
  so the gateway's total stays within the limit rounded up to a multiple of N (4 with ``workers: 2``
  and a limit of 3; N when the limit is below N).

Still per worker: the metrics endpoint (worker 0's own figures, its ``connections_active`` too);
a diag_logging or protocol log file is appended to by every worker. ETRN/ATRN (``remote_triggered``
connectors, ODMR listeners) keep their state in one process, so such a configuration runs one
worker (``auto`` picks 1; an explicit N > 1 is a configuration error).
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="smtpgw.workers")

ENV_INDEX = "SMTPGW_WORKER"          # in a worker started by the supervisor: its index, 1..N-1
ENV_COUNT = "SMTPGW_WORKERS"         # ... and N
ENV_FDS = "SMTPGW_LISTEN_FDS"        # ... and its inherited listening sockets: "host:port:tls=fd;..."
MAX_WORKERS = 64
_TAG = re.compile(r"-(\d{1,2})$")


def owner_of(entry_id: str, count: int) -> int:
    """The worker that owns a queue id (or a spool file name made from one)."""
    if count <= 1:
        return 0
    m = _TAG.search(entry_id.split(".", 1)[0])
    return int(m.group(1)) % count if m else 0


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker this process is; ``count == 1`` is the plain single-process gateway."""

    index: int = 0
    count: int = 1
    listen_fds: dict[str, int] = field(default_factory=dict)

    @property
    def many(self) -> bool:
        return self.count > 1

    @property
    def supervisor(self) -> bool:
        return self.many and self.index == 0

    def owns(self, entry_id: str) -> bool:
        return owner_of(entry_id, self.count) == self.index

    def tag(self, entry_id: str) -> str:
        """A fresh queue id marked as this worker's."""
        return f"{entry_id}-{self.index}" if self.index else entry_id

    def share(self, limit: int | None) -> int | None:
        """This worker's part of a gateway-wide limit: ``ceil(limit / count)``, at least 1 (None: no
        limit). The workers' parts add up to the limit rounded up to a multiple of ``count``."""
        if limit is None or self.count <= 1:
            return limit
        return max(1, -(-limit // self.count))


SINGLE = WorkerInfo()


def of(gateway: Any) -> WorkerInfo:
    """The gateway's worker identity (``SINGLE`` for gateways built without one, e.g. in tests)."""
    return getattr(gateway, "worker", None) or SINGLE


_random = random.Random()      # seeded from os.urandom


def fresh_id() -> str:
    """``mta.envelope.new_id``'s form (time-sortable, 48 random bits) without its ``uuid4`` system
    call: one is made for every connection and every message."""
    return f"{int(time.time() * 1000):012x}{_random.getrandbits(48):012x}"


def queue_id(gateway: Any) -> str:
    """A new queue id owned by this worker."""
    return of(gateway).tag(fresh_id())


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def needs_single_worker(config: Any) -> str | None:
    """Why this configuration must run in one process, or None."""
    if any(getattr(c.delivery, "remote_triggered", False) for c in config.connectors):
        return "a connector is remote_triggered (ETRN/ATRN keep their state in one process)"
    if any(getattr(vs, "odmr", False) for vs in config.virtual_servers):
        return "a virtual server is an ODMR listener (ATRN keeps its state in one process)"
    return None


def resolve_count(config: Any) -> int:
    """``gateway.workers`` as a number: ``auto`` is one per CPU, or 1 where one process is needed."""
    setting = getattr(config.gateway, "workers", 1)
    if setting == "auto":
        return 1 if needs_single_worker(config) else max(1, min(cpu_count(), MAX_WORKERS))
    return int(setting)


def check_workers(config: Any) -> None:
    """Config check: an explicit ``workers: N > 1`` where one process is needed is an error."""
    from mta.config import ConfigError
    setting = getattr(config.gateway, "workers", 1)
    why = needs_single_worker(config)
    if setting != "auto" and int(setting) > 1 and why:
        raise ConfigError("gateway.workers", f"must be 1 (or auto) here: {why}")
    path = os.path.abspath(config.gateway.control_socket_path)
    if resolve_count(config) > 1 and len(os.fsencode(path)) + 3 > 107:
        raise ConfigError("gateway.control_socket", f"{path} is too long for the workers' control sockets "
                                                    f"(<path>.<i>, at most 107 bytes)")


def current(config: Any, environ: dict[str, str] | None = None) -> WorkerInfo:
    """This process's identity: from the supervisor's environment in a worker, else worker 0."""
    env = os.environ if environ is None else environ
    if ENV_INDEX in env:
        fds = {}
        for item in filter(None, env.get(ENV_FDS, "").split(";")):
            key, _, fd = item.rpartition("=")
            fds[key] = int(fd)
        return WorkerInfo(int(env[ENV_INDEX]), int(env[ENV_COUNT]), fds)
    return WorkerInfo(0, resolve_count(config))


def listen_key(listen: Any) -> str:
    return f"{listen.host or '0.0.0.0'}:{listen.port}:{int(bool(listen.tls))}"


# -- listening sockets shared by the workers ---------------------------------------------------------

class SharedEndpoint:
    """A stream server endpoint on a socket the workers share.

    In the supervisor it creates and binds the socket (in ``privilegedStartService``, so port 25
    works with ``twistd -u``) and keeps it for the workers it starts; in a worker it adopts the
    socket inherited from the supervisor. Implicit TLS wraps the factory the way ``SSL4ServerEndpoint``
    does, with the virtual server's context (so SIGHUP reaches it).
    """

    def __init__(self, reactor: Any, listen: Any, tls_context: Any, worker: WorkerInfo,
                 backlog: int = 1024, bind_wait: float = 10.0) -> None:
        self.reactor = reactor
        self.listen_address = listen
        self.tls_context = tls_context
        self.worker = worker
        self.backlog = backlog
        self.bind_wait = bind_wait
        self.key = listen_key(listen)
        self.socket: socket.socket | None = None

    def _family(self) -> int:
        host = self.listen_address.host or "0.0.0.0"
        return socket.AF_INET6 if ":" in host else socket.AF_INET

    def _bind(self) -> socket.socket:
        host = self.listen_address.host or "0.0.0.0"
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A worker of the previous run may still hold the address for a moment after its supervisor
        # was killed (it closes its copy as soon as it notices): wait for it rather than fail.
        deadline = time.monotonic() + self.bind_wait
        while True:
            try:
                sock.bind((host, self.listen_address.port))
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    sock.close()
                    raise
                time.sleep(0.2)
        sock.listen(self.backlog)
        sock.setblocking(False)
        return sock

    def listen(self, factory: Any) -> defer.Deferred:
        try:
            if self.worker.index == 0:
                self.socket = self._bind()
                fd = self.socket.fileno()
            else:
                fd = self.worker.listen_fds[self.key]
            if self.listen_address.tls:
                if self.tls_context is None:
                    raise ValueError(f"{self.key}: implicit TLS without a certificate")
                from twisted.protocols.tls import TLSMemoryBIOFactory
                factory = TLSMemoryBIOFactory(self.tls_context, False, factory)
            port = self.reactor.adoptStreamPort(fd, self._family(), factory)
            if self.worker.index != 0:
                os.close(fd)                 # adoptStreamPort keeps its own duplicate
        except Exception:
            return defer.fail()
        return defer.succeed(port)


# -- the supervisor (worker 0) -----------------------------------------------------------------------

_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\S+ ")


class _WorkerProcess:
    """One worker as the supervisor sees it: its output (relayed to the log) and its end.

    Started with ``subprocess`` rather than ``reactor.spawnProcess``: the latter left the
    supervisor's ends of other pipes open in the child, so a worker never saw its stdin close when
    the supervisor died (nor one worker when another held its pipe). ``close_fds`` passes only
    stdin, stdout/stderr and the listening sockets. The output pipe is read by the reactor; its end
    of file means the process is gone, and it is reaped then.
    """

    def __init__(self, supervisor: "WorkerSupervisor", index: int, popen: subprocess.Popen) -> None:
        self.supervisor = supervisor
        self.index = index
        self.popen = popen
        self.pid = popen.pid
        self.started = time.monotonic()
        self.ended: defer.Deferred = defer.Deferred()
        self._partial = b""
        self._done = False
        self._fd = popen.stdout.fileno()
        os.set_blocking(self._fd, False)

    # IReadDescriptor
    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return f"smtpgw-worker-{self.index}"

    def connectionLost(self, reason: Any) -> None:
        self._closed()              # the reactor reports a hang-up without a read

    def _closed(self) -> None:
        if not self._done:
            self._done = True
            self.supervisor.reactor.removeReader(self)
            self._reap()

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self._closed()
            return None
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            text = _TIMESTAMP.sub("", line.decode("utf-8", "replace").rstrip("\r"))
            if text:
                log.info("worker {index}: {line}", index=self.index, line=text)
        return None

    def signal(self, signum: int) -> None:
        if self.popen.returncode is None:
            try:
                self.popen.send_signal(signum)
            except OSError:
                pass

    def _reap(self) -> None:
        if self.popen.poll() is None:           # output closed just before the exit: look again soon
            self.supervisor.reactor.callLater(0.05, self._reap)
            return
        for f in (self.popen.stdin, self.popen.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.supervisor._ended(self, self.popen.returncode)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """Starts workers 1..N-1 (after the listeners are bound), restarts them, stops them."""

    name = "smtpgw-workers"

    def __init__(self, reactor: Any, worker: WorkerInfo, config_path: str,
                 endpoints: list[SharedEndpoint], stop_timeout: float = 40.0) -> None:
        self.reactor = reactor
        self.worker = worker
        self.config_path = os.path.abspath(config_path)
        self.endpoints = endpoints
        self.stop_timeout = stop_timeout
        self.processes: dict[int, _WorkerProcess] = {}
        self._delays: dict[int, float] = {}
        self._timers: dict[int, Any] = {}

    def argv(self) -> list[str]:
        """A worker is the same twistd, in the foreground, logging to stdout (relayed here)."""
        return [sys.executable, "-c",
                "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-", "smtpgw", "-c", self.config_path]

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.worker.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if not self.running:
            return
        fds = {e.key: e.socket.fileno() for e in self.endpoints if e.socket is not None}
        env = dict(os.environ)
        env.update({ENV_INDEX: str(index), ENV_COUNT: str(self.worker.count),
                    ENV_FDS: ";".join(f"{key}={fd}" for key, fd in fds.items())})
        try:
            popen = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), close_fds=True,
                                     pass_fds=tuple(fds.values()))
        except Exception:
            log.failure("worker {index}: cannot start", index=index)
            self._restart_later(index, young=True)
            return
        process = self.processes[index] = _WorkerProcess(self, index, popen)
        self.reactor.addReader(process)
        log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def _ended(self, process: _WorkerProcess, returncode: int) -> None:
        index = process.index
        if self.processes.get(index) is not process:
            return
        del self.processes[index]
        if not self.running:
            return
        young = time.monotonic() - process.started < 10
        why = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        log.error("worker {index} (pid {pid}) ended ({why}); restarting it", index=index, pid=process.pid,
                  why=why)
        self._restart_later(index, young)

    def _restart_later(self, index: int, young: bool) -> None:
        delay = min(self._delays.get(index, 0.5) * 2, 30.0) if young else 1.0
        self._delays[index] = delay
        self._timers[index] = self.reactor.callLater(delay, self._spawn, index)

    def reload(self, reactor: Any = None) -> None:
        """SIGHUP: pass it on (``ReloadService`` target)."""
        for process in list(self.processes.values()):
            process.signal(signal.SIGHUP)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        ending = [p.ended for p in self.processes.values()]
        for process in list(self.processes.values()):
            process.signal(signal.SIGTERM)
        if not ending:
            return defer.succeed(None)
        done = defer.DeferredList(ending, consumeErrors=True)
        timer = self.reactor.callLater(self.stop_timeout, self._kill_all)
        return done.addBoth(lambda _: timer.active() and timer.cancel())

    def _kill_all(self) -> None:
        for index, process in list(self.processes.items()):
            log.warn("worker {index} did not stop in time; killing it", index=index)
            process.signal(signal.SIGKILL)


# -- in a worker: the supervisor's end ---------------------------------------------------------------

class _ParentPipe:
    """Reads the supervisor's pipe (our stdin); end of file means the supervisor is gone."""

    def __init__(self, on_eof: Any) -> None:
        self.on_eof = on_eof

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            data = b""
        if not data:
            return self.on_eof()
        return None

    def connectionLost(self, reason: Any) -> None:
        self.on_eof()               # the reactor reports a hang-up without a read


class ParentWatch(service.Service):
    """In worker i > 0: when the supervisor dies, stop (listeners first) so that the next run can
    take over; the ``worker.<i>.lock`` keeps a new worker i waiting until this one has finished."""

    name = "smtpgw-parent-watch"

    def __init__(self, reactor: Any, index: int) -> None:
        self.reactor = reactor
        self.index = index
        self._reader: _ParentPipe | None = None
        self._gone = False

    def startService(self) -> None:
        super().startService()
        self._reader = _ParentPipe(self._parent_gone)
        self.reactor.addReader(self._reader)

    def stopService(self) -> Any:
        super().stopService()
        if self._reader is not None and not self._gone:
            self.reactor.removeReader(self._reader)
        self._reader = None

    def _parent_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        log.warn("worker {index}: the supervisor is gone; stopping", index=self.index)
        self.reactor.removeReader(self._reader)
        # nobody reads our log any more: writing to the dead pipe must not break the shutdown
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            pass
        self.reactor.callLater(0, self.reactor.stop)


# -- one owner per share of the spool ----------------------------------------------------------------

class OwnerLock:
    """``<spool>/worker.<i>.lock``, held while worker i's queue runs (released by the kernel when the
    process ends, however it ends). Waits, polling, while an earlier worker i still holds it."""

    def __init__(self, spool_dir: str, index: int, reactor: Any, poll: float = 0.5) -> None:
        self.path = os.path.join(os.path.abspath(spool_dir), f"worker.{index}.lock")
        self.index = index
        self.reactor = reactor
        self.poll = poll
        self._fd: int | None = None
        self._waiting: Any = None
        self._told = False

    def acquire(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._try(d)
        return d

    def _try(self, d: defer.Deferred) -> None:
        self._waiting = None
        try:
            if self._fd is None:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self._told:
                self._told = True
                log.warn("worker {index}: {path} is held (an earlier worker {index} is finishing); "
                         "waiting for it", index=self.index, path=self.path)
            self._waiting = self.reactor.callLater(self.poll, self._try, d)
            return
        except OSError:
            d.errback()
            return
        d.callback(None)

    def release(self) -> None:
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
