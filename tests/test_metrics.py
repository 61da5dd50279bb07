"""The Prometheus endpoint: off by default, and on a running gateway its counters move with the mail."""
from __future__ import annotations

import smtplib
import urllib.request
import uuid
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from gwprocess import base_config, port_open, wait_until

from mta.config import parse_config
from mta.config.model import ShapingRule
from mta.delivery.shaping import Shaper, Verdict
from mta.delivery.tls_report import TlsReportCounter
from mta.ops.metrics import GatewayMetrics
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply
from mta.smtp.server.message_memory import MessageMemory

GW_HOST, GW_PORT = "127.0.0.113", 2525
METRICS = ("127.0.0.113", 9125)
PEER = "127.0.0.114"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape() -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{METRICS[0]}:{METRICS[1]}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return samples(r.read().decode())


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def send(rcpt: str, subject: str = "metrics") -> None:
    msg = f"From: a@example.test\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@x.test>\r\n\r\nhi\r\n"
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("a@example.test", [rcpt], msg)


def test_metrics_are_off_by_default_and_on_loopback(tmp_path):
    config = parse_config(base_config(tmp_path))
    assert config.gateway.metrics.enabled is False
    assert config.gateway.metrics.listen == ("127.0.0.1", 9125)


def test_counters_move_on_a_running_gateway(gateway, peers, tmp_path):
    peer = peers(PEER)
    peer.set_reply("rcpt", "451 4.3.0 later")
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["gateway"]["queue"]["retry"] = ["1h"]
    cfg["gateway"]["metrics"] = {"enabled": True, "listen": f"{METRICS[0]}:{METRICS[1]}"}
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    gateway(cfg)
    assert wait_until(lambda: port_open(*METRICS))
    before = scrape()
    assert value(before, "smtpgw_messages_received_total") == 0
    assert value(before, "smtpgw_queue_messages") == 0

    send("bob@example.test")                          # local: delivered at once
    send("carol@remote.test")                         # the smart host defers it
    assert wait_until(lambda: value(scrape(), "smtpgw_recipients_deferred_total") == 1, 20)
    assert wait_until(lambda: value(scrape(), "smtpgw_recipients_delivered_total") == 1, 20)
    after = scrape()
    vs = "Default SMTP Virtual Server"
    assert value(after, "smtpgw_connections_total", virtual_server=vs) >= 2
    assert value(after, "smtpgw_messages_received_total") == 2
    assert value(after, "smtpgw_recipients_bounced_total") == 0
    assert value(after, "smtpgw_delivery_latency_seconds_count") == 1
    assert value(after, "smtpgw_queue_messages") == 1
    assert value(after, "smtpgw_queue_recipients") == 1
    assert value(after, "smtpgw_queue_oldest_age_seconds") > 0
    assert value(after, "smtpgw_connections_active", virtual_server=vs) == 0
    assert value(after, "smtpgw_message_memory_bytes") == 0          # both messages queued: released
    assert value(after, "smtpgw_message_memory_limit_bytes") == 256 * 1024 ** 2
    assert value(after, "smtpgw_message_memory_refusals_total") == 0


