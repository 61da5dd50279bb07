"""The Prometheus endpoint (``gateway.metrics``): off by default, on loopback by default.

    gateway:
      metrics: {enabled: true, listen: "127.0.0.1:9125"}     # GET http://127.0.0.1:9125/metrics

What it counts comes from the hooks every plugin sees (connections, queued messages, per-recipient
outcomes), so the core needs no counters of its own; the queue's depth and age, and the open
connections, are read when Prometheus scrapes. Recipients are counted one by one, as Postfix logs them:
a message to three recipients that all arrive is three deliveries.

Exposed series:

=========================================== ===========================================================
``smtpgw_connections_total{virtual_server}`` SMTP connections opened (before any policy decision)
``smtpgw_connections_active{virtual_server}`` SMTP connections open now
``smtpgw_messages_received_total``          messages accepted and queued (250 after DATA)
``smtpgw_recipients_delivered_total``       recipients delivered (remote 250 or Maildir)
``smtpgw_recipients_deferred_total``        temporary failures (each will be retried)
``smtpgw_recipients_bounced_total``         recipients given up (5xx, expiry): a DSN went out
``smtpgw_delivery_latency_seconds``         histogram: time from arrival to delivery, per recipient
``smtpgw_queue_messages``                   messages in the queue
``smtpgw_queue_recipients``                 recipients still pending
``smtpgw_queue_held_messages``              messages held by the administrator (``smtpgw queue hold``)
``smtpgw_queue_active_deliveries``          messages being delivered now
``smtpgw_queue_oldest_age_seconds``         age of the oldest queued message (0 when empty)
``smtpgw_tls_policy_failures_total``        TLS sessions a destination's MTA-STS or DANE policy failed,
                                            by ``policy_domain``, ``policy_type`` (sts, tlsa) and
                                            ``result_type`` (RFC 8460: starttls-not-supported, ...)
``smtpgw_tls_policy_sessions_total``        TLS sessions under such a policy, by ``policy_domain``,
                                            ``policy_type`` and ``result`` (success, failure)
=========================================== ===========================================================

The registry is private to the gateway (not prometheus_client's global one), and the page is
rendered in the reactor thread, where the queue lives, so reading it needs no lock.

With several workers (``gateway.workers``) every worker counts its own share, and worker 0, which
serves the page, asks the others for theirs over their control sockets (the ``metrics`` request of
:mod:`mta.ops.control`) at each scrape. The page then holds, for every series, the gateway's figure
with the labels above (workers summed; the oldest queued message's age is the oldest of all) and each
worker's own figure with a ``worker="i"`` label beside them; ``smtpgw_worker_up{worker="i"}`` says
whether worker i answered (one that did not is left out of the sums until it does). Sum the series
without a ``worker`` label (``{worker=""}`` in PromQL), not all of them. Asking at the scrape rather
than sharing the counters in ``worker.counts`` (the mmap the connection limit uses) keeps every
figure exact -- histograms, and the queue gauges each worker reads from its own queue when asked --
with no fixed layout to maintain and no work between scrapes.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mta.config import ListenAddress
from mta.workers.endpoint import PreboundEndpoint
from mta.plugin.hookspecs import hookimpl

log = Logger(namespace="smtpgw.metrics")

# Gauges whose gateway figure is the largest worker's, not the sum.
MAX_GAUGES = frozenset({"smtpgw_queue_oldest_age_seconds", "smtpgw_shaping_paused",
                        "smtpgw_cluster_redis_outages_total", "smtpgw_cluster_redis_outages"})
# ... and those whose gateway figure is the lowest worker's: Redis is up for the node only if every
# worker reaches it, and its queue index is whole only if every worker's share is.
MIN_GAUGES = frozenset({"smtpgw_cluster_redis_up", "smtpgw_cluster_queue_index_synced"})
ASK_TIMEOUT = 10.0      # a worker that does not answer a scrape within this is reported down

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 2 * 86400)


class GatewayMetrics:
    """The counters, fed by hooks (register :attr:`hooks` with the plugin manager), and the gauges
    read from the gateway at scrape time."""

    def __init__(self, gateway: Any, factories: Iterable[Any] = ()) -> None:
        self.gateway = gateway
        self.factories = list(factories)           # SMTPServerFactory instances (their .active and .vs)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("smtpgw_connections", "SMTP connections opened", ["virtual_server"],
                                   registry=r)
        self.received = Counter("smtpgw_messages_received", "Messages accepted and queued", registry=r)
        self.delivered = Counter("smtpgw_recipients_delivered", "Recipients delivered", registry=r)
        self.deferred = Counter("smtpgw_recipients_deferred", "Temporary delivery failures (will retry)",
                                registry=r)
        self.bounced = Counter("smtpgw_recipients_bounced", "Recipients given up (a DSN was sent)", registry=r)
        self.latency = Histogram("smtpgw_delivery_latency_seconds", "Time from arrival to delivery, per recipient",
                                 buckets=LATENCY_BUCKETS, registry=r)
        for factory in self.factories:
            self.connections.labels(factory.vs.name)       # present (at 0) before the first connection
        r.register(_Gauges(self))
        self.hooks = _MetricsHooks(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> list[dict[str, Any]]:
        """This process's figures as JSON-able families, for worker 0's page (the ``metrics`` request
        of the control socket)."""
        return [{"name": family.name, "type": family.type, "help": family.documentation,
                 "samples": [[s.name, s.labels, s.value] for s in family.samples]}
                for family in self.registry.collect()]


def merge(snapshots: dict[int, list[dict[str, Any]] | None]) -> list[Metric]:
    """The gateway's families from each worker's :meth:`GatewayMetrics.snapshot` (None: it did not
    answer): every sample summed over the workers (``_created`` the earliest, the gauges in
    :data:`MAX_GAUGES` the largest, those in :data:`MIN_GAUGES` the lowest), then each worker's own with a ``worker`` label."""
    families: dict[str, Metric] = {}
    totals: dict[str, dict[tuple, list]] = {}
    own: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for index in sorted(snapshots):
        for family in snapshots[index] or ():
            name = family["name"]
            if name not in families:
                families[name] = Metric(name, family["help"], family["type"])
                totals[name], own[name] = {}, []
            for sample, labels, value in family["samples"]:
                key = (sample, tuple(sorted(labels.items())))
                slot = totals[name].get(key)
                if slot is None:
                    totals[name][key] = [sample, labels, value]
                elif sample.endswith("_created"):
                    slot[2] = min(slot[2], value)
                elif name in MAX_GAUGES or sample in MAX_GAUGES:
                    slot[2] = max(slot[2], value)
                elif name in MIN_GAUGES:
                    slot[2] = min(slot[2], value)
                else:
                    slot[2] += value
                own[name].append((sample, {**labels, "worker": str(index)}, value))
    up = Metric("smtpgw_worker_up", "Whether the worker answered this scrape (1) or not (0)", "gauge")
    for index in sorted(snapshots):
        up.add_sample("smtpgw_worker_up", {"worker": str(index)}, 0.0 if snapshots[index] is None else 1.0)
    for name, family in families.items():
        for sample, labels, value in totals[name].values():
            family.add_sample(sample, labels, value)
        for sample, labels, value in own[name]:
            family.add_sample(sample, labels, value)
    return [*families.values(), up]


