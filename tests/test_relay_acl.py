"""relay_acl in process: the relay decision (IPv4, IPv6, CIDR, authenticated), the relay tricks as the
real ESMTP server parses them, and the connector restrictions at RCPT, end of DATA and delivery."""
from __future__ import annotations

import email.parser
import email.policy
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport

from mta.config import (Connector, ContentRestrictions, DeliveryRestrictions, RelayConfig, parse_config)
from mta.model.envelope import Envelope, Session
from mta.plugin.hookspecs import hookimpl
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.server.session import SMTPServerFactory
from server_fakes import Code, FakeGateway, parse_replies
from smtpgw_plugins.relay_acl import RelayACL
from smtpgw_plugins.relay_acl.plugin import PRIORITY_KEY, client_ip, relay_reason
from smtpgw_plugins.relay_acl.restrictions import Facts, check, choose, priority_of, sender_allowed

TRUSTED_V4 = "192.0.2.10"
UNTRUSTED_V4 = "198.51.100.7"
TRUSTED_V6 = "2001:db8:1::25"
UNTRUSTED_V6 = "2001:db8:2::25"


def config_dict(**connector: Any) -> dict:
    conn = {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}],
            "smart_hosts": ["[192.0.2.200]"]}
    conn.update(connector)
    return {
        "gateway": {"hostname": "gw.example.test", "spool": "/nonexistent",
                    "postmaster": "postmaster@example.test",
                    "local_domains": {"example.test": {"maildir": "/nonexistent"},
                                      "other-local.test": {"maildir": "/nonexistent"}}},
        "virtual_servers": [{"name": "VS", "listen": ["127.0.0.80:0"],
                             "relay": {"allow": [f"{TRUSTED_V4}/32", "2001:db8:1::/48"],
                                       "allow_authenticated": True}}],
        "connectors": [conn],
        "plugins": {"enabled": ["relay_acl"]},
    }


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, dict]] = []

    @hookimpl
    def smtpgw_event(self, category, level, message, fields):
        self.seen.append((category, level, message, dict(fields)))

    def decisions(self) -> list[dict]:
        return [f for _, _, m, f in self.seen if m == "relay decision"]


def make_gateway(cfg: dict | None = None) -> tuple[FakeGateway, RelayACL, Events]:
    config = parse_config(cfg or config_dict())
    gw = FakeGateway(config)
    plugin, events = RelayACL(), Events()
    gw.hooks.register(plugin, name="relay_acl")
    gw.hooks.register(events, name="events")
    plugin.smtpgw_configure(config, gw)
    return gw, plugin, events


