"""The running gateway's parts, built once from the configuration and handed to hooks.

``Gateway`` is the one public object that ties the core together: the plugin hooks, the spool, the
queue manager, the DNS resolver, the outbound SMTP client pool, the local recipients, the mail log,
which worker this process is and the memory budget for messages being received. Listeners
(``mta.smtp.server.session``) and the twistd service (``mta.app.tap``) hold one; plugins receive it as
``services`` in ``smtpgw_configure`` (it provides :class:`mta.plugin.manager.Services`). Every field is
declared here and set in ``__init__``.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.cluster.handover import NodeHandOver
from mta.cluster.leases import ConnectionLeases
from mta.cluster.node import Cluster
from mta.cluster.queue_index import QueueIndex
from mta.cluster.triggers import ASK_TIMEOUT, TriggerBus
from mta.cluster.windows import ClientWindows
from mta.config import Config
from mta.delivery.attempt import Deliverer
from mta.delivery.nexthops import Resolver
from mta.delivery.dane import DaneLookup
from mta.delivery.mta_sts import MtaSts
from mta.delivery.tls_report import TlsReportCounter
from mta.delivery.tls_report_send import TlsReporter
from mta.delivery.recipients import LocalRecipients
from mta.maillog import MailLog
from mta.ops.drain import Drain
from mta.ops.fanout import ask_worker
from mta.ops.metrics import GatewayMetrics
from mta.ops.trace import Traces, attach
from mta.plugin.manager import Hooks
from mta.policy import core as defaults
from mta.queue.manager import QueueManager
from mta.queue.pickup import Pickup
from mta.smtp.client.pool import SMTPClientPool
from mta.smtp.server.message_memory import MessageMemory
from mta.spool.store import Spool
from mta.workers import clients
from mta.workers.clients import ClientCounts
from mta.workers.identity import SINGLE, WorkerInfo

log = Logger(namespace="smtpgw.queue")


class Gateway:
    config: Config
    reactor: Any
    worker: WorkerInfo                  # which process of ``gateway.workers`` this is
    hooks: Hooks
    mail_log: MailLog                   # the gateway's own log lines (mta.maillog), whatever plugins run
    core: defaults.CorePolicy           # the core's own answers (mta/policy/core.py)
    spool: Spool
    resolver: Resolver
    client: Any                         # SMTPClientPool, or a plugin's wrapper around it (etrn_dequeue)
    mta_sts: MtaSts                     # destinations' MTA-STS policies, for MX delivery (mta.delivery.tls_policy)
    dane: DaneLookup                    # MX hosts' TLSA records (RFC 7672), and where DANE outcomes go
    tls_reports: TlsReportCounter       # TLS-RPT counts of policy-governed sessions (mta.delivery.tls_report)
    tls_reporter: TlsReporter | None    # worker 0 with gateway.tls_rpt.enabled: sends the reports
    deliverer: Deliverer
    queue: QueueManager
    recipients: LocalRecipients         # local domains' recipients and aliases
    pickup: Pickup                      # smtpgw sendmail's maildrop
    message_memory: MessageMemory       # bytes of messages being received: this worker's share
    metrics: GatewayMetrics | None      # set by mta.ops.metrics.gateway_metrics when gateway.metrics.enabled
    client_counts: ClientCounts | None  # per-client figures (mta/workers/clients.py), opened at the first connection
    cluster: Cluster | None             # gateway.cluster.redis set: this node's link to the others (mta.cluster)
    leases: ConnectionLeases | None     # with a cluster: connector limits counted over every node
    traces: Traces                      # each queued message's recent steps, for `smtpgw queue show` (mta.ops.trace)
    queue_index: QueueIndex | None      # with a cluster: this worker's queue, indexed in Redis for the cluster view
    drain: Drain                        # smtpgw cluster drain: new connections refused, the queue emptied
    triggers: TriggerBus                # ETRN/ATRN answered here reach the other workers and nodes (mta.cluster.triggers)
    client_windows: ClientWindows       # AUTH failures, ETRN requests per client: every worker, every node

    def __init__(self, config: Config, reactor: Any = None, load_plugins: bool = True,
                 worker: WorkerInfo = SINGLE) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.config = config
        self.reactor = reactor
        self.worker = worker
        self.hooks = Hooks()
        self.mail_log = MailLog(reactor)
        self.core = defaults.CorePolicy(self)
        self.hooks.register(self.core, name="core")
        self.core.sender_logins()                   # read the sender lists now: a bad file stops the start
        if load_plugins:
            self.hooks.load(config.plugins.enabled, config.plugins.local)
        self.spool = Spool(config.gateway.spool, reactor=reactor)
        if worker.many:                             # several workers: this one's share of the spool only
            self.spool.owns = worker.owns
        self.resolver = Resolver(config.gateway.dns.nameservers, timeout=config.gateway.dns.timeout,
                                 reactor=reactor, local_names=[config.gateway.hostname])
        self.client = SMTPClientPool(reactor, helo_name=config.gateway.hostname)
        self.mta_sts = MtaSts(reactor, self.resolver, config.gateway.mta_sts_cache, config.gateway.mta_sts.ca_file)
        self.dane = DaneLookup(self.resolver)
        tls_rpt = config.gateway.tls_rpt
        self.tls_reports = TlsReportCounter(reactor, config.gateway.tls_rpt_directory if tls_rpt.enabled else None,
                                            tls_rpt.interval, worker.index)
        self.tls_reporter = TlsReporter(self) if tls_rpt.enabled and worker.index == 0 else None
        self.dane.observers.append(self.tls_reports.observe)      # DANE's sessions, for TLS-RPT
        self.mta_sts.observers.append(self.tls_reports.observe_sts_fetch)    # failed policy fetches
        self.deliverer = Deliverer(self)
        self.queue = QueueManager(self)
        self.recipients = LocalRecipients(config, reactor)
        self.pickup = Pickup(config.gateway.spool, self.queue.inject, reactor)
        self.message_memory = MessageMemory.for_worker(config.gateway.message_memory, worker)
        self.metrics = None
        self.client_counts = None
        self.cluster = (Cluster(config, reactor, queue_size=lambda: self.queue.stats()["messages"],
                                heartbeat=worker.index == 0, worker=worker.index)
                        if config.gateway.cluster.redis else None)
        self.triggers = TriggerBus(reactor, config.gateway.spool, config.gateway.node_name, worker, self.cluster)
        if worker.many:
            socket = config.gateway.control_socket_path
            self.triggers.ask = lambda index, request: ask_worker(reactor, socket, index, request, ASK_TIMEOUT)
        self.client_windows = ClientWindows(lambda: clients.for_gateway(self), self.cluster)
        self.leases = None
        self.queue_index = None
        self.drain = Drain(config.gateway.spool, reactor, writer=worker.index == 0, name=config.gateway.node_name)
        if self.cluster is not None:
            self.leases = ConnectionLeases(self.cluster, lambda: self.config)
            self.client.leases = self.leases
            self.queue_index = QueueIndex(self.cluster, self.queue, worker.index, worker.count)
            self.triggers.handover = NodeHandOver(self.cluster, self.queue, worker.index)
            self.cluster.node_state = self.drain.state
            self.drain.changed = self.cluster.beat
        self.hooks.configure(config, self)
        self.traces = attach(self)

    def start(self) -> defer.Deferred:
        """Open the spool and rebuild the schedule from disk (in a thread), then start delivering;
        the worker answering the control socket (0) also picks up what ``smtpgw sendmail`` dropped."""
        d = self.queue.start()
        d.addCallback(self._loaded)
        self.recipients.start()
        if self.cluster is not None:
            self.cluster.start()
            self.leases.start()
        if self.queue_index is not None:
            d.addCallback(lambda loaded: (self.queue_index.start(), loaded)[1])
        self.drain.start()
        if self.worker.index == 0:
            d.addCallback(lambda loaded: (self.pickup.start(), loaded)[1])
        counts = self.tls_reports.start()
        if self.tls_reporter is not None:
            counts.addCallback(lambda _: self.tls_reporter.start())
        return d

    def _loaded(self, loaded: int) -> int:
        self.triggers.start()
        self.traces.start(getattr(self.spool, "owns", None)).addErrback(
            lambda f: log.warn("queue traces: {e}", e=f.getErrorMessage()))
        moved = getattr(self.spool, "superseded_by", None)
        if moved:
            defer.Deferred.fromCoroutine(self.triggers.announce(list(moved))).addErrback(lambda f: None)
        return loaded

    def stop(self) -> defer.Deferred:
        self.pickup.stop()
        self.mta_sts.stop()
        self.recipients.stop()
        self.drain.stop()
        if self.queue_index is not None:
            self.queue_index.stop()
        d = self.queue.stop()
        d.addBoth(lambda r: self.client.close())
        d.addBoth(lambda r: self.tls_reports.stop())
        if self.cluster is not None:
            self.leases.stop()
            d.addBoth(lambda r: self.cluster.stop())
        return d
