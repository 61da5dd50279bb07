"""ETRN against a server we did not write: a private Postfix on 127.0.0.125:25 is the "ISP" that holds
mail for site.test, our gateway on 127.0.0.126:2525 is the "site" that asks for it.

Postfix relays site.test with a transport map to our gateway and keeps a fast-flush log for it
(``fast_flush_domains``), so ``ETRN site.test`` (RFC 1985) makes it deliver what it deferred. It tries
again on its own only once an hour (``queue_run_delay``), so mail that arrives here was released by an
ETRN. ``defer_transports = smtp`` is the classic "hold the dial-up customer's mail until it asks" set-up:
Postfix then delivers to us only after an ETRN, whether we are up or not.
"""
from __future__ import annotations

import email
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gwprocess import REPO, GatewayProcess, base_config, maildir_messages, wait_until
from postfixfixture import PostfixPeer, postfix_available

pytestmark = pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed")

POSTFIX, SITE, SMART, STRANGER = "127.0.0.125", "127.0.0.126", "127.0.0.127", "127.0.0.128"
PORT = 2525
ASKED = f"ETRN site.test at {POSTFIX}:25: 250 Queuing started"


def isp_settings(hold: bool) -> dict[str, str]:
    settings = {
        "myhostname": "mx.isp.test",
        "mydomain": "isp.test",
        "mynetworks": f"127.0.0.1/32, {SITE}/32",
        "relay_domains": "site.test",
        "transport_maps": f"inline:{{site.test=smtp:[{SITE}]:{PORT}}}",
        "fast_flush_domains": "$relay_domains",
        "smtpd_etrn_restrictions": "permit_mynetworks, reject",
        # no retries of its own during a test; a host that refused is thought dead for 1s only
        "queue_run_delay": "1h",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "1h",
    }
    if hold:
        settings["defer_transports"] = "smtp"
    return settings


@pytest.fixture
def isp():
    """Factory: ``isp(hold=False)`` starts the private Postfix; it is stopped however the test ends."""
    started: list[PostfixPeer] = []

    def start(hold: bool = False) -> PostfixPeer:
        peer = PostfixPeer(POSTFIX, 25, isp_settings(hold), relay_host=SITE, relay_port=PORT)
        started.append(peer)
        return peer.start()

    yield start
    for peer in started:
        peer.stop()


@pytest.fixture
def site(tmp_path):
    """Factory: ``site(etrn=..., smart_host=...)`` starts our gateway for site.test; stopped after."""
    started: list[GatewayProcess] = []

    def start(**kw) -> GatewayProcess:
        gw = GatewayProcess(tmp_path, site_config(tmp_path, **kw))
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def site_config(tmp: Path, etrn: dict | None = None, smart_host: str | None = None) -> dict:
    cfg = base_config(tmp, listen=f"{SITE}:{PORT}")
    cfg["gateway"]["hostname"] = "mail.site.test"
    cfg["gateway"]["local_domains"] = {"site.test": {"maildir": str(tmp / "mail")}}
    cfg["gateway"]["postmaster"] = "postmaster@site.test"
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    if smart_host:
        cfg["connectors"][0]["smart_hosts"] = [smart_host]
    if etrn:
        cfg["connectors"][0]["etrn"] = etrn
    cfg["plugins"] = {"enabled": ["relay_acl", "smart_host", "etrn_dequeue", "diag_logging"], "local": [],
                      "diag_logging": {"levels": {"connection_manager": "minimum", "queuing_engine": "medium",
                                                  "routing_engine": "medium"}}}
    return cfg


