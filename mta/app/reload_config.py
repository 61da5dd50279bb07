"""SIGHUP, the configuration part: read the file again, apply what the running gateway can take live
and name, one line per key, what needs a restart -- whatever plugins are enabled.

Registered as one more target of :class:`mta.app.reload.ReloadService`, so one SIGHUP re-reads both the
TLS certificates and the file. A file that no longer parses or validates changes nothing and the log
names the key at fault. Otherwise every key whose value changed (:mod:`mta.config.changes`) is either

* **applied**: ``SIGHUP: applied: connectors[0].smart_hosts`` -- it takes effect for new connections
  and the next delivery attempt (sessions already open keep what they started with): the keys matching
  :data:`LIVE`, the TLS files of a virtual server that already offers TLS, the web console's users file
  and (when it already speaks TLS) its certificate and key, and those settings of an
  enabled plugin that the plugin declares live (``live_settings`` on its plugin object, patterns under
  its own section, e.g. diag_logging's ``levels``); or
* **kept until a restart**: ``SIGHUP: needs a restart: virtual_servers[0].listen`` -- everything else
  (listeners, hostname, spool, DNS, workers, metrics, local domains, connectors' names, address spaces
  and bridgeheads, AUTH, protocol logs, the plugin list...). The running gateway keeps the value it
  started with for those, so nothing runs half-changed.

The gateway then runs on the file's values for the applied keys (``gateway.config``, each listener's
virtual server) and the plugins get that configuration through ``smtpgw_reload``.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Iterable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.config import Config, ConfigError, load_config
from mta.config.changes import Change, diff, with_changes
from mta.console.web import check_console_files

log = Logger(namespace="smtpgw.reload")

# What the core applies live: the queue and the delivery side read ``gateway.config`` at each use, a
# session reads its virtual server when it connects, a connector's outbound policy is rebuilt when the
# connector changes. ``[]`` is any list index, ``*`` anything (nested keys included).
LIVE = (
    "gateway.postmaster",
    "gateway.queue.*",                                  # retry, delay_notification, expire, max_hops
    "gateway.shaping",                                  # the next send to a destination (mta/delivery/shaping.py)
    "gateway.mta_sts.ca_file",                          # the next policy fetch and MX check (mta/delivery/mta_sts.py)
    "virtual_servers[].limits.*",
    "virtual_servers[].relay.*",
    "virtual_servers[].dsn.*",                          # read by a session at the end of DATA
    "virtual_servers[].tls.required",
    "virtual_servers[].smart_host",
    "connectors[].smart_hosts",
    "connectors[].content_restrictions.*",
    "connectors[].delivery_restrictions.*",
    "connectors[].outbound.*",                          # TLS, AUTH, port, HELO, timeout of new connections
    "connectors[].max_connections",
    "connectors[].max_connections_per_host",
    "connectors[].delivery.schedule",
    "connectors[].delivery.timezone",
    "connectors[].delivery.oversize.*",
)
TLS_FILES = ("virtual_servers[].tls.certificate", "virtual_servers[].tls.key")
# the web console (mta.console.web): its users file at the next login; its TLS files when it already
# speaks TLS (turning TLS on or off, the listen address, enabling it: a restart)
CONSOLE_USERS = "gateway.console.users"
CONSOLE_TLS_FILES = ("gateway.console.tls.certificate", "gateway.console.tls.key")


def _matcher(patterns: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(p).replace(r"\*", ".*") for p in patterns) or "(?!)")


_LIVE = _matcher(LIVE)
_TLS_FILES = _matcher(TLS_FILES)


class ConfigReload:
    """A ``ReloadService`` target: ``reload(reactor)`` re-reads ``gateway.config.path`` in a thread.

    ``listeners`` are the :class:`mta.smtp.server.session.SMTPServerFactory` objects: each gets its
    virtual server's new settings (and its TLS files) for the connections it accepts from then on.
    """

    def __init__(self, gateway: Any, listeners: Iterable[Any] = ()) -> None:
        self.gateway = gateway
        self.listeners = list(listeners)

    def reload(self, reactor: Any) -> defer.Deferred:
        path = self.gateway.config.path
        if not path:
            return defer.succeed(None)
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self._read, path)
        return d.addCallbacks(self.apply, self._failed, errbackArgs=(path,))

    @staticmethod
    def _read(path: str) -> Config:
        """The file, checked as at start-up where a key names other files the gateway reads live
        (the console's users file, certificate and key): one that does not load refuses the reload."""
        config = load_config(path)
        check_console_files(config)
        return config

    def apply(self, config: Config) -> Config:
        """Apply the live changes, report the others; the configuration now running is returned."""
        running = self.gateway.config
        changes = diff(running, config)
        live = [c for c in changes if self.is_live(c)]
        kept = [c for c in changes if c not in live]
        effective = with_changes(running, live)
        if config.path != running.path:
            effective = replace(effective, path=config.path)
        self.gateway.config = effective
        self._update_listeners(effective)
        ca_file = effective.gateway.mta_sts.ca_file     # read again (new path or content) at the next use:
        mta_sts = getattr(self.gateway, "mta_sts", None)
        if mta_sts is not None:                         # policy fetches,
            mta_sts.reload(ca_file)
        reporter = getattr(self.gateway, "tls_reporter", None)
        if reporter is not None:                        # TLS-RPT reports POSTed over https
            reporter.poster.set_ca_file(ca_file)
        for change in live:
            log.info("SIGHUP: applied: {key}", key=change.path)
        for change in kept:
            log.warn("SIGHUP: needs a restart: {key}", key=change.path)
        log.info("SIGHUP: {path} read again and valid: {applied} change(s) applied, {kept} need a restart",
                 path=config.path, applied=len(live), kept=len(kept))
        self.gateway.hooks.reload(effective)
        return effective

    def is_live(self, change: Change) -> bool:
        pattern = change.pattern
        if _LIVE.fullmatch(pattern):
            return True
        if _TLS_FILES.fullmatch(pattern):
            return self._tls_files_live(change)
        console = self.gateway.config.gateway.console
        if pattern == CONSOLE_USERS:
            return bool(change.new) and console.enabled
        if pattern in CONSOLE_TLS_FILES:
            return bool(change.new) and console.enabled and bool(console.tls.certificate)
        if pattern.startswith("plugins.") and pattern.count(".") >= 2:
            return self._plugin_setting_live(pattern)
        return False

    def _tls_files_live(self, change: Change) -> bool:
        """New certificate or key files for a virtual server that offers TLS and keeps offering it;
        turning TLS on or off changes the listeners (a restart)."""
        index = change.steps[1][1]
        vs = self.gateway.config.virtual_servers[index]
        listener = self._listener(vs.name)
        return bool(change.new) and listener is not None and listener.tls_context is not None

    def _plugin_setting_live(self, pattern: str) -> bool:
        _, name, rest = pattern.split(".", 2)
        if name not in self.gateway.config.plugins.enabled:
            return True         # nothing runs it: the value is only kept (its plugin reads the file at start)
        plugin = self.gateway.hooks.plugin(name)
        declared = getattr(plugin, "live_settings", ())
        return bool(declared) and _matcher(declared).fullmatch(rest) is not None

    def _listener(self, name: str) -> Any:
        return next((f for f in self.listeners if f.vs.name == name), None)

    def _update_listeners(self, config: Config) -> None:
        reactor = self.gateway.reactor
        for listener in self.listeners:
            try:
                vs = config.virtual_server(listener.vs.name)
            except KeyError:
                continue
            old, listener.vs = listener.vs, vs
            tls = listener.tls_context
            if tls is not None and (vs.tls.certificate, vs.tls.key) != (old.tls.certificate, old.tls.key):
                tls.certificate, tls.key = vs.tls.certificate, vs.tls.key
                tls.reload(reactor)

    @staticmethod
    def _failed(failure: Any, path: str) -> None:
        if failure.check(ConfigError):
            log.error("SIGHUP: {path}: {error}; the running configuration is kept", path=path,
                      error=str(failure.value))
        else:
            log.failure("SIGHUP: reading {path} failed", failure, path=path)
