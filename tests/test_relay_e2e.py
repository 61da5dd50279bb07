"""The relay tricks end to end: twistd smtpgw on 127.0.0.80, clients from 127.0.0.88 (in relay.allow)
and 127.0.0.89 (not), recording peers wherever a trick could send mail -- the catch-all smart host
(127.0.0.81), the host an address literal names (127.0.0.82) and the smart host of other.example
(127.0.0.83). After each trick a barrier message is relayed and the spool drained: then nothing may
have reached any peer but the barriers, and nothing may wait in the queue."""
from __future__ import annotations

import smtplib
import socket
import uuid
from pathlib import Path

import pytest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until
from peers import SMTPPeer

GW_HOST, GW_PORT = "127.0.0.80", 2525
V6_TRUSTING, V6_STRICT = 2580, 2581           # [::1]: relay.allow holds ::1 / does not
TRUSTED, UNTRUSTED = "127.0.0.88", "127.0.0.89"
CATCH_ALL, LITERAL_TARGET, OTHER_EXAMPLE = "127.0.0.81", "127.0.0.82", "127.0.0.83"
NO_DNS = "127.0.0.87:53"                       # nothing listens: a stray lookup fails on loopback


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_V6 = ipv6_available()


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.peers = {ip: SMTPPeer(host=ip, port=25).start() for ip in (CATCH_ALL, LITERAL_TARGET, OTHER_EXAMPLE)}
        cfg = base_config(tmp, listen=f"{GW_HOST}:{GW_PORT}")
        cfg["gateway"]["dns"]["nameservers"] = [NO_DNS]
        vs = cfg["virtual_servers"][0]
        vs["name"] = "Trusting"
        vs["relay"] = {"allow": [f"{TRUSTED}/32"] + (["::1/128"] if HAVE_V6 else []),
                       "allow_authenticated": True}
        if HAVE_V6:
            vs["listen"].append(f"[::1]:{V6_TRUSTING}")
            cfg["virtual_servers"].append({"name": "Strict", "listen": [f"[::1]:{V6_STRICT}"],
                                           "relay": {"allow": ["2001:db8::/32"], "allow_authenticated": True}})
        cfg["connectors"] = [
            {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}],
             "smart_hosts": [f"[{CATCH_ALL}]"], "bridgeheads": ["Trusting"]},
            {"name": "Other", "address_spaces": [{"domain": "other.example", "cost": 1}],
             "smart_hosts": [f"[{OTHER_EXAMPLE}]"], "bridgeheads": ["Trusting"]},
        ]
        self.gw = GatewayProcess(tmp, cfg).start()
        self.expected: set[str] = set()           # recipients a peer may legitimately receive
        self.checked = {ip: 0 for ip in self.peers}   # messages already judged, per peer

    def stop(self) -> None:
        self.gw.stop()
        for p in self.peers.values():
            p.stop()

    def client(self, source: str = UNTRUSTED, host: str = GW_HOST, port: int = GW_PORT) -> smtplib.SMTP:
        s = smtplib.SMTP(host, port, timeout=30, source_address=(source, 0))
        s.ehlo("client.test")
        return s

    def try_rcpt(self, path: str, source: str = UNTRUSTED, **kw) -> tuple[int, bytes, int | None]:
        """MAIL, RCPT TO:<path> as written, and DATA with a message whatever RCPT said."""
        with self.client(source, **kw) as s:
            assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 250
            code, text = s.docmd("RCPT", f"TO:{path}")
            data_code, _ = s.docmd("DATA")
            if data_code == 354:
                s.send(b"Subject: trick\r\n\r\ntrick\r\n.\r\n")
                data_code, _ = s.getreply()
        return code, text, data_code

    def barrier(self) -> None:
        """Relay one message and drain the queue: whatever a trick queued has had its chance."""
        name = f"barrier-{uuid.uuid4().hex[:8]}@remote.test"
        self.expected.add(name)
        with self.client(TRUSTED) as s:
            s.sendmail("alice@example.test", [name], f"Subject: {name}\r\n\r\nbarrier\r\n")
        assert wait_until(lambda: any(name in m.recipients for m in self.peers[CATCH_ALL].messages))
        assert wait_until(self.spool_empty)

    def spool_empty(self) -> bool:
        root = self.tmp / "spool"
        return not any(p.is_file() and p.parent.name not in ("tmp", "corrupt") and p.suffix != ".lock" for p in root.rglob("*"))

    def assert_nothing_relayed(self) -> None:
        self.barrier()
        for ip, peer in self.peers.items():
            new, self.checked[ip] = peer.messages[self.checked[ip]:], len(peer.messages)
            strays = [m.recipients for m in new if not set(m.recipients) <= self.expected]
            assert strays == [], f"{ip} received {strays}"
        assert maildir_messages(self.tmp / "mail", "alice") == [], "a report went back to the sender"

    def mailbox(self, name: str) -> list[bytes]:
        return maildir_messages(self.tmp / "mail", name)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("relay_e2e"))
    yield s
    s.stop()


