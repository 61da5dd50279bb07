"""SIGHUP, the configuration part: read the file again and hand it to plugins (``smtpgw_reload``).

Registered as one more target of :class:`mta.app.reload.ReloadService`, so one SIGHUP re-reads both the
TLS certificates and the file. Only what plugins can apply live changes (relay_acl: each virtual
server's ``relay`` and each connector's content/delivery restrictions, for new connections;
diag_logging: its levels); listeners, spool, local domains and routing keep what was loaded at start.
A file that no longer parses or validates is logged with the key at fault and changes nothing: the
plugins are told only about a whole, valid file.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.config import Config, ConfigError, load_config

log = Logger(namespace="smtpgw.reload")


class ConfigReload:
    """A ``ReloadService`` target: ``reload(reactor)`` re-reads ``gateway.config.path`` in a thread."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def reload(self, reactor: Any) -> defer.Deferred:
        path = self.gateway.config.path
        if not path:
            return defer.succeed(None)
        d = deferToThreadPool(reactor, reactor.getThreadPool(), load_config, path)
        return d.addCallbacks(self.apply, self._failed, errbackArgs=(path,))

    def apply(self, config: Config) -> Config:
        """Tell the plugins (errors in one are logged and do not stop the others)."""
        log.info("SIGHUP: {path} read again and valid; applying live settings", path=config.path)
        self.gateway.hooks.notify("smtpgw_reload", config=config)
        return config

    @staticmethod
    def _failed(failure: Any, path: str) -> None:
        if failure.check(ConfigError):
            log.error("SIGHUP: {path}: {error}; the running configuration is kept", path=path,
                      error=str(failure.value))
        else:
            log.failure("SIGHUP: reading {path} failed", failure, path=path)
