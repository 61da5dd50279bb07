"""Several gateways as one (``gateway.cluster``) on a real ``redis-server`` (tests/redisfixture.py):
two ``twistd smtpgw`` nodes on 127.0.0.181 and .182, each with its own spool, a recording peer on
.183 standing for the dial-up customer's host. Node registration and ``smtpgw cluster status``, an ETRN
at one node releasing mail held at the other (also when that node was down at the time), and Redis
going away and coming back."""
from __future__ import annotations

import json
import time
import smtplib
import subprocess
import uuid
from pathlib import Path

import pytest

from gwprocess import GatewayProcess, base_config, wait_until
from test_cli_queue import smtpgw_command

A, B, CUSTOMER = "127.0.0.181", "127.0.0.182", "127.0.0.183"
PORT = 2525
HELD = "is remote-triggered; waiting for ETRN/ATRN for site.test"


def node_config(tmp: Path, host: str, name: str, redis_url: str) -> dict:
    cfg = base_config(tmp, listen=f"{host}:{PORT}")
    cfg["gateway"]["cluster"] = {"redis": redis_url, "node": name}
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"] = [
        {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}], "smart_hosts": [f"[{CUSTOMER}]"]},
        {"name": "Site queue", "address_spaces": ["site.test"], "smart_hosts": [f"[{CUSTOMER}]"],
         "delivery": {"remote_triggered": True, "authorized": [{"network": "127.0.0.0/8"}]}},
    ]
    cfg["plugins"]["enabled"] = ["relay_acl", "smart_host", "etrn_dequeue", "diag_logging"]
    cfg["plugins"]["diag_logging"]["levels"]["queuing_engine"] = "minimum"
    return cfg


@pytest.fixture
def nodes(tmp_path, redis_server):
    started: list[GatewayProcess] = []

    def start(name: str, host: str, per_host: int | None = None) -> GatewayProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        cfg = node_config(folder, host, name, redis_server.url)
        if per_host is not None:
            cfg["connectors"][0]["max_connections_per_host"] = per_host
        gw = GatewayProcess(folder, cfg)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def send(host: str, rcpt: str, subject: str = "hello") -> None:
    with smtplib.SMTP(host, PORT, timeout=30) as s:
        s.sendmail("alice@example.test", [rcpt],
                   f"Subject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello.\r\n")


def etrn(host: str, node: str) -> tuple[int, str]:
    with smtplib.SMTP(host, PORT, timeout=30) as s:
        s.ehlo("site.test")
        code, text = s.docmd("ETRN", node)
        return code, text.decode()


def cluster_status(gw: GatewayProcess) -> subprocess.CompletedProcess:
    return subprocess.run([*smtpgw_command(), "cluster", "-c", str(gw.config_path), "status", "--json"],
                          env=gw.env(), cwd=str(gw.tmp), capture_output=True, text=True, timeout=60)


def status_rows(gw: GatewayProcess) -> dict[str, dict]:
    r = cluster_status(gw)
    assert r.returncode == 0, r.stderr
    return {n["node"]: n for n in json.loads(r.stdout)["nodes"]}


def test_nodes_register_and_status_lists_them(nodes, redis_server):
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 15)
    rows = status_rows(b)
    assert set(rows) == {"mx1", "mx2"}
    assert rows["mx1"]["state"] == "up" and rows["mx2"]["state"] == "up"
    assert rows["mx1"]["queue"] == 0 and rows["mx2"]["host"] == "gw.example.test"
    assert 0 < int(redis_server.cli("TTL", "smtpgw:node:mx1")) <= 15       # soft state: it expires
    text = subprocess.run([*smtpgw_command(), "cluster", "-c", str(a.config_path), "status"], env=a.env(),
                          capture_output=True, text=True, timeout=60).stdout
    assert "mx1 (this node)" in text and "mx2" in text


def test_etrn_at_one_node_releases_mail_held_at_the_other(nodes, peers):
    customer = peers(CUSTOMER)
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    send(B, "bob@site.test", "held at mx2")
    assert wait_until(lambda: HELD in b.log(), 15)
    code, text = etrn(A, "site.test")               # nothing is held at mx1 itself
    assert code == 250, text
    assert customer.wait_for(1, 15)
    assert customer.messages[0].recipients == ["bob@site.test"]
    assert wait_until(lambda: "ETRN site.test answered by node mx1" in b.log(), 5)


