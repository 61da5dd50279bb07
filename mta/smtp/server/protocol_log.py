"""SMTP protocol logs in the W3C Extended Log File Format, one set of files per virtual server, as the
Exchange/IIS SMTP virtual server writes them ("Enable logging", "W3C Extended Log File Format").

One line per client command, with the reply that settled it: ``MAIL - +FROM:<a@b.test> 250 0 ...``.
A command answered in steps (DATA then the message, AUTH then its SASL lines) is one line carrying the
final reply, the bytes of every step and the time from the command to that reply. AUTH arguments are
masked; the SASL lines themselves are never logged.

Files follow IIS's naming under ``<directory>/SMTPSVC<n>/`` (n: the virtual server's position in the
configuration, from 1): ``exYYMMDDHH.log`` hourly, ``exYYMMDD.log`` daily, ``exYYMMWW.log`` weekly (WW:
week of the month, weeks starting on Sunday), ``exYYMM.log`` monthly, ``extend1.log`` unlimited, and
``extend<N>.log`` when the period is a size (a new N once a file would grow past it). ``local_time``
names and rolls files by local time; the entries' date and time are always UTC, as W3C and the log
analyzers expect. Each file starts with ``#Software``, ``#Version``, ``#Date`` and ``#Fields``, and the
directives are written again whenever the process starts appending to an existing file.

The session only formats a line and appends it to a buffer (:mod:`mta.io.linebuffer`); files are opened,
rolled over and written in a thread.
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


def site_name(config: Any, vs: Any) -> str:
    """IIS's instance name, ``SMTPSVC<n>``: the log folder and the ``s-sitename`` field."""
    names = [v.name for v in config.virtual_servers]
    return f"SMTPSVC{names.index(vs.name) + 1 if vs.name in names else 1}"


def _software() -> str:
    try:
        from importlib.metadata import version
        return f"{SOFTWARE} {version('smtpgw')}"
    except Exception:
        return SOFTWARE


class _Stamp:
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


def field_row(date: str, clock: str, session: Any, site: str, computer: str, verb: str, query: str,
              status: Any, bytes_out: int, bytes_in: int, ms: int) -> tuple:
    """Every field's value, in :data:`PROTOCOL_LOG_FIELDS` order; a log picks the ones it writes."""
    return (date, clock, session.peer_host,
            session.authenticated_user or session.helo,          # cs-username: IIS writes the HELO name
            site, computer, session.local_host, session.local_port,
            verb, None, query,                                    # cs-method, cs-uri-stem, cs-uri-query
            status, 0, bytes_out, bytes_in, ms,                   # sc-status .. time-taken
            "SMTP", session.helo)                                 # cs-version, cs-host


class ProtocolLog:
    """The protocol log of one virtual server."""

    def __init__(self, config: ProtocolLogConfig, site: str, computer: str, reactor: Any,
                 software: str = SOFTWARE, delay: float = 0.5) -> None:
        self.config = config
        self.site = site
        self.computer = computer
        self.reactor = reactor
        self.folder = os.path.join(config.directory, site)
        self.files = W3CFiles(self.folder, config.period, config.local_time, tuple(config.fields), software)
        self._picks = [PROTOCOL_LOG_FIELDS.index(name) for name in config.fields]
        self._stamp = _Stamp()
        self.buffer: LineBuffer[tuple[float, str]] = LineBuffer(reactor, self.files.write,
                                                                f"protocol log {self.folder}", delay=delay)

    @classmethod
    def for_virtual_server(cls, gateway: Any, vs: Any) -> "ProtocolLog":
        return cls(vs.protocol_log, site_name(gateway.config, vs), gateway.config.gateway.hostname,
                   gateway.reactor, software=_software())

    def command(self, session: Any, verb: str, line: str, reply: Any, bytes_in: int, bytes_out: int,
                time_taken: float) -> None:
        """Log one command. ``line`` is the command line as it may be shown (AUTH masked); the text
        after the verb becomes ``cs-uri-query`` with its leading space, as IIS writes it (``+FROM:<>``)."""
        now = self.reactor.seconds()
        date, clock = self._stamp.at(now)
        row = field_row(date, clock, session, self.site, self.computer, verb, line[len(verb):],
                        getattr(reply, "code", reply), bytes_out, bytes_in, int(time_taken * 1000))
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

    def __init__(self, protocol_log: ProtocolLog) -> None:
        self.protocol_log = protocol_log
        self.name = f"protocol log {protocol_log.site}"

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.protocol_log.close()
