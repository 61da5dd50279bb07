"""Connector content and delivery restrictions end to end: twistd smtpgw on 127.0.0.80:2526, a client
in relay.allow (127.0.0.88), connectors by address space to recording peers -- 127.0.0.84 for the
restricted connectors, 127.0.0.85/86 for a cheap size-limited connector and its dearer fail-over,
127.0.0.87 for remote.test. Refusals the session can make come in the session (no report);
the rest come back as a DSN, and nothing reaches a connector that may not carry it."""
from __future__ import annotations

import email
import smtplib
import uuid
from pathlib import Path

import pytest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until
from peers import SMTPPeer

GW_HOST, GW_PORT = "127.0.0.80", 2526
CLIENT = "127.0.0.88"
RESTRICTED, CHEAP, DEAR, CATCH_ALL = "127.0.0.84", "127.0.0.85", "127.0.0.86", "127.0.0.87"
NO_DNS = "127.0.0.87:53"

SMALL = "Subject: small\r\n\r\nhello\r\n"
BIG = "Subject: big\r\n\r\n" + ("y" * 998 + "\r\n") * 20          # ~20 KB, over the 10KB limits


def connector(name: str, domain: str, host: str, cost: int = 1, **restrictions) -> dict:
    return {"name": name, "address_spaces": [{"domain": domain, "cost": cost}], "smart_hosts": [f"[{host}]"],
            "bridgeheads": ["Default SMTP Virtual Server"], **restrictions}


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.peers = {ip: SMTPPeer(host=ip, port=25).start() for ip in (RESTRICTED, CHEAP, DEAR, CATCH_ALL)}
        cfg = base_config(tmp, listen=f"{GW_HOST}:{GW_PORT}")
        cfg["gateway"]["dns"]["nameservers"] = [NO_DNS]
        cfg["virtual_servers"][0]["relay"]["allow"] = [f"{CLIENT}/32"]
        cfg["connectors"] = [
            # not "*": a less specific connector is a fail-over route that would carry what the
            # restricted ones refuse (see test_less_specific_connector_carries_what_a_restricted_one_refuses)
            connector("Internet", "remote.test", CATCH_ALL),
            connector("Small", "small.test", RESTRICTED, content_restrictions={"max_message_size": "10KB"}),
            connector("Quiet", "prio.test", RESTRICTED,
                      content_restrictions={"allowed_priorities": ["normal", "low"]}),
            connector("NoReports", "nosys.test", RESTRICTED,
                      content_restrictions={"allowed_types": ["non-system"]}),
            connector("Expensive", "restricted.test", RESTRICTED,
                      delivery_restrictions={"default": "reject",
                                             "except": ["boss@example.test", "@partner.test"]}),
            connector("Blocking", "blocked.test", RESTRICTED,
                      delivery_restrictions={"default": "accept", "except": ["spammer@example.test"]}),
            connector("Cheap", "failover.test", CHEAP, 1, content_restrictions={"max_message_size": "10KB"}),
            connector("Dear", "failover.test", DEAR, 2),
            connector("Narrow", "sub.wide.test", CHEAP, content_restrictions={"max_message_size": "10KB"}),
            connector("Wide", "*.wide.test", DEAR),
        ]
        self.gw = GatewayProcess(tmp, cfg).start()

    def stop(self) -> None:
        self.gw.stop()
        for p in self.peers.values():
            p.stop()

    def send(self, sender: str, rcpts: list[str], data: str, mail_params: str = ""):
        """MAIL/RCPT/DATA as written (no SIZE unless given): (MAIL code, RCPT codes, DATA reply)."""
        with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30, source_address=(CLIENT, 0)) as s:
            s.ehlo("client.test")
            mail = s.docmd("MAIL", f"FROM:<{sender}>{mail_params}")[0]
            codes = [s.docmd("RCPT", f"TO:<{r}>") for r in rcpts]
            final = s.data(data) if any(c == 250 for c, _ in codes) else (None, b"")
        return mail, codes, final

    def received(self, ip: str, rcpt: str) -> list:
        return [m for m in self.peers[ip].messages if rcpt in m.recipients]

    def drain(self) -> None:
        """Relay one message through the catch-all and wait for an empty queue."""
        name = f"barrier-{uuid.uuid4().hex[:8]}@remote.test"
        assert self.send("alice@example.test", [name], SMALL)[2][0] == 250
        assert wait_until(lambda: self.received(CATCH_ALL, name))
        root = self.tmp / "spool"
        assert wait_until(lambda: not any(p.is_file() and p.parent.name not in ("tmp", "corrupt") and p.suffix != ".lock"
                                          for p in root.rglob("*")))

    def mailbox(self, name: str) -> list[bytes]:
        return maildir_messages(self.tmp / "mail", name)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("restrictions_e2e"))
    yield s
    s.stop()


def reports_to(site: Site, mailbox: str, about: str) -> list[bytes]:
    return [m for m in site.mailbox(mailbox) if about.encode() in m]


# -- content restrictions: size ------------------------------------------------------------------

def test_declared_size_is_refused_at_rcpt(site):
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30, source_address=(CLIENT, 0)) as s:
        s.ehlo("client.test")
        assert s.docmd("MAIL", "FROM:<alice@example.test> SIZE=20000")[0] == 250
        code, text = s.docmd("RCPT", "TO:<declared@small.test>")
        assert (code, text[:5]) == (552, b"5.3.4") and b"connector Small" in text
        assert s.docmd("RCPT", "TO:<carol@example.test>")[0] == 250          # local: no connector


