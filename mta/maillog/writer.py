"""Writes mail log lines through ``twisted.logger``: namespace ``smtpgw.mail``, level info, to the
daemon's log (twistd ``--logfile`` or ``--syslog``), with the line in the event for other observers
(``mail_event``: its kind; ``mail_line``: the :class:`~mta.maillog.lines.MailLine`, whose
``record(time)`` gives its fields). Text by default; JSON objects when asked for
(``plugins.diag_logging.format: json`` sets it through the gateway's ``mail_log``).

Nothing here depends on a plugin being enabled: these are the gateway's own log lines.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from twisted.logger import Logger

from mta.io import rendered_log
from mta.maillog.lines import MailLine

log = Logger(namespace="smtpgw.mail")

FORMATS = ("text", "json")


class MailLog:
    """The gateway's mail log; ``format`` is ``text`` (Postfix's lines) or ``json``."""

    def __init__(self, reactor: Any = None, fmt: str = "text") -> None:
        self.reactor = reactor
        self.format = fmt
        # called with (line, time) for every line written: the queue's per-message trace (mta.ops.trace)
        self.observers: list[Callable[[MailLine, float], None]] = []

    def set_format(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"mail log format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.format = fmt

    def now(self) -> float:
        seconds = getattr(self.reactor, "seconds", None)
        return seconds() if seconds is not None else time.time()

    def write(self, line: MailLine) -> None:
        """One event per line, rendered once here (:mod:`mta.io.rendered_log`): a few lines per
        message are on the hot path, and twisted.logger's own formatting cost more than the line."""
        text = line.json(self.now()) if self.format == "json" else line.text()
        rendered_log.emit(log, text, batched=True, mail_event=line.event, mail_line=line)
        if self.observers:
            when = self.now()
            for observer in self.observers:
                observer(line, when)


def of(gateway: Any) -> MailLog:
    """The gateway's mail log (``Gateway.mail_log``)."""
    return gateway.mail_log