def test_a_node_that_was_down_catches_up_on_the_trigger(nodes, peers, redis_server):
    customer = peers(CUSTOMER)
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    send(B, "carol@site.test", "held while away")
    assert wait_until(lambda: HELD in b.log(), 15)
    b.stop()
    assert etrn(A, "site.test")[0] == 250
    assert "site.test" in redis_server.cli("GET", "smtpgw:trigger:site.test")     # the durable marker
    b.start()
    assert customer.wait_for(1, 20)
    assert customer.messages[0].recipients == ["carol@site.test"]


def test_redis_down_mail_flows_logged_once_and_the_node_comes_back(nodes, peers, redis_server):
    customer = peers(CUSTOMER)
    a = nodes("mx1", A)
    assert wait_until(lambda: "mx1" in redis_server.cli("SMEMBERS", "smtpgw:nodes"), 10)
    redis_server.kill()
    for i in range(3):
        send(A, f"user{i}@far.test", f"while Redis is down {i}")
    assert customer.wait_for(3, 20)                 # nothing waits on Redis before or after the 250
    assert wait_until(lambda: "runs on its own, with local limits (degraded)" in a.log(), 15)
    r = cluster_status(a)
    assert r.returncode == 1 and "does not answer" in r.stderr
    redis_server.start()                            # empty: the node must register again
    assert wait_until(lambda: "mx1" in redis_server.cli("SMEMBERS", "smtpgw:nodes"), 40)
    assert wait_until(lambda: "is back; node mx1 registered again" in a.log(), 10)
    assert a.log().count("(degraded)") == 1


def test_cluster_keys_and_their_errors(tmp_path):
    from mta.config import ConfigError, parse_config
    from mta.config.values import parse_redis_url

    cfg = base_config(tmp_path)
    assert parse_config(cfg).gateway.cluster.redis is None              # a single machine by default
    assert parse_config(cfg).gateway.node_name == "gw.example.test"
    address = parse_redis_url("rediss://:s%40cret@redis.example:6380/2", "k")
    assert (address.host, address.port, address.db, address.password, address.tls) == (
        "redis.example", 6380, 2, "s@cret", True)
    assert "cret" not in str(address)                                   # logs never show the password
    for bad, key in (({"redis": "http://x"}, "gateway.cluster.redis"),
                     ({"redis": "redis://h/db"}, "gateway.cluster.redis"),
                     ({"redis": "redis://h", "node": "mx 1"}, "gateway.cluster.node"),
                     ({"redis": "redis://h", "nodes": "mx1"}, "gateway.cluster")):
        cfg["gateway"]["cluster"] = bad
        with pytest.raises(ConfigError) as e:
            parse_config(cfg)
        assert e.value.path.startswith(key), e.value


def test_connector_limits_hold_over_the_cluster_and_a_killed_nodes_leases_lapse(nodes, peers, redis_server):
    from test_shaping import Concurrency

    sink = peers(CUSTOMER)
    seen = Concurrency(sink, hold=0.4)
    sink.set_reply("dot", seen)
    a = nodes("mx1", A, per_host=2)         # 2 per host for the whole cluster, not per node
    b = nodes("mx2", B, per_host=2)
    for i in range(5):
        send(A, f"a{i}@far.test", f"from mx1 {i}")
        send(B, f"b{i}@far.test", f"from mx2 {i}")
    assert sink.wait_for(10, 60)
    assert seen.most <= 2
    key = f"smtpgw:lease:Internet:{CUSTOMER}:25"
    sink.set_reply("dot", lambda argument: time.sleep(12))    # mx1 holds a connection...
    send(A, "stuck@far.test")
    assert wait_until(lambda: redis_server.cli("ZCARD", key) == "1", 15)
    a.kill9()                                                   # ... and dies with its lease
    assert wait_until(lambda: redis_server.cli("EXISTS", key) == "0", 20)