def test_recorder_counts_hooks_and_reads_the_queue():
    """The hook side on its own: what each hook adds, and the queue gauges read at render time."""
    entry = QueueEntry("q1", "a@example.test", [RecipientState("b@remote.test")], received_at=100.0, size=10)
    queue = SimpleNamespace(stats=lambda: {"messages": 3, "held": 1, "recipients": 4, "active": 2,
                                           "oldest_age": 42.0})
    factory = SimpleNamespace(vs=SimpleNamespace(name="VS"), active=5)
    clock = SimpleNamespace(seconds=lambda: 130.0, callLater=lambda *a: None)
    shaper = Shaper([ShapingRule("*", 4, back_off_on_421=60.0)], clock)
    far = shaper.destination("far.test")
    far.in_flight = 2
    shaper.leave(far, Verdict.BUSY, Reply(421, "4.7.0", "later"))     # a 421: paused, 2 connections
    gw = SimpleNamespace(queue=queue, reactor=clock, message_memory=MessageMemory(100),
                         deliverer=SimpleNamespace(shaper=shaper), tls_reports=TlsReportCounter(clock))
    m = GatewayMetrics(gw, [factory])
    m.hooks.smtpgw_connect(session=SimpleNamespace(virtual_server="VS"))
    m.hooks.smtpgw_queued(envelope=entry)
    m.hooks.smtpgw_delivered(envelope=entry, recipient="b@remote.test", reply=Reply(250, "2.0.0", "ok"))
    m.hooks.smtpgw_deferred(envelope=entry, recipient="b@remote.test", reply=Reply(451, "4.0.0", "x"))
    m.hooks.smtpgw_bounced(envelope=entry, recipient="b@remote.test", reply=Reply(550, "5.0.0", "x"))
    got = samples(m.render().decode())
    assert value(got, "smtpgw_connections_total", virtual_server="VS") == 1
    assert value(got, "smtpgw_connections_active", virtual_server="VS") == 5
    for name in ("smtpgw_messages_received_total", "smtpgw_recipients_delivered_total",
                 "smtpgw_recipients_deferred_total", "smtpgw_recipients_bounced_total"):
        assert value(got, name) == 1, name
    assert value(got, "smtpgw_delivery_latency_seconds_sum") == 30.0
    assert value(got, "smtpgw_delivery_latency_seconds_bucket", le="30.0") == 1
    assert value(got, "smtpgw_delivery_latency_seconds_bucket", le="10.0") == 0
    assert (value(got, "smtpgw_queue_messages"), value(got, "smtpgw_queue_held_messages"),
            value(got, "smtpgw_queue_recipients"), value(got, "smtpgw_queue_active_deliveries"),
            value(got, "smtpgw_queue_oldest_age_seconds")) == (3, 1, 4, 2, 42.0)
    assert (value(got, "smtpgw_shaping_connections_allowed", destination="far.test"),
            value(got, "smtpgw_shaping_in_flight", destination="far.test"),
            value(got, "smtpgw_shaping_paused", destination="far.test"),
            value(got, "smtpgw_shaping_back_offs_total", destination="far.test")) == (2, 1, 1, 1)


def test_listen_key_errors_name_the_key(tmp_path):
    import pytest

    from mta.config import ConfigError

    cfg = base_config(tmp_path)
    cfg["gateway"]["metrics"] = {"enabled": True, "listen": "localhost:9125"}
    with pytest.raises(ConfigError, match=r"^gateway.metrics.listen: "):
        parse_config(cfg)
    cfg["gateway"]["metrics"] = {"enabled": "yes"}
    with pytest.raises(ConfigError, match=r"^gateway.metrics.enabled: "):
        parse_config(cfg)


def test_check_config_lists_hooks_in_call_order(tmp_path, capsys):
    """check-config builds the plugin manager as the gateway does, starting nothing."""
    import yaml

    from mta.cli.main import main

    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["gateway"]["metrics"] = {"enabled": True, "listen": f"{METRICS[0]}:{METRICS[1]}"}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  smtpgw_rcpt_to: relay_acl -> core" in out
    assert "  smtpgw_next_hops: smart_host -> core" in out
    assert "  smtpgw_connect: metrics" in out
    assert "  smart_host: smtpgw_configure, smtpgw_reload, smtpgw_next_hops" in out
    assert f"metrics: http://{METRICS[0]}:{METRICS[1]}/metrics" in out
    assert f"control socket: {tmp_path / 'spool' / 'control.sock'}" in out
    assert not (tmp_path / "spool").exists() and not port_open(*METRICS)


# -- several workers: the page adds them up ----------------------------------------------------------

WORKERS_GW = ("127.0.0.201", 2525)
WORKERS_METRICS = ("127.0.0.201", 9125)