class _Merged:
    """A collector over already merged families, so prometheus_client writes the page."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render_families(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(families))
    return generate_latest(registry)


class WorkersMetrics:
    """Worker 0's page on a gateway of ``count`` workers: its own figures and the others', asked
    with ``ask(index, request) -> Deferred[dict]`` (their control sockets)."""

    def __init__(self, metrics: GatewayMetrics, count: int,
                 ask: Callable[[int, dict[str, Any]], defer.Deferred]) -> None:
        self.metrics, self.count, self.ask = metrics, count, ask

    def _one(self, index: int) -> defer.Deferred:
        d = self.ask(index, {"op": "metrics"})
        d.addTimeout(ASK_TIMEOUT, self.metrics.gateway.reactor)

        def answered(answer: Any) -> list[dict[str, Any]] | None:
            if isinstance(answer, dict) and answer.get("ok") and isinstance(answer.get("families"), list):
                return answer["families"]
            log.warn("metrics: worker {index} did not answer: {answer}", index=index, answer=answer)
            return None

        def failed(failure: Any) -> None:
            log.warn("metrics: worker {index} did not answer: {e}", index=index, e=failure.getErrorMessage())
            return None

        return d.addCallbacks(answered, failed)

    def render(self) -> defer.Deferred:
        others = [self._one(i) for i in range(1, self.count)]
        d = defer.gatherResults(others)

        def merged(answers: list) -> bytes:
            snapshots = {0: self.metrics.snapshot(), **dict(zip(range(1, self.count), answers))}
            return render_families(merge(snapshots))

        return d.addCallback(merged)


class _MetricsHooks:
    """Hook implementations; each returns None, so no verdict or outcome changes."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    @hookimpl(tryfirst=True)
    def smtpgw_connect(self, session: Any) -> None:
        self.m.connections.labels(getattr(session, "virtual_server", "") or "").inc()

    @hookimpl
    def smtpgw_queued(self, envelope: Any) -> None:
        self.m.received.inc()

    @hookimpl
    def smtpgw_delivered(self, envelope: Any, recipient: str, reply: Any) -> None:
        self.m.delivered.inc()
        received = getattr(envelope, "received_at", None)
        if isinstance(received, (int, float)):
            self.m.latency.observe(max(0.0, self.m.gateway.reactor.seconds() - received))

    @hookimpl
    def smtpgw_deferred(self, envelope: Any, recipient: str, reply: Any) -> None:
        self.m.deferred.inc()

    @hookimpl
    def smtpgw_bounced(self, envelope: Any, recipient: str, reply: Any) -> None:
        self.m.bounced.inc()