def test_big_message_refused_at_end_of_data_without_backscatter(site):
    mail, rcpts, (code, text) = site.send("alice@example.test", ["big1@small.test"], BIG)
    assert rcpts[0][0] == 250
    assert (code, text[:5]) == (552, b"5.3.4")
    site.drain()
    assert site.received(RESTRICTED, "big1@small.test") == []
    assert reports_to(site, "alice", "big1@small.test") == []


def test_partly_refused_message_is_delivered_where_it_may_go_and_reported(site):
    _, _, (code, _) = site.send("alice@example.test", ["big2@small.test", "carol@example.test"], BIG)
    assert code == 250
    assert wait_until(lambda: any(b"Subject: big" in m for m in site.mailbox("carol")))
    assert wait_until(lambda: reports_to(site, "alice", "big2@small.test"))
    report = reports_to(site, "alice", "big2@small.test")[0]
    assert b"5.3.4" in report and b"connector Small" in report
    site.drain()
    assert site.received(RESTRICTED, "big2@small.test") == []


def test_small_message_goes_through(site):
    _, _, (code, _) = site.send("alice@example.test", ["fits@small.test"], SMALL)
    assert code == 250
    assert wait_until(lambda: site.received(RESTRICTED, "fits@small.test"))


def test_size_restriction_fails_over_to_the_dearer_connector(site):
    assert site.send("alice@example.test", ["big@failover.test"], BIG)[2][0] == 250
    assert site.send("alice@example.test", ["small@failover.test"], SMALL)[2][0] == 250
    assert wait_until(lambda: site.received(DEAR, "big@failover.test"))
    assert wait_until(lambda: site.received(CHEAP, "small@failover.test"))
    site.drain()
    assert site.received(CHEAP, "big@failover.test") == []
    assert reports_to(site, "alice", "big@failover.test") == []


def test_less_specific_connector_carries_what_a_restricted_one_refuses(site):
    assert site.send("alice@example.test", ["big@sub.wide.test"], BIG)[2][0] == 250
    assert wait_until(lambda: site.received(DEAR, "big@sub.wide.test"))
    assert site.received(CHEAP, "big@sub.wide.test") == []


# -- content restrictions: priority and type -----------------------------------------------------

@pytest.mark.parametrize("header", ["X-Priority: 1 (Highest)", "Importance: high", "Priority: urgent"])
def test_high_priority_refused_at_end_of_data(site, header):
    rcpt = f"urgent-{uuid.uuid4().hex[:6]}@prio.test"
    _, _, (code, text) = site.send("alice@example.test", [rcpt], f"{header}\r\n{SMALL}")
    assert (code, text[:5]) == (550, b"5.7.1") and b"high-priority" in text
    site.drain()
    assert site.received(RESTRICTED, rcpt) == []
    assert reports_to(site, "alice", rcpt) == []


def test_low_priority_goes_through(site):
    _, _, (code, _) = site.send("alice@example.test", ["calm@prio.test"], f"Importance: low\r\n{SMALL}")
    assert code == 250
    assert wait_until(lambda: site.received(RESTRICTED, "calm@prio.test"))


def test_null_sender_refused_at_rcpt_when_system_messages_are_not_allowed(site):
    mail, [(code, text)], _ = site.send("", ["report@nosys.test"], SMALL)
    assert mail == 250 and (code, text[:5]) == (550, b"5.7.1") and b"system messages" in text
    _, [(code, _)], (data_code, _) = site.send("alice@example.test", ["person@nosys.test"], SMALL)
    assert (code, data_code) == (250, 250)
    assert wait_until(lambda: site.received(RESTRICTED, "person@nosys.test"))


def test_our_own_reports_are_not_sent_through_a_connector_refusing_system_messages(site):
    # bob@nosys.test's message is partly refused (too big for Small); the report to him would need
    # the NoReports connector, which does not carry system messages: the postmaster gets the copy.
    _, _, (code, _) = site.send("bob@nosys.test", ["big3@small.test", "dave@example.test"], BIG)
    assert code == 250
    assert wait_until(lambda: site.mailbox("dave"))
    assert wait_until(lambda: reports_to(site, "postmaster", "bob@nosys.test"))
    site.drain()
    assert site.received(RESTRICTED, "bob@nosys.test") == []
    assert site.received(RESTRICTED, "big3@small.test") == []


# -- delivery restrictions -----------------------------------------------------------------------

@pytest.mark.parametrize("sender, rcpt, allowed", [
    ("boss@example.test", "r1@restricted.test", True),
    ("someone@partner.test", "r2@restricted.test", True),
    ("clerk@example.test", "r3@restricted.test", False),
    ("spammer@example.test", "r4@blocked.test", False),
    ("clerk@example.test", "r5@blocked.test", True),
])
def test_delivery_restrictions_at_rcpt(site, sender, rcpt, allowed):
    _, [(code, text), (local, _)], final = site.send(sender, [rcpt, "erin@example.test"], SMALL)
    assert local == 250
    assert final[0] == 250                                 # the local recipient is never restricted
    if allowed:
        assert code == 250
        assert wait_until(lambda: site.received(RESTRICTED, rcpt))
    else:
        assert (code, text[:5]) == (550, b"5.7.1") and sender.encode() in text
        site.drain()
        assert site.received(RESTRICTED, rcpt) == []
        assert reports_to(site, sender.split("@")[0], rcpt) == []


def test_diag_log_says_why(site):
    site.send("clerk@example.test", ["why@restricted.test"], SMALL)
    assert wait_until(lambda: "recipient=why@restricted.test decision=deny" in site.gw.log())
    log = site.gw.log()
    assert "delivery_restrictions of connector Expensive refuse sender <clerk@example.test>" in log
    assert "decision=dsn" in log                           # the partly refused message
    assert "decision=skip connector" in log                 # Cheap skipped for the big message
    parsed = email.message_from_bytes(reports_to(site, "alice", "big2@small.test")[0])
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
