"""Remote-triggered delivery end to end: an "ISP" gateway holding mail for site.test (127.0.0.120), a
"site" gateway asking for it (127.0.0.121), recording peers on 127.0.0.122-.129, as real twistd
processes on loopback. ETRN (RFC 1985), a site DEQUEUE command, the scheduled client request, the
`smtpgw etrn` command, ATRN role reversal (RFC 2645) and expiry of held mail."""
from __future__ import annotations

import base64
import email
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gwprocess import REPO, GatewayProcess, base_config, maildir_messages, wait_until

ISP, SITE = "127.0.0.120", "127.0.0.121"
PEER, STRANGER = "127.0.0.122", "127.0.0.123"
PORT = 2525
HELD = "is remote-triggered; waiting for ETRN/ATRN for site.test"


def isp_config(tmp: Path, smart_host: str = f"[{PEER}]", **delivery) -> dict:
    cfg = base_config(tmp, listen=f"{ISP}:{PORT}")
    cfg["gateway"]["hostname"] = "mx.isp.test"
    cfg["gateway"]["local_domains"] = {"isp.test": {"maildir": str(tmp / "mail")}}
    cfg["gateway"]["postmaster"] = "postmaster@isp.test"
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"] = [
        {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}], "smart_hosts": [f"[{PEER}]"]},
        {"name": "Site queue", "address_spaces": ["site.test", "*.site.test"], "smart_hosts": [smart_host],
         "delivery": {"remote_triggered": True,
                      "authorized": [{"network": f"{SITE}/32"}, {"account": "site"}], **delivery}},
    ]
    cfg["plugins"] = {"enabled": ["relay_acl", "smart_host", "etrn_dequeue", "diag_logging"], "local": [],
                      "etrn_dequeue": {"rate_limit": {"requests": 3, "per": "1m"}},
                      "diag_logging": {"levels": {"routing_engine": "medium", "queuing_engine": "medium",
                                                  "connection_manager": "minimum"}}}
    return cfg


def site_config(tmp: Path, etrn: dict) -> dict:
    cfg = base_config(tmp, listen=f"{SITE}:{PORT}")
    cfg["gateway"]["hostname"] = "mail.site.test"
    cfg["gateway"]["local_domains"] = {"site.test": {"maildir": str(tmp / "mail")}}
    cfg["gateway"]["postmaster"] = "postmaster@site.test"
    cfg["connectors"][0]["smart_hosts"] = [f"[{ISP}]:{PORT}"]
    cfg["connectors"][0]["etrn"] = etrn
    cfg["plugins"] = {"enabled": ["relay_acl", "smart_host", "etrn_dequeue", "diag_logging"], "local": [],
                      "diag_logging": {"levels": {"connection_manager": "minimum"}}}
    return cfg


@pytest.fixture
def gateways(tmp_path):
    """Factory: ``gateways(name, config)`` starts a twistd gateway in its own folder; all stopped after."""
    started: list[GatewayProcess] = []

    def start(name: str, make, *args, **kw) -> GatewayProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        gw = GatewayProcess(folder, make(folder, *args, **kw))
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def message(subject: str, to: str = "bob@site.test", sender: str = "alice@isp.test") -> str:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@isp.test>\r\n\r\nHello.\r\n")


def submit(rcpts: list[str], subject: str, sender: str = "alice@isp.test") -> None:
    with smtplib.SMTP(ISP, PORT, timeout=30) as s:
        s.sendmail(sender, rcpts, message(subject, rcpts[0], sender))