class _Gauges:
    """Read at scrape time: queue depth and age, open connections."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        active = GaugeMetricFamily("smtpgw_connections_active", "SMTP connections open now",
                                   labels=["virtual_server"])
        for factory in self.m.factories:
            active.add_metric([factory.vs.name], getattr(factory, "active", 0))
        yield active
        stats = self.m.gateway.queue.stats()
        for name, key, text in (
                ("smtpgw_queue_messages", "messages", "Messages in the queue"),
                ("smtpgw_queue_recipients", "recipients", "Recipients still pending"),
                ("smtpgw_queue_held_messages", "held", "Messages held by the administrator"),
                ("smtpgw_queue_active_deliveries", "active", "Messages being delivered now"),
                ("smtpgw_queue_oldest_age_seconds", "oldest_age", "Age of the oldest queued message")):
            yield GaugeMetricFamily(name, text, value=float(stats.get(key, 0)))
        yield from _shaping_families(self.m.gateway.deliverer.shaper.snapshot())
        yield from _node_families(self.m.gateway)
        yield from _tls_policy_families(self.m.gateway.tls_reports)
        memory = self.m.gateway.message_memory     # mta.smtp.server.message_memory
        yield GaugeMetricFamily("smtpgw_message_memory_bytes", "Bytes of messages being received, "
                                "held in memory", value=float(memory.held))
        yield GaugeMetricFamily("smtpgw_message_memory_limit_bytes", "This process's budget for "
                                "messages being received (gateway.message_memory)", value=float(memory.limit))
        yield CounterMetricFamily("smtpgw_message_memory_refusals", "Messages refused 452 4.3.1 "
                                  "for want of message memory", value=float(memory.refusals))


def _node_families(gateway: Any) -> Iterable[Any]:
    """The node's drain state (worker 0, which keeps it) and, in a cluster, whether Redis answers,
    whether this worker's share of the queue index is whole in Redis, and the leases held."""
    drain = getattr(gateway, "drain", None)
    if drain is not None and drain.writer:
        state = GaugeMetricFamily("smtpgw_node_state", "1 for the node's state: up, draining (smtpgw "
                                  "cluster drain: refusing connections) or drained (and its queue empty)",
                                  labels=["state"])
        for name in ("up", "draining", "drained"):
            state.add_metric([name], 1.0 if drain.state() == name else 0.0)
        yield state
    cluster = getattr(gateway, "cluster", None)
    if cluster is None:
        return
    yield GaugeMetricFamily("smtpgw_cluster_redis_up", "1 while the cluster's Redis answers, 0 while the "
                            "node runs on its own with local limits (degraded)", value=0.0 if cluster.degraded else 1.0)
    yield CounterMetricFamily("smtpgw_cluster_redis_outages", "Times Redis stopped answering since the node "
                              "started", value=float(cluster.outages))
    index = gateway.queue_index
    if index is not None:
        yield GaugeMetricFamily("smtpgw_cluster_queue_index_synced", "1 when the node's queue index in Redis "
                                "is whole, 0 while it waits to be written again (Redis down or emptied)",
                                value=1.0 if index.synced else 0.0)
        yield GaugeMetricFamily("smtpgw_cluster_queue_index_pending", "Queue changes not yet written to the "
                                "index in Redis", value=float(len(index.dirty)))
    leases = gateway.leases
    if leases is not None:
        yield GaugeMetricFamily("smtpgw_cluster_leases_held", "Cluster-wide connection leases this node holds",
                                value=float(len(leases.held)))


