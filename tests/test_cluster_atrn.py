"""ATRN across the nodes of a cluster (``gateway.cluster``): the dial-up site connects to node mx1's
ODMR listener and gets, over that one reversed connection, the mail held at mx1 and at mx2, each
message exactly once; mx2's copies are handed over through Redis (mta/cluster/handover.py) and gone
from its spool. Real ``redis-server``, two ``twistd`` nodes on 127.0.0.181/.182, and the site as a
real gateway on 127.0.0.121 running its scheduled ATRN (the set-up of tests/test_etrn_e2e.py)."""
from __future__ import annotations

import email
import smtplib
import uuid
from pathlib import Path

import pytest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until
from test_etrn_e2e import site_config

A, B = "127.0.0.181", "127.0.0.182"
PORT, ODMR = 2525, 3366
HELD = "is remote-triggered; waiting for ETRN/ATRN for site.test"


def node_config(tmp: Path, host: str, name: str, redis_url: str, ca) -> dict:
    from mta.smtp.server.users import hash_password

    cfg = base_config(tmp, listen=f"{host}:{PORT}")
    cfg["gateway"]["hostname"] = f"{name}.isp.test"
    cfg["gateway"]["cluster"] = {"redis": redis_url, "node": name}
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"] = [
        {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}], "smart_hosts": ["[127.0.0.183]"]},
        {"name": "Site queue", "address_spaces": ["site.test"], "smart_hosts": ["[127.0.0.183]"],
         "delivery": {"remote_triggered": True, "authorized": [{"account": "site"}]}},
    ]
    cert = ca.issue_cert(f"{name}.isp.test", host)
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "node.pem"))
    (tmp / "users").write_text(f"site:{hash_password('s3cret', 'pbkdf2-sha256', i=1000)}\n")
    cfg["virtual_servers"].append({
        "name": "ODMR", "listen": [f"{host}:{ODMR}"], "odmr": True,
        "tls": {"certificate": str(tmp / "node.pem"), "key": str(tmp / "node.pem"), "required": True},
        "auth": {"users": str(tmp / "users"), "required": True}})
    cfg["plugins"]["enabled"] = ["relay_acl", "smart_host", "etrn_dequeue", "diag_logging"]
    return cfg


@pytest.fixture
def cluster(tmp_path, redis_server):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    started: list[GatewayProcess] = []

    def start(name: str, make) -> GatewayProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        gw = GatewayProcess(folder, make(folder))
        started.append(gw)
        return gw.start()

    def node(name: str, host: str, workers: int = 1) -> GatewayProcess:
        def make(tmp: Path) -> dict:
            cfg = node_config(tmp, host, name, redis_server.url, ca)
            cfg["gateway"]["workers"] = workers
            return cfg
        return start(name, make)

    start.node = node
    yield start
    for gw in started:
        gw.stop()


def hold(host: str, gw: GatewayProcess, subject: str) -> str:
    mid = f"<{uuid.uuid4().hex}@isp.test>"
    with smtplib.SMTP(host, PORT, timeout=30) as s:
        s.sendmail("alice@isp.test", ["bob@site.test"],
                   f"From: alice@isp.test\r\nTo: bob@site.test\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n\r\nHi.\r\n")
    return mid


def queued_files(gw: GatewayProcess) -> list[Path]:
    return [p for p in (gw.tmp / "spool" / "queue").iterdir() if p.is_file()]


def test_atrn_at_one_node_carries_the_mail_held_at_the_other(cluster, redis_server):
    mx1 = cluster.node("mx1", A)
    mx2 = cluster.node("mx2", B)
    assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 15)
    sent = [hold(B, mx2, "held at mx2, one"), hold(B, mx2, "held at mx2, two"), hold(A, mx1, "held at mx1")]
    assert wait_until(lambda: mx2.log().count(HELD) >= 2 and HELD in mx1.log(), 20)

    site = cluster("site", lambda tmp: site_config(tmp, {
        "server": f"[{A}]:{ODMR}", "domains": ["site.test"], "command": "ATRN",
        "auth": {"username": "site", "password": "s3cret"}, "tls": "required"}))
    mail = site.tmp / "mail"
    assert wait_until(lambda: len(maildir_messages(mail, "bob")) >= 3, 40)
    got = sorted(email.message_from_bytes(m)["Message-ID"] for m in maildir_messages(mail, "bob"))
    assert got == sorted(sent)                                  # every message, each exactly once
    assert wait_until(lambda: f"ATRN site.test at {A}:{ODMR}: 250" in site.log(), 20)
    assert site.log().count(f"ATRN site.test at {A}:{ODMR}: 250") == 1     # over the one connection
    assert mx2.log().count("handed over to node as mx1:") == 2
    assert mx1.log().count("taken over from node mx2:") == 2
    assert wait_until(lambda: not queued_files(mx2) and not queued_files(mx1), 20)
    assert redis_server.cli("KEYS", "smtpgw:transfer:*") == ""                 # no payload left behind


