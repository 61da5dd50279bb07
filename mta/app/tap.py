"""``twistd smtpgw``: command-line options and the service tree.

``makeService`` builds objects, and does the part of start-up that can fail before anything runs
(:mod:`mta.app.startup`: the spool made ready and locked, every listener bound, still as root so that
``twistd -u/-g`` can drop it after taking port 25); a failure is one line and a non-zero exit. The
spool scan and queue start happen in ``startService``.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from mta.app import startup
from mta.app.shutdown import SESSION_GRACE, StopSignals, close_sessions
from mta.app.preflight import load_checked
from mta.config import Config, ConfigError, ListenAddress, default_path, format_config_error
from mta.workers import identity
from mta.workers.endpoint import PreboundEndpoint
from mta.workers.lock import OwnerLock, SpoolLock, workers_running
from mta.workers.supervisor import ParentWatch, WorkerSupervisor
from mta.app.gateway import Gateway
from mta.app.reload_config import ConfigReload
from mta.io import rendered_log
from mta.io.fastpath import lean_poll
from mta.smtp.client.protocol_log import OutboundProtocolLog
from mta.smtp.server.protocol_log import ProtocolLogService
from mta.app.reload import ReloadService
from mta.smtp.server.session import SMTPServerFactory
from mta.app.operator import add_operator_services


log = Logger(namespace="smtpgw")

class Options(usage.Options):
    synopsis = "[-c FILE]"
    longdesc = "Run the smtpgw SMTP gateway with the configuration in FILE (default etc/gateway.yaml)."
    optParameters = [["config", "c", default_path(),
                      "the gateway's YAML configuration file ($SMTPGW_CONFIG, /etc/smtpgw/gateway.yaml, "
                      "etc/gateway.yaml)"]]

    def postOptions(self) -> None:
        """Validate the whole file before anything listens; the error names the key (one line, as
        ``smtpgw check-config`` prints it, not after twistd's usage text: nothing is wrong with the
        command line)."""
        try:
            self.parsed: Config = load_checked(self["config"], gateway=True)
        except ConfigError as e:
            startup.fail(format_config_error(self["config"], e), startup.EXIT_CONFIG)


class GatewayService(service.Service):
    """Starts the queue (spool scan, scheduled retries) and stops the gateway cleanly
    (:mod:`mta.app.shutdown`: open sessions told 421 first, then the queue and the spool)."""

    name = "smtpgw-gateway"

    def __init__(self, gateway: Any, spool_lock: SpoolLock | None = None, factories: list[Any] | None = None) -> None:
        self.gateway = gateway
        self.spool_lock = spool_lock        # held since makeService; None in workers 1..N-1
        self.factories = factories if factories is not None else []    # SMTPServerFactory, filled by makeService

    def startService(self) -> None:
        super().startService()
        if self.spool_lock is not None:
            self.spool_lock.record_pid()    # twistd may have become a daemon since: a new pid
        self.gateway.reactor.callWhenRunning(StopSignals(self.gateway.reactor).install)

        worker = self.gateway.worker
        if not worker.many:
            self.gateway.start()
            return
        # several workers: this one's share of the spool is ours alone once its lock is held
        self._lock = OwnerLock(self.gateway.config.gateway.spool, worker.index, self.gateway.reactor)
        self._lock.acquire().addCallbacks(lambda _: self.gateway.start(), self._lock_failed)

    def _lock_failed(self, failure: Any) -> None:
        Logger(namespace="smtpgw.workers").failure("cannot lock this worker's share of the spool", failure)
        from twisted.internet import reactor
        reactor.stop()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        told, cut = await close_sessions(self.factories, self.gateway.reactor)
        try:
            await self.gateway.stop()
        finally:
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.release()
        worker = self.gateway.worker
        log.info("{who} stopped: {told} open session(s) told 421 4.3.2 Service shutting down{cut}; "
                 "queue and spool closed", who=f"worker {worker.index}" if worker.index else "gateway",
                 told=told, cut=f" ({cut} cut off after {SESSION_GRACE:.0f}s)" if cut else "")


def endpoint_for(reactor: Any, listen: ListenAddress, tls_context: Any, worker: Any, key: str,
                 spool: str) -> PreboundEndpoint:
    """The endpoint of one ``virtual_servers[].listen`` entry (``key``), bound by makeService; for a
    ``tls: true`` entry (implicit TLS, port 465) its sessions start encrypted, with the virtual
    server's context (``mta.smtp.server.tls.ServerTLS``, so SIGHUP reaches it). With several workers
    the socket is theirs to share; binding waits only while a previous run's workers hold it."""
    return PreboundEndpoint(reactor, listen, tls_context, worker, key=key,
                            earlier_run=lambda: bool(workers_running(spool)))


