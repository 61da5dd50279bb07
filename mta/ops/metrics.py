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
=========================================== ===========================================================

The registry is private to the gateway (not prometheus_client's global one), and the page is
rendered in the reactor thread, where the queue lives, so reading it needs no lock.
"""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application import service
from twisted.logger import Logger
from twisted.web.resource import Resource

from mta.plugin.hookspecs import hookimpl

log = Logger(namespace="smtpgw.metrics")

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
        queue = getattr(self.m.gateway, "queue", None)
        stats = queue.stats() if queue is not None else {}
        for name, key, text in (
                ("smtpgw_queue_messages", "messages", "Messages in the queue"),
                ("smtpgw_queue_recipients", "recipients", "Recipients still pending"),
                ("smtpgw_queue_held_messages", "held", "Messages held by the administrator"),
                ("smtpgw_queue_active_deliveries", "active", "Messages being delivered now"),
                ("smtpgw_queue_oldest_age_seconds", "oldest_age", "Age of the oldest queued message")):
            yield GaugeMetricFamily(name, text, value=float(stats.get(key, 0)))
        memory = getattr(self.m.gateway, "message_memory", None)     # mta.smtp.server.message_memory
        if memory is not None:
            yield GaugeMetricFamily("smtpgw_message_memory_bytes", "Bytes of messages being received, "
                                    "held in memory", value=float(memory.held))
            yield GaugeMetricFamily("smtpgw_message_memory_limit_bytes", "This process's budget for "
                                    "messages being received (gateway.message_memory)", value=float(memory.limit))
            yield CounterMetricFamily("smtpgw_message_memory_refusals", "Messages refused 452 4.3.1 "
                                      "for want of message memory", value=float(memory.refusals))


class MetricsPage(Resource):
    """``/metrics`` (and ``/``) in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        if request.postpath and request.postpath not in ([b"metrics"], [b""]):
            request.setResponseCode(404)
            return b"not found: try /metrics\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


def metrics_service(gateway: Any, factories: Iterable[Any], reactor: Any) -> service.Service:
    """The listening service for ``gateway.metrics`` (call only when enabled); registers the hooks."""
    import ipaddress

    from twisted.application import internet
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
    from twisted.web.server import Site

    metrics = GatewayMetrics(gateway, factories)
    gateway.hooks.register(metrics.hooks, name="metrics")
    host, port = gateway.config.gateway.metrics.listen
    endpoint_cls = TCP6ServerEndpoint if ipaddress.ip_address(host).version == 6 else TCP4ServerEndpoint
    site = Site(MetricsPage(metrics))
    site.noisy = False
    site.log = lambda request: None            # a scrape every 15 s is not worth a log line
    svc = internet.StreamServerEndpointService(endpoint_cls(reactor, port, interface=host), site)
    svc._raiseSynchronously = True            # a port in use stops startup with a clear error
    svc.setName(f"metrics {host}:{port}")
    svc.metrics = metrics
    return svc