def send(host: str, port: int, rcpt: str, subject: str) -> None:
    text = (f"From: alice@isp.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@isp.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.sendmail("alice@isp.test", [rcpt], text)


def arrived(gw: GatewayProcess, mailbox: str = "bob") -> list[str]:
    return [email.message_from_bytes(m)["Subject"] for m in maildir_messages(gw.tmp / "mail", mailbox)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta.cli.main", "etrn", *args], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))


def test_smtpgw_etrn_makes_postfix_deliver_its_deferred_mail(isp, site):
    postfix = isp()
    send(POSTFIX, 25, "bob@site.test", "deferred by postfix")
    assert wait_until(lambda: "Connection refused" in postfix.postqueue())     # we are down: deferred
    gw = site()

    refused = run_cli("--server", POSTFIX, "--source", STRANGER, "site.test")   # not in mynetworks
    assert refused.returncode == 1
    assert refused.stdout.startswith("ETRN site.test: 554 5.7.1 ")
    other = run_cli("--server", POSTFIX, "other.test")                          # not a fast-flush domain
    assert other.returncode == 1
    assert other.stdout.strip() == "ETRN other.test: 459 <other.test>: service unavailable"
    assert len(postfix.queue_ids()) == 1 and arrived(gw) == []

    done = run_cli("--server", POSTFIX, "site.test")
    assert (done.returncode, done.stdout.strip()) == (0, "ETRN site.test: 250 Queuing started"), done.stderr
    assert wait_until(lambda: arrived(gw) == ["deferred by postfix"])
    received = email.message_from_bytes(maildir_messages(gw.tmp / "mail", "bob")[0]).get_all("Received")
    assert "by mail.site.test" in received[0] and "by mx.isp.test (Postfix)" in received[1]
    assert wait_until(lambda: postfix.queue_ids() == [])


def test_connector_etrn_at_start_up_and_on_schedule(isp, site):
    postfix = isp(hold=True)
    send(POSTFIX, 25, "bob@site.test", "held before we started")
    assert wait_until(lambda: "(deferred transport)" in postfix.postqueue())
    gw = site(etrn={"server": f"[{POSTFIX}]", "domains": ["site.test"], "schedule": "every 2s"})
    assert wait_until(lambda: arrived(gw) == ["held before we started"])        # the request at start-up
    assert wait_until(lambda: ASKED in gw.log())        # logged after QUIT: the mail may come first

    send(POSTFIX, 25, "bob@site.test", "held while we run")                     # Postfix holds it ...
    assert wait_until(lambda: len(arrived(gw)) == 2, timeout=20)                # ... until the next ETRN
    assert sorted(arrived(gw)) == ["held before we started", "held while we run"]
    assert wait_until(lambda: gw.log().count(ASKED) >= 2)
    assert wait_until(lambda: postfix.queue_ids() == [])


def test_the_link_coming_back_asks_at_once(isp, site, peers):
    """No schedule: after the request at start-up, the next one comes when a delivery through the
    connector succeeds after connection failures -- the dial-up link is back."""
    postfix = isp(hold=True)
    gw = site(smart_host=f"[{SMART}]", etrn={"server": f"[{POSTFIX}]", "domains": ["site.test"]})
    assert wait_until(lambda: ASKED in gw.log())                                # at start-up: nothing yet
    send(POSTFIX, 25, "bob@site.test", "waiting at the isp")
    assert wait_until(lambda: "(deferred transport)" in postfix.postqueue())

    send(SITE, PORT, "carol@elsewhere.test", "outgoing")                         # our smart host is down
    assert wait_until(lambda: "message deferred" in gw.log() and "4.4.1" in gw.log())
    assert arrived(gw) == [] and gw.log().count(ASKED) == 1

    smart = peers(SMART)                                                         # the link comes back
    assert smart.wait_for(1, timeout=20)
    assert wait_until(lambda: arrived(gw) == ["waiting at the isp"], timeout=20)
    assert wait_until(lambda: gw.log().count(ASKED) == 2)      # logged after QUIT, maybe after the mail
    log = gw.log()
    back = log.index("connector Internet SMTP connector: the link is back")
    assert log.count(ASKED) == 2 and log.index(ASKED) < back < log.rindex(ASKED)


def test_a_trigger_program_instead_of_an_smtp_command(isp, site):
    """``etrn.run``: for an ISP that dequeues on something else than ETRN, the gateway runs a program.
    Here it is Postfix's own command-line equivalent of ETRN, ``postqueue -s site``."""
    postfix = isp(hold=True)
    send(POSTFIX, 25, "bob@site.test", "first")
    assert wait_until(lambda: "(deferred transport)" in postfix.postqueue())
    gw = site(etrn={"server": f"[{POSTFIX}]", "domains": ["site.test"],
                    "run": ["postqueue", "-c", postfix.config_dir, "-s", "{domain}"]})
    assert wait_until(lambda: arrived(gw) == ["first"])
    # logged when the program has exited; Postfix may have delivered before that
    assert wait_until(lambda: "postqueue site.test: 250 2.0.0 postqueue exited 0" in gw.log()), gw.log()

    send(POSTFIX, 25, "bob@site.test", "second")                     # the same from a link-up script
    assert wait_until(lambda: "(deferred transport)" in postfix.postqueue())
    done = run_cli("-c", str(gw.config_path), "--connector", "Internet SMTP connector")
    assert (done.returncode, done.stdout.strip()) == (0, "postqueue site.test: 250 2.0.0 postqueue exited 0")
    assert wait_until(lambda: sorted(arrived(gw)) == ["first", "second"])


# -- the other way round: Postfix relays into our gateway, which holds the mail until an ETRN ------------

def read_reply(sock) -> list[bytes]:
    """One whole SMTP reply, line by line, as the bytes came."""
    data = b""
    while True:
        lines = data.split(b"\r\n")
        done = lines[:-1]
        if done and len(done[-1]) >= 4 and done[-1][3:4] == b" ":
            return [line + b"\r\n" for line in done]
        more = sock.recv(4096)
        assert more, f"connection closed after {data!r}"
        data += more


def test_postfix_relays_into_our_held_queue_and_etrn_releases_it(isp, peers, tmp_path):
    import socket

    site_peer = peers(SMART)
    cfg = base_config(tmp_path, listen=f"{SITE}:{PORT}")
    cfg["gateway"]["hostname"] = "mx.isp2.test"
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"].append({"name": "Site queue", "address_spaces": ["site.test"],
                              "smart_hosts": [f"[{SMART}]"],
                              "delivery": {"remote_triggered": True,
                                           "authorized": [{"network": f"{STRANGER}/32"}]}})
    cfg["plugins"]["enabled"] = ["relay_acl", "smart_host", "etrn_dequeue", "diag_logging"]
    gw = GatewayProcess(tmp_path, cfg).start()
    try:
        isp()                                               # Postfix relays site.test to us at once
        send(POSTFIX, 25, "bob@site.test", "through postfix")
        assert wait_until(lambda: "waiting for ETRN/ATRN for site.test" in gw.log())
        with socket.create_connection((SITE, PORT), timeout=10, source_address=(STRANGER, 0)) as s:
            assert read_reply(s)[0].startswith(b"220 ")
            s.sendall(b"EHLO client.test\r\n")
            assert b"ETRN\r\n" in [line[4:] for line in read_reply(s)]
            s.sendall(b"ETRN site.test\r\n")
            assert read_reply(s) == [b"250 2.0.0 Queuing for node site.test started\r\n"]
            s.sendall(b"ETRN other.test\r\n")
            assert read_reply(s) == [b"459 5.7.1 Node other.test not allowed: "
                                     b"no mail is held here for it\r\n"]
            s.sendall(b"QUIT\r\n")
            assert read_reply(s)[0].startswith(b"221 ")
        assert site_peer.wait_for(1)
        assert b"by mx.isp.test (Postfix)" in site_peer.messages[0].data
    finally:
        gw.stop()
