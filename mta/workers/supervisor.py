"""Worker 0 as supervisor: starts workers 1..N-1, restarts them, relays their logs; and a worker's
watch on its parent (end of file on stdin means the supervisor is gone).
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mta.io import rendered_log
from mta.workers.endpoint import PreboundEndpoint
from mta.workers.identity import ENV_COUNT, ENV_FDS, ENV_INDEX, WorkerInfo


log = Logger(namespace="smtpgw.workers")


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\S+ ")
MAIL_LOG_MARK = "[smtpgw.mail#"      # a worker's mail log line: relayed in a batch, as it was written


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
                rendered_log.emit(log, f"worker {self.index}: {text}", batched=MAIL_LOG_MARK in text,
                                  index=self.index, line=text)
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
                 endpoints: list[PreboundEndpoint], stop_timeout: float = 40.0) -> None:
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