def test_atrn_while_the_other_node_is_down_delivers_what_this_node_holds(cluster, redis_server):
    mx1 = cluster.node("mx1", A)
    mx2 = cluster.node("mx2", B)
    assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 15)
    mine = hold(A, mx1, "held at mx1")
    theirs = hold(B, mx2, "held at mx2")
    assert wait_until(lambda: HELD in mx1.log() and HELD in mx2.log(), 20)
    mx2.kill9()                                     # its heartbeat lapses; ATRN does not wait for it long

    site = cluster("site", lambda tmp: site_config(tmp, {
        "server": f"[{A}]:{ODMR}", "domains": ["site.test"], "command": "ATRN",
        "auth": {"username": "site", "password": "s3cret"}, "tls": "required"}))
    mail = site.tmp / "mail"
    assert wait_until(lambda: len(maildir_messages(mail, "bob")) >= 1, 40)
    assert [email.message_from_bytes(m)["Message-ID"] for m in maildir_messages(mail, "bob")] == [mine]
    assert len([p for p in queued_files(mx2) if "." not in p.name]) == 1     # mx2's waits on its disk
    mx2.start()                                         # and goes at the next ATRN

    def atrn_by_hand() -> int:
        """453 (no mail) until mx2 is back in the cluster with its queue loaded, then 250."""
        with smtplib.SMTP(A, ODMR, timeout=30) as s:
            s.starttls()
            s.ehlo("client.site.test")
            s.login("site", "s3cret")
            return s.docmd("ATRN", "site.test")[0]

    assert wait_until(lambda: atrn_by_hand() == 250, 40)
    assert wait_until(lambda: "handed over to node as mx1:" in mx2.log(), 20)


def mark_handing(gw: GatewayProcess, entry_id: str) -> None:
    """What a stop between the other node's storing a copy and this node's removing its own leaves:
    the entry's state with its ``handing_to`` mark (mta/queue/manager.py ``_send_away``)."""
    import json

    from mta.spool.store import STATE_MAGIC

    path = gw.tmp / "spool" / "queue" / f"{entry_id}.st"
    doc = json.loads(path.read_bytes()[len(STATE_MAGIC):])
    doc.setdefault("extra", {})["handing_to"] = True
    path.write_bytes(STATE_MAGIC + json.dumps(doc).encode("ascii") + b"\n")


def test_a_hand_over_cut_short_by_a_stop_is_settled_at_the_next_start(cluster, redis_server):
    mx2 = cluster.node("mx2", B)
    hold(B, mx2, "taken by mx1 before the stop")
    hold(B, mx2, "never taken")
    assert wait_until(lambda: mx2.log().count(HELD) >= 2, 20)
    mx2.stop()
    taken, kept = sorted(p.name for p in queued_files(mx2) if "." not in p.name)
    mark_handing(mx2, taken)
    mark_handing(mx2, kept)
    redis_server.cli("SET", f"smtpgw:handed:mx2:{taken}", "mx1:0123456789abcdef01234567")
    mx2.start()
    assert wait_until(lambda: f"queue {taken}: the other node had taken it over before a stop" in mx2.log(), 20)
    left = [p.name for p in queued_files(mx2) if "." not in p.name]
    assert left == [kept]                                               # removed here: mx1 has it
    assert wait_until(lambda: b"handing_to" not in (mx2.tmp / "spool" / "queue" / f"{kept}.st").read_bytes(), 10)


def test_atrn_collects_from_every_worker_of_every_node(cluster, redis_server):
    """Both nodes run two workers: mx2's workers each hand their share over (its worker 0 asks the
    other), to whichever of mx1's workers holds the connection (mx1's worker 0 passes them on)."""
    from mta.workers.identity import owner_of

    mx1 = cluster.node("mx1", A, workers=2)
    mx2 = cluster.node("mx2", B, workers=2)
    assert wait_until(lambda: "control.sock.1" in mx1.log() and "control.sock.1" in mx2.log(), 30)
    assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 15)
    sent: dict[str, str] = {}
    for i in range(100):
        with smtplib.SMTP(B, PORT, timeout=30) as s:            # one per connection: both workers get some
            mid = f"<{uuid.uuid4().hex}@isp.test>"
            s.ehlo("client.test")
            s.mail("alice@isp.test")
            s.rcpt("bob@site.test")
            code, text = s.data(f"To: bob@site.test\r\nSubject: {i}\r\nMessage-ID: {mid}\r\n\r\nHi.\r\n")
        assert code == 250
        sent[text.decode().rsplit(" ", 1)[-1]] = mid
        if len(sent) >= 3 and {owner_of(q, 2) for q in sent} == {0, 1}:
            break
    assert wait_until(lambda: mx2.log().count(HELD) >= len(sent), 20)

    site = cluster("site", lambda tmp: site_config(tmp, {
        "server": f"[{A}]:{ODMR}", "domains": ["site.test"], "command": "ATRN",
        "auth": {"username": "site", "password": "s3cret"}, "tls": "required"}))
    mail = site.tmp / "mail"
    assert wait_until(lambda: len(maildir_messages(mail, "bob")) >= len(sent), 40)
    got = sorted(email.message_from_bytes(m)["Message-ID"] for m in maildir_messages(mail, "bob"))
    assert got == sorted(sent.values())                                       # each exactly once
    assert wait_until(lambda: not [p for p in queued_files(mx2) if "." not in p.name], 20)
