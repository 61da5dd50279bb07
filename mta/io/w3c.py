"""The W3C Extended Log File Format as IIS/Exchange write their SMTP protocol logs: the files (named
and rolled over by time or size, each opened by its directives), one line's fields, and a log that
formats lines on the reactor thread and writes them in a thread (:mod:`mta.io.linebuffer`).

Used for the inbound log of each virtual server (:mod:`mta.smtp.server.protocol_log`) and the outbound
one of each connector (:mod:`mta.smtp.client.protocol_log`): the same files, fields and keys.

Files follow IIS's naming under ``<directory>/<site>/``: ``exYYMMDDHH.log`` hourly, ``exYYMMDD.log``
daily, ``exYYMMWW.log`` weekly (WW: week of the month, weeks starting on Sunday), ``exYYMM.log``
monthly, ``extend1.log`` unlimited, and ``extend<N>.log`` when the period is a size (a new N once a
file would grow past it). ``local_time`` names and rolls files by local time; the entries' date and
time are always UTC, as W3C and the log analyzers expect. Each file starts with ``#Software``,
``#Version``, ``#Date`` and ``#Fields``, and the directives are written again whenever the process
starts appending to an existing file.
"""
from __future__ import annotations

import calendar
import os
import re
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer

from mta.config import PROTOCOL_LOG_FIELDS, ProtocolLogConfig
from mta.io.linebuffer import LineBuffer

SOFTWARE = "smtpgw"
TIME_PERIODS = ("hourly", "daily", "weekly", "monthly")
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


def w3c_value(value: Any) -> str:
    """One field: ``-`` when empty, whitespace as ``+`` (so fields stay space-separated), other
    control characters as ``%XX``."""
    if value is None:
        return "-"
    text = value if type(value) is str else str(value)
    if not text:
        return "-"
    if " " not in text and text.isprintable():
        return text
    return _UNSAFE.sub(lambda m: "+" if m.group() in " \t" else f"%{ord(m.group()):02X}", text)


def software() -> str:
    try:
        from importlib.metadata import version
        return f"{SOFTWARE} {version('smtpgw')}"
    except Exception:
        return SOFTWARE