def command(line: str, source: str, *args: str) -> tuple[int, str]:
    """EHLO then one command from ``source``; its reply."""
    with smtplib.SMTP(ISP, PORT, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        code, text = s.docmd(line, " ".join(args))
        return code, text.decode()


def subjects(peer) -> list[str]:
    return sorted(email.message_from_bytes(m.data)["Subject"] for m in peer.messages)


def held(gw: GatewayProcess, count: int = 1) -> bool:
    return gw.log().count(HELD) >= count


def delivered(gw: GatewayProcess, rcpt: str) -> bool:
    """The mail log's line for ``rcpt``: its outcome is recorded (what the peer saw came first)."""
    return any(f"to=<{rcpt}>" in line and "status=sent" in line for line in gw.log().splitlines())


# -- ETRN on the ISP side ---------------------------------------------------------------------------

def test_held_until_authorized_etrn(gateways, peers):
    peer = peers(PEER)
    isp = gateways("isp", isp_config)
    with smtplib.SMTP(ISP, PORT, timeout=10) as s:
        code, text = s.ehlo("client.test")
        assert s.has_extn("etrn")
    submit(["bob@site.test"], "held one")
    submit(["carol@elsewhere.test"], "not held")
    assert peer.wait_for(1, timeout=30)                               # the Internet connector delivers at once
    assert wait_until(lambda: held(isp))                  # ... the site's mail is held
    assert subjects(peer) == ["not held"]

    code, text = command("ETRN", STRANGER, "site.test")   # not in delivery.authorized
    assert (code, text) == (459, "5.7.1 Node site.test not allowed: client not authorized")
    assert command("ETRN", SITE, "other.test")[0] == 459  # nothing is held for it here
    assert command("ETRN", SITE, "bad domain!")[0] == 501
    assert subjects(peer) == ["not held"]

    code, text = command("ETRN", SITE, "site.test")
    assert (code, text) == (250, "2.0.0 Queuing for node site.test started")
    assert peer.wait_for(2, timeout=30)
    assert subjects(peer) == ["held one", "not held"]
    assert peer.messages[1].recipients == ["bob@site.test"]
    # the peer has the message a moment before the ISP has read its 250 and recorded the recipient as
    # delivered; until then the message is still pending, and another ETRN would release it again (250)
    assert wait_until(lambda: delivered(isp, "bob@site.test")), isp.log()

    # nothing left: 251; a fourth request within the minute is over the limit (3): 458
    assert command("ETRN", SITE, "site.test") == (251, "2.0.0 OK, no messages waiting for node site.test")
    assert command("ETRN", SITE, "site.test")[0] == 458


def test_etrn_subdomains_and_queue_name(gateways, peers):
    peer = peers(PEER)
    isp = gateways("isp", isp_config)
    submit(["a@lab.site.test"], "subdomain")
    assert wait_until(lambda: "waiting for ETRN/ATRN for lab.site.test" in isp.log())
    assert command("ETRN", SITE, "site.test")[0] == 251          # the domain alone is not its subdomain
    assert command("ETRN", SITE, "@site.test")[0] == 250
    assert peer.wait_for(1, timeout=30) and subjects(peer) == ["subdomain"]

    submit(["b@site.test"], "by queue")
    assert wait_until(lambda: held(isp))
    assert command("ETRN", SITE, "#Site queue") == (250, "2.0.0 Queuing for node #Site queue started")
    assert peer.wait_for(2, timeout=30)


def test_held_mail_still_expires_with_a_dsn(gateways, peers):
    peers(PEER)

    def config(tmp):
        cfg = isp_config(tmp)
        cfg["gateway"]["queue"]["expire"] = "2s"
        return cfg

    isp = gateways("isp", config)
    submit(["bob@site.test"], "never collected", sender="alice@isp.test")
    assert wait_until(lambda: maildir_messages(isp.tmp / "mail", "alice"), timeout=20)
    report = maildir_messages(isp.tmp / "mail", "alice")[0]
    assert b"bob@site.test" in report and b"4.4.7" in report


# -- a site's own trigger command -------------------------------------------------------------------

def test_site_dequeue_command_from_local_hook(gateways, peers):
    peer = peers(PEER)

    def config(tmp):
        cfg = isp_config(tmp)
        cfg["plugins"]["local"] = [str(REPO / "etc" / "local_hooks" / "dequeue.py")]
        return cfg

    isp = gateways("isp", config)
    submit(["bob@site.test"], "dequeued")
    assert wait_until(lambda: held(isp))
    assert command("DEQUEUE", STRANGER, "site.test")[0] == 459
    assert command("DEQUEUE", SITE, "site.test") == (250, "2.0.0 Queuing for node site.test started")
    assert peer.wait_for(1, timeout=30)


# -- the client side --------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta.cli.main", "etrn", *args], capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))


def test_cli_etrn_reports_the_reply(gateways, peers):
    peer = peers(PEER)
    isp = gateways("isp", isp_config)
    submit(["bob@site.test"], "by cli")
    assert wait_until(lambda: held(isp))
    refused = run_cli("--server", f"{ISP}:{PORT}", "--source", STRANGER, "site.test")
    assert refused.returncode == 1
    assert "ETRN site.test: 459 5.7.1 Node site.test not allowed" in refused.stdout
    done = run_cli("--server", f"{ISP}:{PORT}", "--source", SITE, "site.test")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ETRN site.test: 250 2.0.0 Queuing for node site.test started"
    assert peer.wait_for(1, timeout=30)
    custom = run_cli("--server", f"{ISP}:{PORT}", "--source", SITE, "--command", "DEQUEUE {domain}",
                     "site.test")
    assert custom.returncode == 1 and "DEQUEUE site.test: 500" in custom.stdout    # no site hook here


def test_scheduled_etrn_brings_the_mail_to_the_site(gateways):
    isp = gateways("isp", isp_config, smart_host=f"[{SITE}]:{PORT}")
    site = gateways("site", site_config, {"server": f"[{ISP}]:{PORT}", "domains": ["site.test"],
                                          "schedule": "every 2s"})
    assert wait_until(lambda: "ETRN site.test at 127.0.0.120:2525: 251" in site.log())   # at start: nothing
    submit(["bob@site.test"], "scheduled")
    assert wait_until(lambda: held(isp))
    assert wait_until(lambda: maildir_messages(site.tmp / "mail", "bob"), timeout=20)
    # logged once the request's connection is closed, which may come after the mail it released
    assert wait_until(lambda: "ETRN site.test at 127.0.0.120:2525: 250" in site.log()), site.log()
    got = email.message_from_bytes(maildir_messages(site.tmp / "mail", "bob")[0])
    assert got["Subject"] == "scheduled"
    assert "by mail.site.test" in got["Received"]


# -- ATRN: the roles reverse on the same connection ---------------------------------------------------

def with_odmr(cfg: dict, tmp: Path, ca) -> dict:
    """The ISP's ODMR listener on port 3366 (STARTTLS required, account ``site`` / ``s3cret``)."""
    from mta.smtp.server.users import hash_password

    cert = ca.issue_cert("mx.isp.test", ISP)
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "isp.pem"))
    users = tmp / "users"
    users.write_text(f"site:{hash_password('s3cret', 'pbkdf2-sha256', i=1000)}\n")
    cfg["virtual_servers"].append({
        "name": "ODMR", "listen": [f"{ISP}:3366"], "odmr": True,
        "tls": {"certificate": str(tmp / "isp.pem"), "key": str(tmp / "isp.pem"), "required": True},
        "auth": {"users": str(users), "required": True}})
    return cfg