def tune_gc(reactor: Any) -> None:
    """Every message allocates thousands of short-lived objects, so the default cyclic collector
    (a young collection every 700 allocations, with the whole start-up heap in the old generation)
    cost about 2% of the CPU under load; far fewer collections, and the start-up objects frozen out
    of them, cost about nothing. Reference counting still frees almost everything at once."""
    import gc

    gc.set_threshold(10000, 20, 10)
    reactor.callWhenRunning(gc.freeze)


# Never looser than this, whatever umask the gateway was started with: log files 0640 (they hold
# addresses), log and mail folders 0750. The spool, Maildir folders and messages have their own
# stricter modes; a stricter umask inherited is kept.
UMASK = 0o027


def restrict_umask() -> int:
    """Add :data:`UMASK`'s bits to the process's umask (the workers and the spool writer inherit
    it; twistd opens its log file after ``makeService``); returns the umask now in force."""
    mask = os.umask(0) | UMASK
    os.umask(mask)
    return mask


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    restrict_umask()



    config = options.parsed
    worker = identity.current(config)       # gateway.workers: which process this is
    spool_lock = None
    if worker.index == 0:                   # the spool is the first process's (workers share it)
        spool_lock = startup.claim_spool(options["config"], config, *startup.service_user(options))
        problem = startup.check_writer(options["config"], config, *startup.service_user(options))
        if problem:
            startup.warn(problem)
            reactor.callWhenRunning(lambda: log.error("{problem}", problem=problem))
    gateway = Gateway(config, reactor, worker=worker)
    tune_gc(reactor)
    lean_poll(reactor)
    reactor.callWhenRunning(rendered_log.install, reactor=reactor)  # twistd's log observer exists by then
    top = service.MultiService()
    factories: list[SMTPServerFactory] = []
    GatewayService(gateway, spool_lock, factories).setServiceParent(top)
    tls_contexts = []
    endpoints = []
    for connector in config.connectors:          # outbound W3C logs (connectors[].protocol_log)
        if connector.protocol_log.enabled:
            outbound_log = OutboundProtocolLog.for_connector(config, connector, reactor)
            gateway.client.protocol_logs[connector.name] = outbound_log
            ProtocolLogService(outbound_log).setServiceParent(top)
    for i, vs in enumerate(config.virtual_servers):
        factory = SMTPServerFactory(gateway, vs)
        factories.append(factory)
        if factory.tls_context is not None:
            tls_contexts.append(factory.tls_context)
        if factory.protocol_log is not None:     # its last lines are written when twistd stops
            ProtocolLogService(factory.protocol_log).setServiceParent(top)
        for j, listen in enumerate(vs.listen):
            endpoint = endpoint_for(reactor, listen, factory.tls_context, worker,
                                    f"virtual_servers[{i}].listen[{j}]", config.gateway.spool)
            endpoints.append(endpoint)
            svc = internet.StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True
            svc.setName(f"{vs.name} {listen.host}:{listen.port}")
            svc.setServiceParent(top)
    reload_targets = [*tls_contexts, ConfigReload(gateway, factories), gateway.recipients,
                      gateway.core.sender_logins()]
    if worker.supervisor:           # started last: after every listener is bound
        supervisor = WorkerSupervisor(reactor, worker, options["config"], endpoints)
        reload_targets.append(supervisor)
    elif worker.many:
        ParentWatch(reactor, worker.index).setServiceParent(top)
    # SIGHUP re-reads certificates, and the file: what can change live is applied, the rest named
    ReloadService(reactor, reload_targets).setServiceParent(top)
    add_operator_services(top, gateway, reactor)        # control socket (smtpgw queue), metrics endpoint
    if worker.supervisor:
        supervisor.setServiceParent(top)
    startup.bind_listeners(options["config"], top)      # last: every check that needs no address first
    return top