class Client:
    """The real ESMTP server over an in-memory transport, from a chosen client address."""

    def __init__(self, gw: FakeGateway, peer: str) -> None:
        addr = IPv6Address("TCP", peer, 40000) if ":" in peer else IPv4Address("TCP", peer, 40000)
        host = IPv6Address("TCP", "::1", 25) if ":" in peer else IPv4Address("TCP", "127.0.0.80", 25)
        self.gw = gw
        self.transport = StringTransport(peerAddress=addr, hostAddress=host)
        self.protocol = SMTPServerFactory(gw, gw.config.virtual_servers[0]).buildProtocol(addr)
        self.protocol.makeConnection(self.transport)
        self.send("EHLO client.test")

    def send(self, line: str) -> tuple[int, str]:
        self.transport.clear()
        self.protocol.dataReceived(line.encode() + b"\r\n")
        answer = parse_replies(self.transport.value())[-1]
        return answer.code, answer.lines[-1]

    def rcpt(self, path: str, sender: str = "alice@example.test", mail_params: str = "") -> tuple[int, str]:
        self.send("RSET")
        code, text = self.send(f"MAIL FROM:<{sender}>{mail_params}")
        assert code == Code.OK, text
        return self.send(f"RCPT TO:{path}")

    def message(self, sender: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
        self.send("RSET")
        assert self.send(f"MAIL FROM:<{sender}>")[0] == Code.OK
        for r in rcpts:
            assert self.send(f"RCPT TO:<{r}>")[0] == Code.OK, r
        assert self.send("DATA")[0] == Code.START_INPUT
        self.transport.clear()
        self.protocol.dataReceived(data + b".\r\n")
        answer = parse_replies(self.transport.value())[-1]
        return answer.code, answer.lines[-1]


# -- who may relay ---------------------------------------------------------------------------------

@pytest.mark.parametrize("peer, allow, expected", [
    ("192.0.2.10", ["192.0.2.10"], True),
    ("192.0.2.11", ["192.0.2.10"], False),
    ("192.0.2.77", ["192.0.2.0/24"], True),
    ("192.0.3.1", ["192.0.2.0/24"], False),
    ("::ffff:192.0.2.77", ["192.0.2.0/24"], True),          # IPv4-mapped peer
    ("192.0.2.77", ["::ffff:192.0.2.0/120"], True),         # entry written in mapped form
    ("2001:db8:1::25", ["2001:db8:1::/48"], True),
    ("2001:db8:2::25", ["2001:db8:1::/48"], False),
    ("::1", ["::1"], True),
    ("::1", ["127.0.0.1"], False),
    ("fe80::1%lo", ["fe80::/64"], True),                    # scope id ignored
    ("127.0.0.1", [], False),                               # empty list = nobody
    ("not-an-ip", ["0.0.0.0/0"], False),
])
def test_relay_allow_matches_ip_and_cidr(peer, allow, expected):
    import ipaddress
    relay = RelayConfig(allow=tuple(ipaddress.ip_network(a, strict=False) for a in allow),
                        allow_authenticated=False)
    assert (relay_reason(relay, peer, None) is not None) is expected


def test_authenticated_clients_relay_only_when_allowed():
    assert relay_reason(RelayConfig((), True), "203.0.113.9", "bob") == "authenticated as bob"
    assert relay_reason(RelayConfig((), False), "203.0.113.9", "bob") is None
    assert relay_reason(RelayConfig((), True), "203.0.113.9", None) is None
    assert str(client_ip("::ffff:10.0.0.1")) == "10.0.0.1"


@pytest.mark.parametrize("peer, code", [(TRUSTED_V4, 250), (UNTRUSTED_V4, 550),
                                        (TRUSTED_V6, 250), (UNTRUSTED_V6, 550)])
def test_remote_recipient_relayed_only_for_listed_clients(peer, code):
    gw, _, events = make_gateway()
    c = Client(gw, peer)
    got, text = c.rcpt("<bob@remote.test>")
    assert got == code
    if code == 550:
        assert text == "5.7.1 Relaying denied"
    [decision] = events.decisions()
    assert decision["decision"] == ("accept" if code == 250 else "deny")
    assert decision["recipient"] == "bob@remote.test"
    assert "relay.allow" in decision["reason"]


def test_authenticated_session_relays_and_the_reason_says_so():
    gw, plugin, events = make_gateway()
    session = Session("s1", "VS", UNTRUSTED_V4, 1, "127.0.0.80", 25, authenticated_user="carol")
    env = Envelope("e1", sender="carol@example.test")
    assert plugin.smtpgw_rcpt_to(session, env, "x@remote.test", {}).code == 250
    assert events.decisions()[0]["reason"].startswith("authenticated as carol")


def test_local_domains_are_accepted_from_anyone_and_logged():
    gw, _, events = make_gateway()
    c = Client(gw, UNTRUSTED_V4)
    assert c.rcpt("<Bob@Other-Local.Test.>")[0] == 250
    assert events.decisions()[0]["decision"] == "accept"
    assert events.decisions()[0]["reason"] == "local domain other-local.test"


# -- the tricks, through the real parser -----------------------------------------------------------

RELAY = "5.7.1 Relaying denied"
ROUTING = "5.7.1 Relaying denied: sender-specified routing"

# (RCPT TO argument, answer to an untrusted client, answer to a trusted client); each answer is
# (code, start of text) and 250 at a local domain means local delivery (see the e2e tests).
TRICKS = [
    ("<u%other.example@example.test>", (550, ROUTING), (550, ROUTING)),                 # percent hack
    ("<u%other.example%third.example@example.test>", (550, ROUTING), (550, ROUTING)),
    ("<u%other.example@remote.test>", (550, RELAY), (250, "2.1.5")),                  # remote's business
    ("<@example.test:u@other.example>", (550, RELAY), (250, "2.1.5")),                # source route
    ("<@example.test,@gw.example.test:u@other.example>", (550, RELAY), (250, "2.1.5")),
    ("<@other.example:u@example.test>", (250, "2.1.5"), (250, "2.1.5")),             # route ignored
    ("<other.example!u@example.test>", (550, ROUTING), (550, ROUTING)),                 # bang path
    ("<other.example!u>", (501, "5.1.3"), (501, "5.1.3")),
    ('<"u@other.example"@example.test>', (550, ROUTING), (550, ROUTING)),               # quoted
    ('<"u%other.example"@example.test>', (550, ROUTING), (550, ROUTING)),
    ('<"u!x"@example.test>', (550, ROUTING), (550, ROUTING)),
    ('<"u"@example.test>', (250, "2.1.5"), (250, "2.1.5")),                          # = u@example.test
    ('<"u@other.example">', (501, "5.1.3"), (501, "5.1.3")),
    ("<u@other.example@example.test>", (501, "5.1.3"), (501, "5.1.3")),                 # double at
    ("<u@example.test@other.example>", (501, "5.1.3"), (501, "5.1.3")),
    ("<u@@example.test>", (501, "5.1.3"), (501, "5.1.3")),
    ("<u@[192.0.2.1]>", (550, RELAY), (250, "2.1.5")),                                 # IP literal
    ("<u@[127.0.0.80]>", (550, RELAY), (250, "2.1.5")),
    ("<u@[IPv6:::1]>", (550, RELAY), (250, "2.1.5")),
    ("<u@[tag:anything]>", (553, "5.1.3"), (553, "5.1.3")),
    ("<u@[300.1.1.1]>", (501, "5.1.3"), (501, "5.1.3")),
    ("<u@example.test.>", (250, "2.1.5"), (250, "2.1.5")),                            # trailing dot
    ("<u@other.example.>", (550, RELAY), (250, "2.1.5")),
    ("<u@example.test..>", (501, "5.1.3"), (501, "5.1.3")),
    ("<U@EXAMPLE.TEST>", (250, "2.1.5"), (250, "2.1.5")),                             # case
    ("<u@OTHER.Example>", (550, RELAY), (250, "2.1.5")),
    ("<u@example.test >", (501, "5.1.3"), (501, "5.1.3")),
    ("<a/b@example.test>", (553, "5.1.3"), (553, "5.1.3")),                           # not a mailbox
    ("<u@exa\u0430mple.test>", (553, "5.6.7"), (553, "5.6.7")),                        # no SMTPUTF8
]


@pytest.mark.parametrize("path, untrusted, trusted", TRICKS, ids=[t[0] for t in TRICKS])
def test_relay_tricks(path, untrusted, trusted):
    gw, _, _ = make_gateway()
    for peer, (code, text) in ((UNTRUSTED_V4, untrusted), (TRUSTED_V4, trusted)):
        got, got_text = Client(gw, peer).rcpt(path)
        assert (got, got_text[:len(text)]) == (code, text), peer


def test_unicode_lookalike_domain_is_not_local():
    gw, _, _ = make_gateway()
    c = Client(gw, UNTRUSTED_V4)
    code, text = c.rcpt("<u@exa\u0430mple.test>", mail_params=" SMTPUTF8")
    assert (code, text) == (550, RELAY)


def test_every_trick_decision_is_logged_with_a_reason():
    gw, _, events = make_gateway()
    c = Client(gw, UNTRUSTED_V4)
    c.rcpt("<other.example!u@example.test>")
    c.rcpt("<@example.test:u@other.example>")
    first, second = events.decisions()
    assert first["decision"] == "deny" and "routing character" in first["reason"] and "!" in first["reason"]
    assert second["decision"] == "deny" and second["recipient"] == "u@other.example"
    assert "not a local domain" in second["reason"]


# -- restrictions, as pure functions ---------------------------------------------------------------

def headers(text: str):
    return email.parser.HeaderParser(policy=email.policy.compat32).parsestr(text + "\n")


@pytest.mark.parametrize("text, expected", [
    ("Subject: x", "normal"),
    ("X-Priority: 1 (Highest)", "high"),
    ("X-Priority: 2", "high"),
    ("X-Priority: 3 (Normal)", "normal"),
    ("X-Priority: 5", "low"),
    ("X-Priority: bogus", "normal"),
    ("Importance: High", "high"),
    ("Importance: low", "low"),
    ("Priority: urgent", "high"),
    ("Priority: non-urgent", "low"),
    ("Importance: low\nX-Priority: 1", "high"),       # the highest claim wins
    ("X-Priority: 5\nX-Priority: 3", "normal"),
])
def test_priority_from_headers(text, expected):
    assert priority_of(headers(text)) == expected


@pytest.mark.parametrize("default, exceptions, sender, allowed", [
    ("accept", [], "anyone@remote.test", True),
    ("accept", ["bad@example.test"], "bad@example.test", False),
    ("accept", ["bad@example.test"], "BAD@Example.Test", False),
    ("accept", ['"bad"@example.test'], "bad@example.test", False),   # canonical form compared
    ("accept", ["@spam.test"], "x@spam.test", False),
    ("accept", ["@spam.test"], "x@sub.spam.test", True),             # the domain only
    ("reject", [], "boss@example.test", False),
    ("reject", ["boss@example.test"], "boss@example.test", True),
    ("reject", ["boss@example.test"], "clerk@example.test", False),
    ("reject", ["@partner.test"], "anyone@partner.test", True),
    ("reject", [], "", True),                                        # null sender: allowed_types decides
])
def test_sender_restrictions(default, exceptions, sender, allowed):
    assert sender_allowed(DeliveryRestrictions(default, tuple(exceptions)), sender) is allowed


def connector(name: str = "C", **content: Any) -> Connector:
    delivery = content.pop("delivery", DeliveryRestrictions())
    return Connector(name, content_restrictions=ContentRestrictions(**content), delivery_restrictions=delivery)


def test_check_reports_the_broken_restriction():
    assert check(connector(), Facts("a@x.test", 10 ** 9, "high")) is None
    small = connector(max_message_size=1000)
    assert check(small, Facts("a@x.test", 1000)) is None
    r = check(small, Facts("a@x.test", 1001))
    assert (r.reply.code, r.reply.status, r.is_size) == (552, "5.3.4", True)
    assert check(small, Facts("a@x.test", None)) is None             # size not known yet
    r = check(connector(allowed_types=("non-system",)), Facts(""))
    assert (r.reply.code, r.reply.status) == (550, "5.7.1") and "system" in r.reason
    r = check(connector(allowed_types=("system",)), Facts("a@x.test"))
    assert "non-system" in r.reason
    r = check(connector(allowed_priorities=("normal", "low")), Facts("a@x.test", 1, "high"))
    assert (r.reply.code, r.reply.status) == (550, "5.7.1") and "high" in r.reason
    assert check(connector(allowed_priorities=("normal",)), Facts("a@x.test", 1, None)) is None


def test_choose_fails_over_to_a_connector_that_may_carry_it():
    small, big = connector("small", max_message_size=100), connector("big")
    assert choose([small, big], Facts("a@x.test", 500))[0] is big
    assert choose([small, big], Facts("a@x.test", 50))[0] is small
    chosen, refusal = choose([small], Facts("a@x.test", 500))
    assert chosen is None and refusal.connector == "small"
    assert choose([], Facts("a@x.test", 500)) == (None, None)


# -- restrictions in the session -------------------------------------------------------------------

def test_declared_size_over_the_connector_limit_is_refused_at_rcpt():
    gw, _, events = make_gateway(config_dict(content_restrictions={"max_message_size": "10KB"}))
    c = Client(gw, TRUSTED_V4)
    code, text = c.rcpt("<bob@remote.test>", mail_params=" SIZE=20000")
    assert (code, text[:5]) == (552, "5.3.4")
    assert c.rcpt("<bob@example.test>", mail_params=" SIZE=20000")[0] == 250   # local: no connector
    assert c.rcpt("<bob@remote.test>", mail_params=" SIZE=5000")[0] == 250
    assert "max_message_size" in events.decisions()[0]["reason"]


def test_system_messages_refused_at_rcpt_when_not_allowed():
    gw, _, _ = make_gateway(config_dict(content_restrictions={"allowed_types": ["non-system"]}))
    c = Client(gw, TRUSTED_V4)
    assert c.rcpt("<bob@remote.test>", sender="")[:2] == (550, "5.7.1 Connector Internet does not carry "
                                                                "system messages")
    assert c.rcpt("<bob@remote.test>")[0] == 250


@pytest.mark.parametrize("default, exceptions, sender, code", [
    ("reject", ["boss@example.test", "@partner.test"], "boss@example.test", 250),
    ("reject", ["boss@example.test", "@partner.test"], "x@partner.test", 250),
    ("reject", ["boss@example.test", "@partner.test"], "clerk@example.test", 550),
    ("accept", ["clerk@example.test"], "clerk@example.test", 550),
    ("accept", ["clerk@example.test"], "boss@example.test", 250),
])
def test_delivery_restrictions_at_rcpt(default, exceptions, sender, code):
    gw, _, events = make_gateway(config_dict(delivery_restrictions={"default": default, "except": exceptions}))
    c = Client(gw, TRUSTED_V4)
    got, text = c.rcpt("<bob@remote.test>", sender=sender)
    assert got == code
    if code == 550:
        assert text.startswith("5.7.1 Sender") and "delivery_restrictions" in events.decisions()[0]["reason"]
        assert c.rcpt("<bob@example.test>", sender=sender)[0] == 250       # local mail is not restricted


BIG = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 998 + b"\r\n") * 20


