"""SIGHUP: re-read what can change without a restart, the way administrators run ``postfix reload``:
every virtual server's TLS certificate and key, and the configuration file for what plugins apply live
(relay settings and connector restrictions, diag_logging levels; :mod:`mta.app.reload_config`). With
``gateway.workers`` > 1 the supervisor is one more target and passes the signal on to every worker.

twistd leaves SIGHUP alone (its default would end the process), so this service installs a handler
while it runs and puts the previous one back when it stops; a previous Python-level handler is still
called. The handler itself only schedules the work on the reactor (``callFromThread`` is safe from a
signal handler); the files are read in a thread.
"""
from __future__ import annotations

import signal
from typing import Any, Iterable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="smtpgw.reload")


class ReloadService(service.Service):
    """Calls ``target.reload(reactor)`` on each target when the process gets SIGHUP."""

    name = "smtpgw-reload"

    def __init__(self, reactor: Any, targets: Iterable[Any]) -> None:
        self.reactor = reactor
        self.targets = list(targets)
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        if not hasattr(signal, "SIGHUP"):
            return
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)
        self._installed = True

    def stopService(self) -> Any:
        super().stopService()
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)
        if callable(self._previous):
            self._previous(signum, frame)

    def reload(self) -> defer.Deferred:
        """Reload every target; fires when all are done (each logs its own problems)."""
        log.info("SIGHUP: reloading ({count} target(s): TLS certificates, the configuration file, workers)",
                 count=len(self.targets))
        return defer.DeferredList([defer.maybeDeferred(t.reload, self.reactor) for t in self.targets],
                                  consumeErrors=True)
