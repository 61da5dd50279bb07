"""A clean stop (SIGTERM, SIGINT, or the supervisor gone), as Postfix's ``postfix stop`` gives one.

In order: the listeners stop accepting (twistd stops them first); every open SMTP session gets
``421 4.3.2 Service shutting down`` and is closed -- a session whose message is being written to the
spool (or whose hook is still answering) gets its reply first, so a message that was on its way to
the disk is finished and acknowledged, not lost nor half-told; only then do the queue (deliveries in
flight finish) and the spool writer (it completes every write it was sent) stop. One line says so.

A second stop signal while this runs is noted in one line; twistd's own handler would call
``reactor.stop()`` again and log a ReactorNotRunning traceback.
"""
from __future__ import annotations

import signal
from typing import Any, Iterable

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="smtpgw")

SESSION_GRACE = 10.0         # seconds an open session may take to finish its reply before it is cut


async def close_sessions(factories: Iterable[Any], reactor: Any, grace: float = SESSION_GRACE) -> tuple[int, int]:
    """Tell every open session of ``factories`` (``SMTPServerFactory``) 421 and wait until they are
    closed, at most ``grace`` seconds (then they are cut). Returns (told, cut)."""
    sessions = [p for f in factories for p in list(f.sessions)]
    for protocol in sessions:
        protocol.shut_down()
    done: defer.Deferred = defer.Deferred()

    def check(deadline: float) -> None:
        open_now = [p for f in factories for p in f.sessions]
        if not open_now:
            done.callback(0)
        elif reactor.seconds() >= deadline:
            for protocol in open_now:
                protocol.transport.abortConnection()
            done.callback(len(open_now))
        else:
            reactor.callLater(0.05, check, deadline)

    check(reactor.seconds() + grace)
    cut = await done
    return len(sessions), cut


class StopSignals:
    """After the reactor has installed its handlers: a SIGTERM or SIGINT that arrives while the
    gateway is already stopping is logged once instead of stopping the reactor twice."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stopping = False
        self._told = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Call once the reactor runs (``callWhenRunning``)."""
        self.reactor.addSystemEventTrigger("before", "shutdown", self._now_stopping)
        for number in self.SIGNALS:
            previous = signal.getsignal(number)
            if callable(previous):
                self._previous[number] = previous
                signal.signal(number, self._handle)

    def _now_stopping(self) -> None:
        self.stopping = True

    def _handle(self, number: int, frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            self._previous[number](number, frame)
        elif not self._told:
            self._told = True
            self.reactor.callFromThread(log.info, "{signal} received while stopping; already stopping",
                                        signal=signal.Signals(number).name)