def test_real_size_at_end_of_data_refuses_when_no_recipient_may_have_it():
    gw, _, events = make_gateway(config_dict(content_restrictions={"max_message_size": "10KB"}))
    c = Client(gw, TRUSTED_V4)
    code, text = c.message("alice@example.test", ["bob@remote.test", "carol@remote.test"], BIG)
    assert (code, text[:5]) == (552, "5.3.4")
    assert gw.queue.submitted == []
    assert [d["decision"] for d in events.decisions()[-2:]] == ["deny", "deny"]


def test_partly_refused_message_is_accepted_and_marked_for_a_dsn():
    gw, _, events = make_gateway(config_dict(content_restrictions={"max_message_size": "10KB"}))
    c = Client(gw, TRUSTED_V4)
    code, _ = c.message("alice@example.test", ["bob@remote.test", "carol@example.test"], BIG)
    assert code == 250 and len(gw.queue.submitted) == 1
    assert events.decisions()[-1]["decision"] == "dsn" and events.decisions()[-1]["recipient"] == "bob@remote.test"


@pytest.mark.parametrize("header, code", [(b"X-Priority: 1\r\n", 550), (b"Importance: high\r\n", 550),
                                          (b"Priority: urgent\r\n", 550), (b"X-Priority: 3\r\n", 250),
                                          (b"", 250), (b"Importance: low\r\n", 250)])
