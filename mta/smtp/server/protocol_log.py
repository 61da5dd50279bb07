"""SMTP protocol logs in the W3C Extended Log File Format, one set of files per virtual server, as the
Exchange/IIS SMTP virtual server writes them ("Enable logging", "W3C Extended Log File Format").

One line per client command, with the reply that settled it: ``MAIL - +FROM:<a@b.test> 250 0 ...``.
A command answered in steps (DATA then the message, AUTH then its SASL lines) is one line carrying the
final reply, the bytes of every step and the time from the command to that reply. AUTH arguments are
masked; the SASL lines themselves are never logged.

Files are under ``<directory>/SMTPSVC<n>/`` (n: the virtual server's position in the configuration,
from 1), named and rolled over as IIS does (:mod:`mta.io.w3c`).

The session only formats a line and appends it to a buffer (:mod:`mta.io.linebuffer`); files are opened,
rolled over and written in a thread.
"""
from __future__ import annotations

from typing import Any

from mta.io.w3c import ProtocolLogService, W3CFiles, W3CLog, period_file_name, software, w3c_value

__all__ = ["ProtocolLog", "ProtocolLogService", "RejectedCommands", "W3CFiles", "counted", "field_row",
           "period_file_name", "site_name",
           "w3c_value"]


def site_name(config: Any, vs: Any) -> str:
    """IIS's instance name, ``SMTPSVC<n>``: the log folder and the ``s-sitename`` field."""
    names = [v.name for v in config.virtual_servers]
    return f"SMTPSVC{names.index(vs.name) + 1 if vs.name in names else 1}"


def field_row(date: str, clock: str, session: Any, site: str, computer: str, verb: str, query: str,
              status: Any, bytes_out: int, bytes_in: int, ms: int) -> tuple:
    """Every field's value, in :data:`PROTOCOL_LOG_FIELDS` order; a log picks the ones it writes."""
    return (date, clock, session.peer_host,
            session.authenticated_user or session.helo,          # cs-username: IIS writes the HELO name
            site, computer, session.local_host, session.local_port,
            verb, None, query,                                    # cs-method, cs-uri-stem, cs-uri-query
            status, 0, bytes_out, bytes_in, ms,                   # sc-status .. time-taken
            "SMTP", session.helo)                                 # cs-version, cs-host


class RejectedCommands:
    """One session's rejected commands, thinned out for the protocol log: at most one line per kind
    (verb and reply code) per second, so a client sending junk cannot turn each byte it sends into
    a hundred bytes of log. The line written when a second has passed stands for the ones left out
    before it as well, and says how many with a ``[xN]`` suffix; what is still left out when the
    session ends is written then as one line."""

    __slots__ = ("_kinds",)
    MAX_KINDS = 32          # unknown verbs share one kind, so this is only a backstop

    def __init__(self) -> None:
        # kind -> [time of the last line written, commands left out since, the last one left out]
        self._kinds: dict[tuple[str, int], list[Any]] = {}

    def admit(self, kind: tuple[str, int], now: float, command: Any) -> int:
        """How many commands a line for ``command`` stands for; 0: leave it out (it is counted)."""
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= self.MAX_KINDS:
                kind = ("*", kind[1])
                state = self._kinds.get(kind)
            if state is None:
                self._kinds[kind] = [now, 0, None]
                return 1
        if now - state[0] >= 1.0:
            count = state[1] + 1
            state[:] = [now, 0, None]
            return count
        state[1] += 1
        state[2] = command
        return 0

    def left_out(self) -> list[tuple[Any, int]]:
        """``(last command left out, how many)`` for each kind with some still unwritten; forgets them."""
        out = [(state[2], state[1]) for state in self._kinds.values() if state[1]]
        self._kinds.clear()
        return out


def counted(line: str, count: int) -> str:
    """A command line standing for ``count`` rejected commands of its kind."""
    return line if count == 1 else f"{line} [x{count}]"


class ProtocolLog(W3CLog):
    """The protocol log of one virtual server."""

    @classmethod
    def for_virtual_server(cls, gateway: Any, vs: Any) -> "ProtocolLog":
        return cls(vs.protocol_log, site_name(gateway.config, vs), gateway.config.gateway.hostname,
                   gateway.reactor, software=software())

    def command(self, session: Any, verb: str, line: str, reply: Any, bytes_in: int, bytes_out: int,
                time_taken: float) -> None:
        """Log one command. ``line`` is the command line as it may be shown (AUTH masked); the text
        after the verb becomes ``cs-uri-query`` with its leading space, as IIS writes it (``+FROM:<>``)."""
        now = self.reactor.seconds()
        date, clock = self.stamp.at(now)
        self.write_row(now, field_row(date, clock, session, self.site, self.computer, verb, line[len(verb):],
                                      getattr(reply, "code", reply), bytes_out, bytes_in, int(time_taken * 1000)))
