"""Where diagnostic lines go, and how they look.

``text`` is one line an administrator can grep (``... [smtp_protocol/maximum] command session=ID
line=MAIL FROM:<a@b.test>``, fields in the order the emitter gave, the session or message id first);
``json`` is one object per line for log shippers (``time``, ``category``, ``level``, ``message``, then
the fields). Lines are formatted when the event happens and written later, in batches, in a thread
(:mod:`mta.io.linebuffer`), except for the daemon's own log, which Twisted already handles.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.io.linebuffer import LineBuffer
from mta.maillog.lines import iso_time, one_line

log = Logger(namespace="smtpgw.diag")

ID_FIELDS = ("session", "id")        # shown first: how one transaction is followed through the log
RESERVED = ("time", "category", "level", "message")


def ordered(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    first = [(k, fields[k]) for k in ID_FIELDS if k in fields]
    return first + [(k, v) for k, v in fields.items() if k not in ID_FIELDS]


def format_text(category: str, level: str, message: str, fields: dict[str, Any]) -> str:
    detail = " ".join(f"{k}={one_line(v)}" for k, v in ordered(fields))
    return f"[{category}/{level}] {message} {detail}" if detail else f"[{category}/{level}] {message}"


def format_json(when: float, category: str, level: str, message: str, fields: dict[str, Any]) -> str:
    record: dict[str, Any] = {"time": iso_time(when), "category": category, "level": level, "message": message}
    for k, v in ordered(fields):
        record[k + "_" if k in RESERVED else k] = v
    return json.dumps(record, default=str, ensure_ascii=False)


class Sink:
    """Formats a record and writes it; ``close()`` writes what is still buffered."""

    timestamps = True               # the daemon's log and syslog stamp lines themselves

    def __init__(self, fmt: str) -> None:
        self.format = fmt

    def line(self, when: float, category: str, level: str, message: str, fields: dict[str, Any]) -> str:
        if self.format == "json":
            return format_json(when, category, level, message, fields)
        text = format_text(category, level, message, fields)
        return f"{iso_time(when)} {text}" if self.timestamps else text

    def emit(self, when: float, category: str, level: str, message: str, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> defer.Deferred:
        return defer.succeed(None)


class TwistdLogSink(Sink):
    """The daemon's own log (twistd ``--logfile``): the default, nothing else to set up."""

    timestamps = False

    def emit(self, when: float, category: str, level: str, message: str, fields: dict[str, Any]) -> None:
        log.info("{line}", line=self.line(when, category, level, message, fields))


class _Buffered(Sink):
    def __init__(self, fmt: str, reactor: Any, name: str) -> None:
        super().__init__(fmt)
        self.buffer: LineBuffer[tuple[str, str]] = LineBuffer(reactor, self.write, name)

    def emit(self, when: float, category: str, level: str, message: str, fields: dict[str, Any]) -> None:
        self.buffer.add((level, self.line(when, category, level, message, fields)))

    def write(self, batch: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    def flush(self) -> defer.Deferred:
        return self.buffer.flush()

    def close(self) -> defer.Deferred:
        return self.buffer.close()


class FileSink(_Buffered):
    def __init__(self, fmt: str, reactor: Any, path: str) -> None:
        super().__init__(fmt, reactor, f"diagnostic log {path}")
        self.path = path

    def write(self, batch: list[tuple[str, str]]) -> None:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for _, line in batch))


class StdoutSink(_Buffered):
    """The process's real standard output (twistd redirects ``sys.stdout`` into its log)."""

    def __init__(self, fmt: str, reactor: Any, stream: Any = None) -> None:
        super().__init__(fmt, reactor, "diagnostic log on stdout")
        self.stream = stream

    def write(self, batch: list[tuple[str, str]]) -> None:
        stream = self.stream or sys.__stdout__
        if stream is None:
            return
        stream.write("".join(line + "\n" for _, line in batch))
        stream.flush()


class SyslogSink(_Buffered):
    """The local syslog daemon, through its socket (``/dev/log``, or ``path``): facility mail, ident
    ``smtpgw``; minimum is notice, medium info, maximum debug.

    Written to the socket directly rather than with the ``syslog`` module, which drops lines in
    silence when there is no syslog daemon (a container without ``/dev/log``): here the daemon's log
    says once that diagnostic lines are being dropped and why, and once when they go through again.
    """

    timestamps = False
    FACILITY_MAIL = 2
    PRIORITY = {"minimum": 5, "medium": 6, "maximum": 7}       # notice, info, debug

    def __init__(self, fmt: str, reactor: Any, address: str = "/dev/log") -> None:
        super().__init__(fmt, reactor, f"diagnostic log to syslog ({address})")
        self.reactor = reactor
        self.address = address
        self.failing: str | None = None         # why writing fails, while it does
        self._sock: socket.socket | None = None

    def write(self, batch: list[tuple[str, str]]) -> None:
        prefix = f"smtpgw[{os.getpid()}]: "
        try:
            sock = self._sock or self._connect()
            for level, line in batch:
                priority = self.FACILITY_MAIL * 8 + self.PRIORITY.get(level, 6)
                data = f"<{priority}>{prefix}{line}".encode("utf-8", "replace")
                sock.sendall(data + b"\n" if sock.type == socket.SOCK_STREAM else data)
        except OSError as e:
            self._disconnect()
            if self.failing is None:
                self.failing = e.strerror or str(e)
                self._tell(log.error, "diag_logging: cannot write to syslog at {address} ({why}); diagnostic "
                           "lines are dropped until it can", address=self.address, why=self.failing)
            return
        if self.failing is not None:
            self.failing = None
            self._tell(log.info, "diag_logging: writing to syslog at {address} again", address=self.address)

    def _connect(self) -> socket.socket:
        last: OSError | None = None
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):       # as logging.handlers.SysLogHandler
            sock = socket.socket(socket.AF_UNIX, kind)
            try:
                sock.connect(self.address)
            except OSError as e:
                sock.close()
                last = e
                continue
            self._sock = sock
            return sock
        raise last if last is not None else OSError("no socket")

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _tell(self, emit: Any, text: str, **fields: Any) -> None:
        """Log from the writer thread through the reactor thread."""
        if threading.current_thread() is threading.main_thread():
            emit(text, **fields)
        else:
            self.reactor.callFromThread(emit, text, **fields)

    def close(self) -> defer.Deferred:
        d = super().close()
        return d.addBoth(lambda result: (self._disconnect(), result)[1])


def make_sink(settings: dict[str, Any], reactor: Any) -> Sink:
    """The sink ``plugins.diag_logging`` asks for (already validated by the config loader)."""
    target, fmt = settings.get("target") or "log", settings.get("format") or "text"
    if target == "file":
        return FileSink(fmt, reactor, settings.get("path") or "var/log/smtpgw-diag.log")
    if target == "stdout":
        return StdoutSink(fmt, reactor)
    if target == "syslog":
        return SyslogSink(fmt, reactor, settings.get("path") or "/dev/log")
    return TwistdLogSink(fmt)