def test_priority_refused_at_end_of_data(header, code):
    gw, _, _ = make_gateway(config_dict(content_restrictions={"allowed_priorities": ["normal", "low"]}))
    c = Client(gw, TRUSTED_V4)
    got, text = c.message("alice@example.test", ["bob@remote.test"], header + b"Subject: p\r\n\r\nhi\r\n")
    assert got == code
    if code == 550:
        assert text.startswith("5.7.1") and "high-priority" in text
    else:
        assert gw.queue.submitted[-1].envelope.extra[PRIORITY_KEY] in ("normal", "low")


def test_size_and_priority_refusals_together_answer_550():
    cfg = config_dict(content_restrictions={"allowed_priorities": ["normal"]})
    cfg["connectors"].append({"name": "Partners", "address_spaces": ["partner.test"],
                              "content_restrictions": {"max_message_size": "1KB"}})
    gw, _, _ = make_gateway(cfg)
    c = Client(gw, TRUSTED_V4)
    code, text = c.message("alice@example.test", ["a@partner.test", "b@remote.test"], b"X-Priority: 1\r\n" + BIG)
    assert (code, text[:5]) == (550, "5.7.1")


# -- restrictions at delivery ----------------------------------------------------------------------

def entry(sender: str = "alice@example.test", size: int = 100, **extra: Any) -> QueueEntry:
    return QueueEntry("q1", sender, [RecipientState("bob@remote.test")], 0.0, size=size, extra=extra)


