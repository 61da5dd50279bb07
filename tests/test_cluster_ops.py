"""Operating a cluster (``gateway.cluster``) on a real ``redis-server`` with two ``twistd`` nodes on
127.0.0.181/.182 and a recording peer on .183: bulk queue actions on every node (``--domain D
--cluster``, ``--all --cluster``) with a node that does not answer named and exit 1; Redis going away
seen in the metrics, the log (once) and ``smtpgw cluster status`` (one line, what to do), and
``NODE:ID`` naming this node still working meanwhile."""
from __future__ import annotations

import json
import re
import urllib.request

from gwprocess import wait_until
from test_cluster import A, B, CUSTOMER, HELD, send
from test_cluster_queue import REFUSED, cli, local_ids, nodes  # noqa: F401

METRICS = f"http://{A}:9125/metrics"


def deferred_everywhere(a, b, customer) -> None:
    customer.set_reply("rcpt", lambda rcpt: REFUSED if rcpt.startswith("later") else None)
    send(A, "later1@far.test", "deferred at mx1")
    send(B, "later2@far.test", "deferred at mx2")
    send(B, "bob@site.test", "held at mx2")
    assert wait_until(lambda: HELD in b.log(), 15)
    assert wait_until(lambda: a.log().count(REFUSED) >= 1 and b.log().count(REFUSED) >= 1, 20)


def test_bulk_actions_act_on_every_node_and_name_one_that_does_not_answer(nodes, peers):
    customer = peers(CUSTOMER)
    a = nodes("mx1", A)
    b = nodes("mx2", B)
    deferred_everywhere(a, b, customer)

    held = cli(a, "queue", "hold", "--domain", "far.test", "--cluster")
    assert held.returncode == 0, held.stdout + held.stderr
    assert re.search(r"^mx1:\w+: held$", held.stdout, re.M) and re.search(r"^mx2:\w+: held$", held.stdout, re.M)
    assert "(on 2 nodes: mx1, mx2)" in held.stdout
    for gw in (a, b):
        far = [e for e in local_ids(gw).values() if e["recipients_pending"][0].endswith("@far.test")]
        assert len(far) == 1 and far[0]["held"] is True
    site = [e for e in local_ids(b).values() if e["recipients_pending"] == ["bob@site.test"]]
    assert not site[0]["held"]                                      # --domain chose far.test only

    as_json = cli(a, "queue", "release", "--domain", "far.test", "--cluster", "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert sorted(r["id"].split(":")[0] for r in doc["results"]) == ["mx1", "mx2"]
    assert all(r["result"] == "done" for r in doc["results"])

    gone = cli(a, "queue", "delete", "--all", "--cluster")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert gone.stdout.count(": deleted; no report sent") == 3
    assert not local_ids(a) and not local_ids(b)

    send(A, "later3@far.test", "deferred at mx1 again")
    assert wait_until(lambda: a.log().count(REFUSED) >= 2, 20)
    b.stop()                                    # its heartbeat still shows it up: it is asked, and cannot answer
    r = cli(a, "queue", "retry", "--all", "--cluster")
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^mx1:\w+: will be attempted now$", r.stdout, re.M)       # the node that answered acted
    assert "node mx2 did not act: node mx2 is not listening on Redis" in r.stderr
    assert "Traceback" not in r.stderr
    usage = cli(a, "queue", "hold", "--cluster", "mx1:0123")
    assert usage.returncode == 2 and "--cluster goes with --domain D or --all" in usage.stderr


def metric(name: str) -> float | None:
    text = urllib.request.urlopen(METRICS, timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_redis_down_shows_in_metrics_log_and_status_and_node_id_of_this_node_still_works(
        nodes, peers, redis_server):
    customer = peers(CUSTOMER)
    customer.set_reply("rcpt", lambda rcpt: REFUSED)
    a = nodes("mx1", A, metrics=f"{A}:9125")
    send(A, "later@far.test", "deferred at mx1")
    assert wait_until(lambda: REFUSED in a.log(), 20)
    assert wait_until(lambda: metric("smtpgw_cluster_queue_index_synced") == 1.0, 40)
    assert metric("smtpgw_cluster_redis_up") == 1.0 and metric("smtpgw_cluster_redis_outages_total") == 0.0
    assert metric('smtpgw_node_state{state="up"}') == 1.0
    (entry_id,) = local_ids(a)

    redis_server.kill()
    assert wait_until(lambda: "runs on its own, with local limits (degraded)" in a.log(), 15)
    assert metric("smtpgw_cluster_redis_up") == 0.0 and metric("smtpgw_cluster_redis_outages_total") == 1.0
    status = cli(a, "cluster", "status")
    assert status.returncode == 1 and status.stdout == ""
    lines = status.stderr.strip().splitlines()
    assert len(lines) == 1, status.stderr
    assert "does not answer since" in lines[0] and "degraded" in lines[0]
    assert "check that Redis runs" in lines[0] and "registers again by itself" in lines[0]

    # NODE:ID naming this node goes to the local control socket, Redis or not
    held = cli(a, "queue", "hold", f"mx1:{entry_id[:12]}")
    assert held.returncode == 0 and f"mx1:{entry_id}: held" in held.stdout, held.stdout + held.stderr
    shown = cli(a, "queue", "show", f"mx1:{entry_id}")
    assert shown.returncode == 0 and "node:        mx1" in shown.stdout, shown.stderr
    other = cli(a, "queue", "hold", "mx2:0123")                 # another node's needs Redis: said so
    assert other.returncode == 1 and "does not answer" in other.stderr

    redis_server.start()
    assert wait_until(lambda: metric("smtpgw_cluster_redis_up") == 1.0, 40)
    assert wait_until(lambda: "is back; node mx1 registered again" in a.log(), 10)
    assert wait_until(lambda: metric("smtpgw_cluster_queue_index_synced") == 1.0, 40)
    assert entry_id in redis_server.cli("HKEYS", "smtpgw:queue:mx1:0")        # resynced into the empty Redis
    assert a.log().count("(degraded)") == 1 and a.log().count("is back; node mx1") == 1