RELAY_DENIED = (550, b"5.7.1 Relaying denied")
ROUTING = (550, b"5.7.1 Relaying denied: sender-specified routing")

# (RCPT TO as the client writes it, expected (code, text start), local mailbox it lands in or None)
UNTRUSTED_TRICKS = [
    ("<pct%other.example@example.test>", ROUTING, None),                       # percent hack
    ("<pct%other.example@remote.test>", RELAY_DENIED, None),
    ("<@example.test:route@other.example>", RELAY_DENIED, None),               # source route
    ("<@example.test,@gw.example.test:route@other.example>", RELAY_DENIED, None),
    ("<@other.example:routed-home@example.test>", (250, b"2.1.5"), "routed-home"),
    ("<other.example!bang@example.test>", ROUTING, None),                       # bang path
    ("<other.example!bang>", (501, b"5.1.3"), None),
    ('<"quoted@other.example"@example.test>', ROUTING, None),                   # quoted local part
    ('<"quoted%other.example"@example.test>', ROUTING, None),
    ('<"plainquoted"@example.test>', (250, b"2.1.5"), "plainquoted"),
    ("<dbl@other.example@example.test>", (501, b"5.1.3"), None),                # double at
    ("<dbl@example.test@other.example>", (501, b"5.1.3"), None),
    ("<lit@[127.0.0.82]>", RELAY_DENIED, None),                                 # IP literal
    ("<lit@[IPv6:::1]>", RELAY_DENIED, None),
    ("<lit@[tag:127.0.0.82]>", (553, b"5.1.3"), None),
    ("<dot@other.example.>", RELAY_DENIED, None),                               # trailing dot
    ("<dot-home@example.test.>", (250, b"2.1.5"), "dot-home"),
    ("<dot@example.test..>", (501, b"5.1.3"), None),
    ("<case@OTHER.EXAMPLE>", RELAY_DENIED, None),                               # case variants
    ("<Case-Home@EXAMPLE.Test>", (250, b"2.1.5"), "case-home"),
    ("<u/etc@example.test>", (553, b"5.1.3"), None),                      # not a mailbox name
]


@pytest.mark.parametrize("path, expected, mailbox", UNTRUSTED_TRICKS, ids=[t[0] for t in UNTRUSTED_TRICKS])
def test_trick_from_untrusted_client(site, path, expected, mailbox):
    code, text, data_code = site.try_rcpt(path)
    assert (code, text[:len(expected[1])]) == expected
    if mailbox is None:
        assert data_code == 554                             # no valid recipients: nothing queued
    else:
        assert data_code == 250
        assert wait_until(lambda: site.mailbox(mailbox))
    site.assert_nothing_relayed()