def recorder(messages: int, oldest: float, connections: int) -> GatewayMetrics:
    """One worker's counters, as its hooks would have left them."""
    queue = SimpleNamespace(stats=lambda: {"messages": messages, "oldest_age": oldest})
    factory = SimpleNamespace(vs=SimpleNamespace(name="VS"), active=connections)
    m = GatewayMetrics(SimpleNamespace(queue=queue, reactor=SimpleNamespace(seconds=lambda: 0.0),
                                       deliverer=SimpleNamespace(shaper=Shaper((), SimpleNamespace(seconds=lambda: 0.0))),
                                       message_memory=MessageMemory(100),
                                       tls_reports=TlsReportCounter(SimpleNamespace(seconds=lambda: 0.0))), [factory])
    for _ in range(messages):
        m.hooks.smtpgw_queued(envelope=None)
        m.hooks.smtpgw_connect(session=SimpleNamespace(virtual_server="VS"))
    return m


def test_merge_sums_the_workers_and_labels_each():
    from mta.ops.metrics import merge, render_families

    snapshots = {0: recorder(2, 10.0, 1).snapshot(), 1: recorder(3, 50.0, 4).snapshot(), 2: None}
    got = samples(render_families(merge(snapshots)).decode())
    assert value(got, "smtpgw_messages_received_total") == 5
    assert value(got, "smtpgw_messages_received_total", worker="0") == 2
    assert value(got, "smtpgw_messages_received_total", worker="1") == 3
    assert value(got, "smtpgw_connections_total", virtual_server="VS") == 5
    assert value(got, "smtpgw_connections_active", virtual_server="VS", worker="1") == 4
    assert value(got, "smtpgw_connections_active", virtual_server="VS") == 5
    assert value(got, "smtpgw_queue_messages") == 5
    assert value(got, "smtpgw_queue_oldest_age_seconds") == 50.0        # the oldest, not a sum
    assert [value(got, "smtpgw_worker_up", worker=str(i)) for i in range(3)] == [1, 1, 0]


def test_metrics_with_two_workers_add_up_the_whole_gateway(gateway, tmp_path):
    from mta.workers import identity as workers

    cfg = base_config(tmp_path, listen=f"{WORKERS_GW[0]}:{WORKERS_GW[1]}")
    cfg["gateway"]["workers"] = 2
    cfg["gateway"]["metrics"] = {"enabled": True, "listen": f"{WORKERS_METRICS[0]}:{WORKERS_METRICS[1]}"}
    gw = gateway(cfg)
    assert wait_until(lambda: "control.sock.1" in gw.log() and port_open(*WORKERS_METRICS), 30)
    url = f"http://{WORKERS_METRICS[0]}:{WORKERS_METRICS[1]}/metrics"

    def scrape_workers() -> dict:
        with urllib.request.urlopen(url, timeout=20) as r:
            return samples(r.read().decode())

    ids = set()
    msg = "From: a@example.test\r\nSubject: workers\r\n\r\nhi\r\n"
    for _ in range(200):                   # until each worker has taken some (the queue id says which)
        with smtplib.SMTP(*WORKERS_GW, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("a@example.test")
            s.rcpt("bob@example.test")
            code, text = s.data(msg)
        assert code == 250
        ids.add(text.decode().rsplit(" ", 1)[-1])
        if {workers.owner_of(x, 2) for x in ids} == {0, 1} and len(ids) >= 4:
            break
    per_worker = [sum(workers.owner_of(x, 2) == i for x in ids) for i in (0, 1)]
    assert all(per_worker), ids
    assert wait_until(lambda: value(scrape_workers(), "smtpgw_recipients_delivered_total") == len(ids), 20)
    got = scrape_workers()
    assert value(got, "smtpgw_messages_received_total") == len(ids)
    assert [value(got, "smtpgw_messages_received_total", worker=str(i)) for i in (0, 1)] == per_worker
    vs = "Default SMTP Virtual Server"
    assert value(got, "smtpgw_connections_total", virtual_server=vs) >= len(ids)
    assert value(got, "smtpgw_delivery_latency_seconds_count") == len(ids)
    assert [value(got, "smtpgw_worker_up", worker=str(i)) for i in (0, 1)] == [1, 1]