def test_atrn_reverses_the_connection_into_the_site_maildir(gateways):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()

    def isp(tmp):
        return with_odmr(isp_config(tmp), tmp, ca)

    isp_gw = gateways("isp", isp)
    with smtplib.SMTP(ISP, 3366, timeout=10) as s:      # ATRN is advertised, mail is not taken here
        s.starttls()
        s.ehlo("client.test")
        assert s.has_extn("atrn") and s.has_extn("auth")
        assert s.docmd("ATRN", "site.test")[0] == 530
        s.login("site", "s3cret")
        assert s.docmd("ATRN", "other.test")[0] == 450
        assert s.docmd("ATRN", "site.test")[0] == 453          # nothing held yet
        assert s.docmd("MAIL", "FROM:<x@site.test>")[0] == 502
    with smtplib.SMTP(ISP, PORT, timeout=10) as s:
        s.ehlo("client.test")
        assert s.docmd("ATRN", "site.test")[0] == 502           # only on the ODMR listener
        assert s.docmd("TURN")[0] == 502                        # TURN is off by default

    submit(["bob@site.test", "carol@site.test"], "via atrn")
    assert wait_until(lambda: held(isp_gw))
    site = gateways("site", site_config, {
        "server": f"[{ISP}]:3366", "domains": ["site.test"], "command": "ATRN",
        "auth": {"username": "site", "password": "s3cret"}, "tls": "required"})
    assert wait_until(lambda: maildir_messages(site.tmp / "mail", "bob")
                      and maildir_messages(site.tmp / "mail", "carol"), timeout=20)
    got = email.message_from_bytes(maildir_messages(site.tmp / "mail", "bob")[0])
    assert got["Subject"] == "via atrn"
    assert "from mx.isp.test" in got["Received"]
    assert wait_until(lambda: "ATRN site.test at 127.0.0.120:3366: 250" in site.log())
    assert wait_until(lambda: not any(p.is_file() and p.parent.name not in ("tmp", "corrupt")
                                      and p.suffix != ".lock" for p in (isp_gw.tmp / "spool").rglob("*")))