TRUSTED_LOCAL_TRICKS = ["<pct%other.example@example.test>", "<other.example!bang@example.test>",
                        '<"quoted@other.example"@example.test>']


@pytest.mark.parametrize("path", TRUSTED_LOCAL_TRICKS)
def test_local_domain_tricks_refused_even_for_trusted_clients(site, path):
    code, text, data_code = site.try_rcpt(path, source=TRUSTED)
    assert (code, text[:len(ROUTING[1])]) == ROUTING and data_code == 554
    site.assert_nothing_relayed()


def test_trusted_client_relays_and_source_route_is_dropped(site):
    site.expected.add("routed@other.example")
    code, _, data_code = site.try_rcpt("<@example.test:routed@other.example>", source=TRUSTED)
    assert (code, data_code) == (250, 250)
    peer = site.peers[OTHER_EXAMPLE]
    assert peer.wait_for(1)
    assert peer.messages[-1].recipients == ["routed@other.example"]
    assert peer.messages[-1].sender == "alice@example.test"


def test_trusted_client_literal_goes_through_the_connector_not_to_the_literal(site):
    before = len(site.peers[CATCH_ALL].messages)
    site.expected.add("lit@[127.0.0.82]")
    code, _, data_code = site.try_rcpt("<lit@[127.0.0.82]>", source=TRUSTED)
    assert (code, data_code) == (250, 250)
    assert wait_until(lambda: any(m.recipients == ["lit@[127.0.0.82]"]
                                  for m in site.peers[CATCH_ALL].messages[before:]))
    assert site.peers[LITERAL_TARGET].messages == []


def test_pipelined_tricks_get_one_answer_each_and_nothing_is_queued(site):
    with socket.create_connection((GW_HOST, GW_PORT), timeout=10, source_address=(UNTRUSTED, 0)) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<pct%other.example@example.test>\r\n"
                  b"RCPT TO:<@example.test:x@other.example>\r\nRCPT TO:<x@[127.0.0.82]>\r\nDATA\r\n")
        answers = [f.readline()[:9] for _ in range(5)]
        s.sendall(b"QUIT\r\n")       # not pipelined after DATA: that is refused (RFC 2920 3.1)
        answers.append(f.readline()[:9])
    assert answers == [b"250 2.1.0", b"550 5.7.1", b"550 5.7.1", b"550 5.7.1", b"554 5.5.1", b"221 2.0.0"]
    site.assert_nothing_relayed()


def test_diag_log_says_why(site):
    site.try_rcpt("<why@other.example>")
    site.try_rcpt("<why%other.example@example.test>")
    assert wait_until(lambda: "recipient=why@other.example decision=deny" in site.gw.log())
    log = site.gw.log()
    assert "relay decision" in log and "not in relay.allow and not authenticated" in log
    assert "recipient=why%other.example@example.test decision=deny reason=local part holds routing" in log
    assert "decision=accept reason=client 127.0.0.88 in relay.allow 127.0.0.88/32" in log


@pytest.mark.skipif(not HAVE_V6, reason="::1 cannot be bound here")
def test_ipv6_relay_allow(site):
    site.expected.add("v6@other.example")
    code, _, data_code = site.try_rcpt("<v6@other.example>", source="::1", host="::1", port=V6_TRUSTING)
    assert (code, data_code) == (250, 250)
    assert wait_until(lambda: any(m.recipients == ["v6@other.example"] for m in site.peers[OTHER_EXAMPLE].messages))
    code, text, data_code = site.try_rcpt("<v6-denied@other.example>", source="::1", host="::1", port=V6_STRICT)
    assert (code, text) == RELAY_DENIED and data_code == 554
    code, text, _ = site.try_rcpt("<v6%other.example@example.test>", source="::1", host="::1", port=V6_STRICT)
    assert (code, text[:len(ROUTING[1])]) == ROUTING
    assert wait_until(lambda: "client ::1 in relay.allow ::1/128" in site.gw.log())
    site.assert_nothing_relayed()