class Stamp:
    """``yyyy-mm-dd`` and ``hh:mm:ss`` (UTC) for a time, worked out once per second."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.date = self.time = ""

    def at(self, when: float) -> tuple[str, str]:
        second = int(when)
        if second != self.second:
            t = time.gmtime(second)
            self.second = second
            self.date = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            self.time = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        return self.date, self.time


def period_file_name(period: str, when: float, local_time: bool) -> str:
    """The file a line written at ``when`` belongs to, for a time period (IIS names)."""
    t = time.localtime(when) if local_time else time.gmtime(when)
    yymm = f"{t.tm_year % 100:02d}{t.tm_mon:02d}"
    if period == "hourly":
        return f"ex{yymm}{t.tm_mday:02d}{t.tm_hour:02d}.log"
    if period == "daily":
        return f"ex{yymm}{t.tm_mday:02d}.log"
    if period == "weekly":
        first = (calendar.weekday(t.tm_year, t.tm_mon, 1) + 1) % 7    # 0 = Sunday
        return f"ex{yymm}{(t.tm_mday - 1 + first) // 7 + 1:02d}.log"
    if period == "monthly":
        return f"ex{yymm}.log"
    raise ValueError(f"not a time period: {period!r}")


class W3CFiles:
    """Appends lines to the right file, rolling over by time or size. Runs in the writer thread only."""

    def __init__(self, folder: str, period: str | int, local_time: bool, fields: tuple[str, ...],
                 software: str = SOFTWARE) -> None:
        self.folder = folder
        self.period = period
        self.local_time = local_time
        self.fields_line = "#Fields: " + " ".join(fields) + "\n"
        self.software = software
        self._started: set[str] = set()     # files this process has written directives to
        self._size_index: int | None = None
        self._size_used = 0

    def header(self, when: float) -> str:
        t = time.gmtime(when)
        return (f"#Software: {self.software}\n#Version: 1.0\n"
                f"#Date: {t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d} "
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}\n{self.fields_line}")

    def write(self, batch: list[tuple[float, str]]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if isinstance(self.period, int):
            self._write_by_size(batch)
            return
        groups: dict[str, tuple[float, list[str]]] = {}
        for when, line in batch:
            name = "extend1.log" if self.period == "unlimited" else \
                period_file_name(self.period, when, self.local_time)
            groups.setdefault(name, (when, []))[1].append(line)
        for name, (first, lines) in groups.items():
            path = os.path.join(self.folder, name)
            # directives open every file, and again when this process first appends to one (or when
            # someone moved the file away meanwhile)
            head = name not in self._started or not os.path.exists(path)
            with open(path, "a", encoding="utf-8", newline="") as f:
                f.write(self.header(first) + "".join(lines) if head else "".join(lines))
            self._started.add(name)

    def _write_by_size(self, batch: list[tuple[float, str]]) -> None:
        limit = int(self.period)
        if self._size_index is None:
            self._size_index = self._last_size_index()
            self._size_used = self._current_size()
        out: list[str] = []
        for when, line in batch:
            name = self._size_name()
            new_file = name not in self._started
            cost = len(line.encode("utf-8")) + (len(self.header(when)) if new_file else 0)
            if self._size_used and self._size_used + cost > limit:
                self._flush_size(out)
                self._size_index += 1
                self._size_used = 0
                name, new_file = self._size_name(), True
            if new_file:
                head = self.header(when)
                out.append(head)
                self._size_used += len(head)
                self._started.add(name)
            out.append(line)
            self._size_used += len(line.encode("utf-8"))
        self._flush_size(out)

    def _size_name(self) -> str:
        return f"extend{self._size_index}.log"

    def _flush_size(self, out: list[str]) -> None:
        if out:
            with open(os.path.join(self.folder, self._size_name()), "a", encoding="utf-8", newline="") as f:
                f.write("".join(out))
            out.clear()

    def _last_size_index(self) -> int:
        found = [int(m.group(1)) for m in (re.fullmatch(r"extend(\d+)\.log", n) for n in os.listdir(self.folder))
                 if m]
        return max(found, default=1)

    def _current_size(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.folder, self._size_name()))
        except OSError:
            return 0


class W3CLog:
    """One set of W3C files (a virtual server's, a connector's): rows in :data:`PROTOCOL_LOG_FIELDS`
    order in, the configured fields written out, within ``delay`` seconds."""

    def __init__(self, config: ProtocolLogConfig, site: str, computer: str, reactor: Any,
                 software: str = SOFTWARE, delay: float = 0.5) -> None:
        self.config = config
        self.site = site
        self.computer = computer
        self.reactor = reactor
        self.folder = os.path.join(config.directory, site)
        self.files = W3CFiles(self.folder, config.period, config.local_time, tuple(config.fields), software)
        self._picks = [PROTOCOL_LOG_FIELDS.index(name) for name in config.fields]
        self.stamp = Stamp()
        self.buffer: LineBuffer[tuple[float, str]] = LineBuffer(reactor, self.files.write,
                                                                f"protocol log {self.folder}", delay=delay)

    def write_row(self, now: float, row: tuple) -> None:
        """Queue one line: ``row`` holds every field's value in :data:`PROTOCOL_LOG_FIELDS` order."""
        text = " ".join([w3c_value(row[i]) for i in self._picks])
        if text[0] == "#":                  # never mistaken for a directive
            text = "%23" + text[1:]
        self.buffer.add((now, text + "\n"))

    def flush(self) -> defer.Deferred:
        return self.buffer.flush()

    def close(self) -> defer.Deferred:
        return self.buffer.close()


class ProtocolLogService(service.Service):
    """Writes a protocol log's last lines when twistd stops (before the reactor and thread pool go)."""

    def __init__(self, protocol_log: W3CLog) -> None:
        self.protocol_log = protocol_log
        self.name = f"protocol log {protocol_log.site}"

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.protocol_log.close()
