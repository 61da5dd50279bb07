"""One queue view over the cluster and draining a node (issue 17, items 5 and 6), on a real
``redis-server``: two ``twistd smtpgw`` nodes on 127.0.0.181 and .182, each with its own spool, and a
recording peer on .183. ``smtpgw queue list --cluster`` lists both nodes' mail; ``queue
hold/release/delete NODE:ID`` typed at mx1 acts on mx2's message through Redis; ``smtpgw cluster
drain`` makes a node answer 421 4.3.2, deliver what it holds and report when empty."""
from __future__ import annotations

import json
import smtplib
import subprocess

import pytest

from gwprocess import GatewayProcess, base_config, wait_until
from test_cli_queue import smtpgw_command
from test_cluster import A, B, CUSTOMER, HELD, PORT, node_config, send

REFUSED = "451 4.3.0 try later"


@pytest.fixture
def nodes(tmp_path, redis_server):
    started: list[GatewayProcess] = []

    def start(name: str, host: str, workers: int = 1, metrics: str | None = None) -> GatewayProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        cfg = node_config(folder, host, name, redis_server.url)
        cfg["gateway"]["workers"] = workers
        if metrics:
            cfg["gateway"]["metrics"] = {"enabled": True, "listen": metrics}
        if workers > 1:             # ETRN keeps one process (for now): no remote-triggered connector
            cfg["connectors"] = cfg["connectors"][:1]
            cfg["plugins"]["enabled"].remove("etrn_dequeue")
        gw = GatewayProcess(folder, cfg)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def cli(gw: GatewayProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command, rest = args[0], args[1:]
    return subprocess.run([*smtpgw_command(), command, "-c", str(gw.config_path), *rest], env=gw.env(),
                          cwd=str(gw.tmp), capture_output=True, text=True, timeout=timeout)


def cluster_rows(gw: GatewayProcess) -> list[dict]:
    r = cli(gw, "queue", "list", "--cluster", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["entries"]


def local_ids(gw: GatewayProcess) -> dict[str, dict]:
    r = cli(gw, "queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {e["id"]: e for e in json.loads(r.stdout)["entries"]}


def indexed(redis_server, node: str) -> dict[str, dict]:
    """The node's rows in Redis as they are now (redis-cli: quicker to poll than the tool)."""
    lines = redis_server.cli("HGETALL", f"smtpgw:queue:{node}:0").splitlines()
    return {k: json.loads(v) for k, v in zip(lines[::2], lines[1::2])}


def greeting(host: str) -> tuple[int, str]:
    """The server's first reply to a new connection."""
    try:
        with smtplib.SMTP(host, PORT, timeout=10) as s:
            return s.noop()[0], "accepted"
    except smtplib.SMTPConnectError as e:
        return e.smtp_code, e.smtp_error.decode()
    except smtplib.SMTPServerDisconnected as e:
        return 0, str(e)


def test_the_cluster_view_lists_both_nodes_and_acts_on_the_other_nodes_mail(nodes, peers, redis_server):
    customer = peers(CUSTOMER)
    customer.set_reply("rcpt", lambda rcpt: REFUSED if rcpt.startswith("later") else None)
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    send(A, "ann@site.test", "held at mx1")
    send(B, "bob@site.test", "held at mx2")
    send(B, "later@far.test", "deferred at mx2")
    assert wait_until(lambda: HELD in a.log() and HELD in b.log(), 15)

    assert wait_until(lambda: len(indexed(redis_server, "mx1")) == 1 and len(indexed(redis_server, "mx2")) == 2, 15)
    rows = {(r["node"], r["recipients_pending"][0]): r for r in cluster_rows(a)}
    assert set(rows) == {("mx1", "ann@site.test"), ("mx2", "bob@site.test"), ("mx2", "later@far.test")}
    bob = rows[("mx2", "bob@site.test")]
    assert bob["state"] == "waiting" and "ETRN" in bob["why_held"] and bob["sender"] == "alice@example.test"
    assert bob["id"] in local_ids(b) and not bob["stale"]
    later = rows[("mx2", "later@far.test")]["id"]
    assert wait_until(lambda: "451" in (indexed(redis_server, "mx2")[later]["last_error"] or ""), 15)
    assert indexed(redis_server, "mx2")[later]["state"] in ("deferred", "active")
    text = cli(a, "queue", "list", "--cluster")
    assert text.returncode == 0, text.stderr
    assert "NODE" in text.stdout and f"mx2   {bob['id']}" in text.stdout
    assert "3 messages on 2 nodes: mx1 1, mx2 2" in text.stdout

    # show, hold, release and delete typed at mx1 act on mx2's messages, through Redis
    shown = cli(a, "queue", "show", f"mx2:{bob['id'][:14]}")         # a prefix, as for a local id
    assert shown.returncode == 0, shown.stderr
    assert "node:        mx2" in shown.stdout and "<bob@site.test>" in shown.stdout
    held = cli(a, "queue", "hold", f"mx2:{later}")
    assert held.returncode == 0 and f"mx2:{later}: held" in held.stdout, held.stdout + held.stderr
    assert local_ids(b)[later]["held"] is True
    assert wait_until(lambda: "queue hold asked by node mx1" in b.log(), 5)
    assert wait_until(lambda: indexed(redis_server, "mx2")[later]["state"] == "held", 10)   # no attempt in flight
    customer.set_reply("rcpt", None)
    released = cli(a, "queue", "release", f"mx2:{later}")
    assert released.returncode == 0, released.stderr
    assert customer.wait_for(1, 15)
    assert customer.messages[0].recipients == ["later@far.test"]
    gone = cli(a, "queue", "delete", f"mx2:{bob['id']}")
    assert gone.returncode == 0 and "deleted" in gone.stdout, gone.stdout + gone.stderr
    assert bob["id"] not in local_ids(b)
    assert wait_until(lambda: not indexed(redis_server, "mx2"), 10)
    assert [r["node"] for r in cluster_rows(a)] == ["mx1"]

    # an unknown node, and a node that does not listen: clear errors
    r = cli(a, "queue", "hold", "mx9:0123")
    assert r.returncode == 1 and "node mx9 is not listening on Redis" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_index_is_written_again_after_a_restart_and_after_redis_comes_back_empty(nodes, redis_server):
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    send(A, "ann@site.test", "held at mx1")
    send(B, "bob@site.test", "held at mx2")
    send(B, "carl@site.test", "held at mx2 too")
    assert wait_until(lambda: len(indexed(redis_server, "mx1")) == 1 and len(indexed(redis_server, "mx2")) == 2, 20)
    carl = next(r["id"] for r in cluster_rows(a) if r["recipients_pending"] == ["carl@site.test"])
    b.stop()                                          # its rows stay: what it held when last seen
    redis_server.cli("DEL", "smtpgw:node:mx2")        # as its heartbeat's TTL would, 15s later
    rows = cluster_rows(a)
    assert len(rows) == 3 and {r["node"]: r["stale"] for r in rows} == {"mx1": False, "mx2": True}
    assert "mx2 (gone)" in cli(a, "queue", "list", "--cluster").stdout
    r = cli(b, "queue", "delete", carl)               # on the stopped node's spool
    assert r.returncode == 0, r.stderr
    b.start()                                         # writes its whole index anew: carl is gone
    assert wait_until(lambda: [r["recipients_pending"] for r in indexed(redis_server, "mx2").values()]
                      == [["bob@site.test"]], 20)
    assert sorted(r["recipients_pending"][0] for r in cluster_rows(a)) == ["ann@site.test", "bob@site.test"]
    redis_server.kill()
    redis_server.start()                              # empty: every node writes its index again
    assert wait_until(lambda: redis_server.cli("HLEN", "smtpgw:queue:mx1:0") == "1"
                      and redis_server.cli("HLEN", "smtpgw:queue:mx2:0") == "1", 30)
    assert int(redis_server.cli("TTL", "smtpgw:queue:mx2:0")) > 0      # soft state


def test_a_drained_node_refuses_connections_delivers_and_reports_empty(nodes, peers):
    customer = peers(CUSTOMER)
    customer.set_reply("rcpt", REFUSED)
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    send(B, "dana@far.test", "waits at mx2")
    assert customer.wait_until(lambda: customer.open_connections() == 0 and "dana" in b.log(), 15)
    waiting = subprocess.Popen([*smtpgw_command(), "cluster", "-c", str(a.config_path), "drain", "mx2", "--wait"],
                               env=a.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: "node mx2 draining" in b.log(), 15)
        code, text = greeting(B)
        assert code == 421 and text.startswith("4.3.2 gw.example.test Service not available: draining"), text
        assert greeting(A)[0] == 250                    # the other node is in service
        status = cli(a, "cluster", "status", "--json")
        assert status.returncode == 0, status.stderr
        mx2 = next(n for n in json.loads(status.stdout)["nodes"] if n["node"] == "mx2")
        assert mx2["state"] == "draining" and mx2["queue"] == 1
        customer.set_reply("rcpt", None)                # what it holds goes out
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert "mx2: draining" in out and out.strip().endswith("mx2: drained, its queue is empty; new connections get 421 4.3.2")
    assert [m.recipients for m in customer.messages] == [["dana@far.test"]]
    assert wait_until(lambda: "node mx2 drained: its queue is empty" in b.log(), 5)
    assert greeting(B)[0] == 421                        # drained stays refused until undrain
    r = cli(a, "cluster", "undrain", "mx2")
    assert r.returncode == 0 and "mx2: in service" in r.stdout, r.stdout + r.stderr
    assert greeting(B)[0] == 250
    send(B, "erin@far.test", "after undrain")
    assert customer.wait_for(2, 15)


def all_refused(host: str, tries: int = 6) -> bool:
    """Every one of several new connections answered 421 (with several workers the kernel spreads them)."""
    return all(greeting(host)[0] == 421 for _ in range(tries))


def test_draining_a_single_gateway_of_two_workers_through_its_control_socket(tmp_path, peers):
    sink = peers(CUSTOMER)
    cfg = base_config(tmp_path, listen=f"{A}:{PORT}")
    cfg["gateway"]["workers"] = 2
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{CUSTOMER}]"]
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        assert wait_until(lambda: "control socket listening on" in gw.log() and ".sock.1" in gw.log(), 30)
        r = cli(gw, "cluster", "drain", "--wait", "--timeout", "20")
        assert r.returncode == 0 and "drained, its queue is empty" in r.stdout, r.stdout + r.stderr
        assert wait_until(lambda: all_refused(A), 10)   # worker 1 follows the marker within a second
        assert (tmp_path / "spool" / "draining").exists()
        gw.stop()
        gw.start()                                      # a drained node stays drained across a restart
        assert all_refused(A)
        assert "is draining (since" in gw.log()
        r = cli(gw, "cluster", "resume")
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: all(greeting(A)[0] == 250 for _ in range(6)), 10)
        send(A, "frank@far.test")
        assert sink.wait_for(1, 15)
        r = cli(gw, "cluster", "drain", "mx7")
        assert r.returncode == 1 and "not in a cluster" in r.stderr, r.stderr
    finally:
        gw.stop()


def queued_id(host: str, rcpt: str) -> str:
    """Send one message on its own connection; the queue id from the 250."""
    with smtplib.SMTP(host, PORT, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("alice@example.test")
        s.rcpt(rcpt)
        code, text = s.data(b"Subject: spread\r\n\r\nHello.\r\n")
    assert code == 250
    return text.decode().rsplit(" ", 1)[-1]


def test_a_node_of_two_workers_indexes_both_shares_and_counts_them_in_its_heartbeat(nodes, peers, redis_server):
    from mta.workers.identity import owner_of

    customer = peers(CUSTOMER)
    customer.set_reply("rcpt", REFUSED)
    a = nodes("mx1", A, workers=2)
    assert wait_until(lambda: "worker 1 started" in a.log() and "control.sock.1" in a.log(), 30), a.log()
    ids: set[str] = set()
    for i in range(200):                    # until each worker has taken some
        ids.add(queued_id(A, f"user{i}@far.test"))
        if {owner_of(x, 2) for x in ids} == {0, 1} and len(ids) >= 4:
            break
    assert {owner_of(x, 2) for x in ids} == {0, 1}

    def share(worker: int) -> set[str]:
        return set(redis_server.cli("HKEYS", f"smtpgw:queue:mx1:{worker}").split())

    assert wait_until(lambda: share(0) | share(1) == ids, 20)      # each worker indexes its own share
    assert share(1) == {x for x in ids if owner_of(x, 2) == 1}
    assert wait_until(lambda: redis_server.cli("HGET", "smtpgw:node:mx1", "queue") == str(len(ids)), 15)
    rows = cluster_rows(a)
    assert {r["id"] for r in rows} == ids and {r["state"] for r in rows} <= {"queued", "active", "deferred"}
