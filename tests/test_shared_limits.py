"""Per-client limits counted over the whole gateway and the whole cluster: failed AUTH attempts spread
over two workers lock the client at the configured count; failed AUTH attempts and an ETRN rate limit
hold over two nodes sharing a real ``redis-server`` (falling back to each node's own count while Redis
is down)."""
from __future__ import annotations

import base64
import smtplib
import uuid

import pytest

from gwprocess import GatewayProcess, base_config, wait_until
from mta.workers.identity import owner_of
from test_cluster import A, B, etrn, node_config

GW, CLIENT = "127.0.0.205", "127.0.0.206"
PORT = 2525


def auth_config(tmp_path) -> dict:
    from mta.smtp.server.users import hash_password

    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('right', ln=4)}\n")
    cfg = base_config(tmp_path, listen=f"{GW}:{PORT}")
    cfg["gateway"]["workers"] = 2
    cfg["virtual_servers"][0]["auth"] = {"users": str(users), "allow_plaintext": True, "max_failures": 2,
                                         "max_failures_per_client": {"count": 4, "per": "1h"}}
    return cfg


def session() -> tuple[smtplib.SMTP, int]:
    """A connection from CLIENT that queued one message; which worker took it (its queue id says)."""
    s = smtplib.SMTP(GW, PORT, timeout=30, source_address=(CLIENT, 0))
    s.ehlo("client.test")
    s.mail("a@client.test")
    s.rcpt("bob@example.test")
    code, text = s.data(f"Subject: which worker\r\nMessage-ID: <{uuid.uuid4().hex}@client.test>\r\n\r\nhi\r\n")
    assert code == 250
    return s, owner_of(text.decode().rsplit(" ", 1)[-1], 2)


def auth(s: smtplib.SMTP, password: str) -> int:
    return s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0" + password.encode()).decode())[0]


def test_auth_failures_spread_over_workers_hit_the_limit_at_the_count(gateway, tmp_path):
    gw = gateway(auth_config(tmp_path))
    assert wait_until(lambda: "control.sock.1" in gw.log(), 30)
    failed = {0: 0, 1: 0}
    for _ in range(200):                        # two failures in each worker, one per connection
        s, worker = session()
        if failed[worker] < 2:
            assert auth(s, "wrong") == 535
            failed[worker] += 1
        s.quit()
        if failed == {0: 2, 1: 2}:
            break
    assert failed == {0: 2, 1: 2}
    s, worker = session()                       # the fifth try, whichever worker: locked
    assert auth(s, "right") == 454
    s.quit()


@pytest.fixture
def limited_nodes(tmp_path, redis_server):
    """Cluster nodes (tests/test_cluster.py) allowing 3 ETRN per client and hour, and 3 failed AUTH."""
    started: list[GatewayProcess] = []

    def start(name: str, host: str) -> GatewayProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        cfg = node_config(folder, host, name, redis_server.url)
        cfg["plugins"]["etrn_dequeue"] = {"rate_limit": {"requests": 3, "per": "1h"}}
        cfg["virtual_servers"][0]["auth"] = auth_config(folder)["virtual_servers"][0]["auth"]
        cfg["virtual_servers"][0]["auth"]["max_failures_per_client"]["count"] = 3
        started.append(GatewayProcess(folder, cfg))
        return started[-1].start()

    yield start
    for gw in started:
        gw.stop()


def test_etrn_rate_limit_counted_over_two_nodes(limited_nodes, redis_server):
    a = limited_nodes("mx1", A)
    b = limited_nodes("mx2", B)
    assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 15)
    assert etrn(A, "site.test")[0] == 250
    assert etrn(B, "site.test")[0] == 250
    assert etrn(A, "site.test")[0] == 250
    assert etrn(B, "site.test")[0] == 458       # the fourth in the hour, at either node
    assert etrn(A, "site.test")[0] == 458
    assert "rate limited" in b.log()
    redis_server.kill()                         # Redis gone: each node counts alone...
    assert etrn(A, "site.test")[0] == 458       # ... and A has seen 3 of its own this hour
    assert wait_until(lambda: "(degraded)" in a.log(), 15)


def test_auth_failures_counted_over_two_nodes(limited_nodes, redis_server):
    limited_nodes("mx1", A)
    limited_nodes("mx2", B)

    def attempt(host: str, password: str) -> int:
        with smtplib.SMTP(host, PORT, timeout=30, source_address=(CLIENT, 0)) as s:
            s.ehlo("client.test")
            return auth(s, password)

    assert [attempt(A, "wrong"), attempt(B, "wrong"), attempt(A, "wrong")] == [535, 535, 535]
    assert attempt(B, "right") == 454          # B saw one failure itself: the cluster saw three
    assert attempt(A, "right") == 454
    keys = redis_server.cli("KEYS", "smtpgw:limit:auth:*").split()
    assert len(keys) == 1 and CLIENT in keys[0]
    assert 0 < int(redis_server.cli("TTL", keys[0])) <= 3601       # soft state: it expires with its window


def test_etrn_requests_are_counted_over_the_workers(tmp_path):
    """Without Redis the windows are the workers' shared table: worker 0 and worker 1 see one count
    per client and kind; a new window starts over."""
    from mta.cluster.windows import ClientWindows
    from mta.workers.clients import ClientCounts
    from mta.workers.identity import WorkerInfo

    now = [1_000_000.0]
    tables = [ClientCounts(str(tmp_path), WorkerInfo(i, 2), pid=300 + i, clock=lambda: now[0]) for i in (0, 1)]
    zero, one = (ClientWindows(lambda t=t: t) for t in tables)
    assert [zero.hit("etrn", "etrn", CLIENT, 60), one.hit("etrn", "etrn", CLIENT, 60),
            zero.hit("etrn", "etrn", CLIENT, 60)] == [1, 2, 3]
    assert one.count("etrn", "etrn", CLIENT, 60) == 3
    assert one.count("auth", 0, CLIENT, 60) == 0 and one.count("etrn", "etrn", GW, 60) == 0
    now[0] += 61
    assert one.hit("etrn", "etrn", CLIENT, 60) == 1