def _shaping_families(rows: list[dict[str, Any]]) -> Iterable[Any]:
    """Per destination of ``gateway.shaping`` (mta.delivery.shaping): its connections allowed now and
    in use, whether it is paused, and how often it made us back off."""
    allowed = GaugeMetricFamily("smtpgw_shaping_connections_allowed", "Connections a shaped destination "
                                "may have now (less than configured after a back-off)", labels=["destination"])
    in_flight = GaugeMetricFamily("smtpgw_shaping_in_flight", "Transactions to a shaped destination now",
                                  labels=["destination"])
    paused = GaugeMetricFamily("smtpgw_shaping_paused", "1 while a shaped destination is paused after a "
                               "421 or a burst of 4xx", labels=["destination"])
    back_offs = CounterMetricFamily("smtpgw_shaping_back_offs", "Back-offs of a shaped destination",
                                    labels=["destination"])
    for r in rows:
        labels = [r["destination"]]
        if r["connections"] is not None:
            allowed.add_metric(labels, float(r["connections"]))
        in_flight.add_metric(labels, float(r["in_flight"]))
        paused.add_metric(labels, 1.0 if r["state"] == "paused" else 0.0)
        back_offs.add_metric(labels, float(r["back_offs"]))
    return (allowed, in_flight, paused, back_offs)


def _tls_policy_families(counter: Any) -> Iterable[Any]:
    """TLS sessions under a destination's policy (MTA-STS, DANE: mta.delivery.tls_report) since the
    process started, whether or not ``gateway.tls_rpt`` sends reports."""
    failures = CounterMetricFamily("smtpgw_tls_policy_failures", "TLS sessions a destination's policy "
                                   "(MTA-STS, DANE) refused, by policy domain, policy type and RFC 8460 "
                                   "result type", labels=["policy_domain", "policy_type", "result_type"])
    for (domain, kind, result), n in sorted(counter.failures_total.items()):
        failures.add_metric([domain, kind, result], float(n))
    sessions = CounterMetricFamily("smtpgw_tls_policy_sessions", "TLS sessions under a destination's "
                                   "policy, by policy domain, policy type and result (success, failure)",
                                   labels=["policy_domain", "policy_type", "result"])
    for (domain, kind, result), n in sorted(counter.sessions_total.items()):
        sessions.add_metric([domain, kind, result], float(n))
    return (failures, sessions)


class MetricsPage(Resource):
    """``/metrics`` (and ``/``) in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics | WorkersMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes | int:
        if request.postpath and request.postpath not in ([b"metrics"], [b""]):
            request.setResponseCode(404)
            return b"not found: try /metrics\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        page = self.metrics.render()
        if not isinstance(page, defer.Deferred):
            return page
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)           # the scraper went away: nothing to write to

        def write(body: bytes) -> None:
            if not finished.called:
                request.write(body)
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("metrics page failed", failure)
            if not finished.called:
                request.setResponseCode(500)
                request.write(b"internal error\n")
                request.finish()

        page.addCallbacks(write, failed)
        return NOT_DONE_YET


def gateway_metrics(gateway: Any, factories: Iterable[Any]) -> GatewayMetrics:
    """This process's counters for ``gateway.metrics`` (every worker keeps its own): registers the
    hooks and sets ``gateway.metrics``, which the control socket's ``metrics`` request reads."""
    metrics = GatewayMetrics(gateway, factories)
    gateway.hooks.register(metrics.hooks, name="metrics")
    gateway.metrics = metrics
    return metrics


def metrics_service(metrics: GatewayMetrics, reactor: Any, workers: int = 1,
                    ask: Callable[[int, dict[str, Any]], defer.Deferred] | None = None) -> service.Service:
    """The listening service for ``gateway.metrics`` (worker 0 only); with ``workers`` > 1 the page
    adds up every worker's figures, asked with ``ask`` (see :class:`WorkersMetrics`)."""
    from twisted.application import internet
    from twisted.web.server import Site

    gateway = metrics.gateway
    host, port = gateway.config.gateway.metrics.listen
    endpoint = PreboundEndpoint(reactor, ListenAddress(host, port), key="gateway.metrics.listen")
    page = WorkersMetrics(metrics, workers, ask) if workers > 1 and ask is not None else metrics
    site = Site(MetricsPage(page))
    site.noisy = False
    site.log = lambda request: None            # a scrape every 15 s is not worth a log line
    svc = internet.StreamServerEndpointService(endpoint, site)      # bound by mta.app.startup
    svc._raiseSynchronously = True
    svc.setName(f"metrics {host}:{port}")
    svc.metrics = metrics
    return svc