def test_delivery_window_makes_a_restricted_connector_unusable():
    gw, plugin, events = make_gateway()
    free = connector("free")
    small = connector("small", max_message_size=1000)
    no_system = connector("no-system", allowed_types=("non-system",))
    only_normal = connector("normal", allowed_priorities=("normal",))
    picky = connector("picky", delivery=DeliveryRestrictions("reject", ("boss@example.test",)))
    plugin.smtpgw_configure(parse_config(config_dict()), gw)
    assert plugin.smtpgw_delivery_window(free, entry(size=10 ** 8)) is None
    assert plugin.smtpgw_delivery_window(small, entry(size=5000)).status == "5.3.4"
    assert plugin.smtpgw_delivery_window(small, entry(size=500)) is None
    assert plugin.smtpgw_delivery_window(no_system, entry(sender="")).code == 550     # our own DSNs too
    assert plugin.smtpgw_delivery_window(only_normal, entry(**{PRIORITY_KEY: "high"})).code == 550
    assert plugin.smtpgw_delivery_window(only_normal, entry()) is None                # unknown = normal
    assert plugin.smtpgw_delivery_window(picky, entry()).code == 550
    assert plugin.smtpgw_delivery_window(picky, entry(sender="boss@example.test")) is None
    skip = [f for c, _, m, f in events.seen if c == "routing_engine"]
    assert skip and all(f["decision"] == "skip connector" for f in skip)
