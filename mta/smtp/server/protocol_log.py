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

__all__ = ["ProtocolLog", "ProtocolLogService", "W3CFiles", "field_row", "period_file_name", "site_name",
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
