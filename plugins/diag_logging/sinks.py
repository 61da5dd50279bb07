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
import sys
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
    """The local syslog, facility mail, ident ``smtpgw``; minimum is notice, medium info, maximum debug."""

    timestamps = False

    def __init__(self, fmt: str, reactor: Any, syslog_module: Any = None) -> None:
        super().__init__(fmt, reactor, "diagnostic log to syslog")
        if syslog_module is None:
            import syslog as syslog_module
        self.syslog = syslog_module
        self.syslog.openlog("smtpgw", self.syslog.LOG_PID, self.syslog.LOG_MAIL)
        self.priority = {"minimum": self.syslog.LOG_NOTICE, "medium": self.syslog.LOG_INFO,
                         "maximum": self.syslog.LOG_DEBUG}

    def write(self, batch: list[tuple[str, str]]) -> None:
        for level, line in batch:
            self.syslog.syslog(self.priority.get(level, self.syslog.LOG_INFO), line)


def make_sink(settings: dict[str, Any], reactor: Any) -> Sink:
    """The sink ``plugins.diag_logging`` asks for (already validated by the config loader)."""
    target, fmt = settings.get("target") or "log", settings.get("format") or "text"
    if target == "file":
        return FileSink(fmt, reactor, settings.get("path") or "var/log/smtpgw-diag.log")
    if target == "stdout":
        return StdoutSink(fmt, reactor)
    if target == "syslog":
        return SyslogSink(fmt, reactor)
    return TwistdLogSink(fmt)
