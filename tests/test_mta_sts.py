"""Outbound MTA-STS (RFC 8461), end to end on loopback: dnsmasq serves the MX, A and ``_mta-sts`` TXT
records, a real HTTPS server with a trustme certificate for ``mta-sts.sts.test`` serves the policy,
and SMTP peers with and without STARTTLS, with right and wrong certificates, stand for the MX hosts.
The gateway is the real twistd process; it trusts the test CA through ``gateway.mta_sts.ca_file``."""
from __future__ import annotations

import json
import smtplib
import uuid

import pytest
import trustme

from dnsfixture import DNSServer
from gwprocess import base_config, wait_until
from peers import DEFAULT_EXTENSIONS
from httpsfixture import PolicyServer, policy
from tlsfixture import ca_file, server_context
from mta.delivery.sts_policy import PolicyError, parse_policy, policy_id

GW_HOST, GW_PORT = "127.0.0.10", 2525
HTTPS = "127.0.0.60"
MX1, MX2 = "127.0.0.61", "127.0.0.62"


# -- the policy language ---------------------------------------------------------------------------

def test_policy_file_and_txt_record_are_read_as_rfc_8461_writes_them():
    p = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
                     "max_age: 604800\r\nextension: ignored\r\n", "abc")
    assert (p.mode, p.max_age, p.mx, p.id) == ("enforce", 604800, ("mail.example.com", "*.example.net"), "abc")
    assert p.matches("MAIL.example.com.") and p.matches("mx1.example.net")
    assert not p.matches("a.b.example.net") and not p.matches("example.net") and not p.matches("x.example.com")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 1\n").mode == "none"
    assert parse_policy("version: STSv1\nmode: testing\nmx: a.test\nmax_age: 99999999\n").max_age == 31557600
    for bad in ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version: STSv1\nmode: on\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n", "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
                "<html>\n"):
        with pytest.raises(PolicyError):
            parse_policy(bad)
    assert policy_id(["v=spf1 -all", "v=STSv1; id=20240101T010101;"]) == "20240101T010101"
    assert policy_id(["v=spf1 -all"]) is None
    for bad in (["v=STSv1; id=1", "v=STSv1; id=2"], ["v=STSv1;"], ["v=STSv1; id=no-dashes"]):
        with pytest.raises(PolicyError):
            policy_id(bad)


# -- end to end ------------------------------------------------------------------------------------

@pytest.fixture
def ca(tmp_path):
    return trustme.CA()


@pytest.fixture
def dns(tmp_path):
    """dnsmasq with TTL 0, so a changed record is seen at the next lookup."""
    server = DNSServer(listen="127.0.0.54", ttl=0)
    server.add_mx("sts.test", "mx1.sts.test", 10).add_mx("sts.test", "mx2.sts.test", 20)
    server.add_a("mx1.sts.test", MX1).add_a("mx2.sts.test", MX2).add_a("mta-sts.sts.test", HTTPS)
    server.add_txt("_mta-sts.sts.test", "v=STSv1; id=1")
    yield server.start()
    server.stop()


@pytest.fixture
def https(ca):
    server = PolicyServer(HTTPS, server_context(ca, "mta-sts.sts.test")).start()
    yield server
    server.stop()


def tls_peer(peers, ip: str, ca, name: str):
    """An MX host offering STARTTLS with a certificate naming ``name``."""
    return peers(ip, tls_context=server_context(ca, name), extensions=(*DEFAULT_EXTENSIONS, "STARTTLS"))


def config(tmp_path, dns, ca, **outbound):
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    host, port = dns.address
    cfg["gateway"]["dns"]["nameservers"] = [f"{host}:{port}"]
    cfg["gateway"]["mta_sts"] = {"ca_file": ca_file(ca, tmp_path)}
    if outbound:
        cfg["connectors"][0]["outbound"] = outbound
    return cfg


def send(subject: str) -> None:
    msg = (f"From: a@sender.test\r\nTo: b@sts.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@sender.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("a@sender.test", ["b@sts.test"], msg)


def subjects(peer) -> list[str]:
    return [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in peer.messages]


def queued(tmp_path) -> bool:
    root = tmp_path / "spool"
    return any(p.is_file() and p.parent.name not in ("tmp", "corrupt", "mta-sts") and p.suffix != ".sock"
               for p in root.rglob("*"))


def start(tmp_path, gateway, dns, https, ca, text: str, cfg: dict | None = None):
    """Publish ``text`` as sts.test's policy, then start the gateway."""
    https.set_policy("sts.test", text)
    return gateway(cfg or config(tmp_path, dns, ca))


def deferred_lines(gw) -> list[str]:
    return [line for line in gw.log().splitlines() if "status=deferred" in line]


def test_enforce_delivers_to_the_matching_mx_over_verified_tls_and_caches_the_policy(
        tmp_path, gateway, peers, dns, https, ca):
    # mx1 is preferred but not in the policy; mx2 presents a certificate for its MX name
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx2.sts.test"))
    send("enforced")
    assert mx2.wait_for(1, timeout=20), gw.log()
    assert mx2.messages[0].tls
    assert wait_until(lambda: "tls=mta-sts" in gw.log())
    assert [x for x in gw.log().splitlines() if "status=sent" in x][0].count("relay=mx2.sts.test[127.0.0.62]:25, tls=mta-sts, ")
    assert mx1.connections == 0 and not mx1.messages
    cached = json.loads((tmp_path / "spool" / "mta-sts" / "sts.test.json").read_text())
    assert cached["id"] == "1" and "mode: enforce" in cached["policy"]


def test_enforce_refuses_an_mx_outside_the_policy_and_the_mail_waits(tmp_path, gateway, peers, dns, https, ca):
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx.elsewhere.test"))
    send("not listed")
    assert wait_until(lambda: any("MTA-STS" in line for line in deferred_lines(gw)), 20), gw.log()
    line = next(x for x in deferred_lines(gw) if "MTA-STS" in x)
    assert "dsn=4.7.5" in line and "allows no MX host" in line
    assert mx1.connections == 0 and mx2.connections == 0
    assert queued(tmp_path)


def test_enforce_refuses_an_mx_without_starttls_or_with_a_wrong_certificate(
        tmp_path, gateway, peers, dns, https, ca):
    plain = peers(MX1, extensions=("PIPELINING", "8BITMIME"))
    wrong = tls_peer(peers, MX2, ca, "other.test")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "*.sts.test"))
    send("refused")
    assert wait_until(lambda: len(deferred_lines(gw)) >= 1, 20), gw.log()
    text = gw.log()
    assert "does not offer STARTTLS" in text and "MTA-STS" in text
    assert "does not name the host" in text or "certificate verification" in text
    line = deferred_lines(gw)[0]
    assert "MTA-STS" in line and "status=deferred" in line
    assert plain.connections >= 1 and wrong.connections >= 1
    assert not plain.messages and not wrong.messages
    assert queued(tmp_path)


def test_testing_mode_delivers_as_before_and_reports(tmp_path, gateway, peers, dns, https, ca):
    mx1 = peers(MX1, extensions=("PIPELINING", "8BITMIME"))       # no STARTTLS at all
    gw = start(tmp_path, gateway, dns, https, ca, policy("testing", "mx9.sts.test"))
    send("testing")
    assert mx1.wait_for(1, timeout=20), gw.log()
    assert not mx1.messages[0].tls
    assert wait_until(lambda: "tls=none" in gw.log() and "status=sent" in gw.log())
    text = gw.log()
    assert "MTA-STS testing: sts.test: enforce would not use mx1.sts.test" in text
    assert "MTA-STS testing: sts.test: enforce would refuse mx1.sts.test" in text


def test_a_new_policy_id_is_fetched_and_a_failed_refresh_keeps_the_policy_in_force(
        tmp_path, gateway, peers, dns, https, ca):
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx1.sts.test"))
    send("first")
    assert mx1.wait_for(1, timeout=20), gw.log()

    # the domain moves its mail to mx2: new policy, new id
    https.set_policy("sts.test", policy("enforce", "mx2.sts.test"))
    dns.remove_txt("_mta-sts.sts.test").add_txt("_mta-sts.sts.test", "v=STSv1; id=2")
    dns.restart()
    send("second")
    assert mx2.wait_for(1, timeout=20), gw.log()
    assert subjects(mx1) == ["first"] and subjects(mx2) == ["second"]
    assert https.fetches("sts.test") == 2

    # id 3 announced but the policy host is broken: the policy of id 2 stays in force
    https.set_response("sts.test", 302, "text/plain", "", {"Location": "https://mta-sts.sts.test/other"})
    dns.remove_txt("_mta-sts.sts.test").add_txt("_mta-sts.sts.test", "v=STSv1; id=3")
    dns.restart()
    send("third")
    assert mx2.wait_for(2, timeout=20), gw.log()
    assert subjects(mx2) == ["second", "third"] and subjects(mx1) == ["first"]
    assert "redirects are not followed" in gw.log() and "the cached policy (id 2, mode enforce) stays in force" in gw.log()


@pytest.mark.parametrize("connector", [{"outbound": {"mta_sts": False}}, {"smart_hosts": [f"[{MX1}]"]}],
                         ids=["mta_sts-false", "smart-host"])
def test_smart_host_connectors_and_mta_sts_false_are_not_subject(tmp_path, gateway, peers, dns, https, ca,
                                                                 connector):
    mx1 = peers(MX1, extensions=("PIPELINING", "8BITMIME"))
    cfg = config(tmp_path, dns, ca)
    cfg["connectors"][0].update(connector)
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx.elsewhere.test"), cfg)
    send("not subject")
    assert mx1.wait_for(1, timeout=20), gw.log()
    assert https.fetches("sts.test") == 0


def test_dns_check_shows_the_policy_and_what_each_mx_must_offer(tmp_path, dns, https, ca, capsys):
    from mta.cli.main import main
    https.set_policy("sts.test", policy("enforce", "mx1.sts.test"))
    host, port = dns.address
    args = ["dns-check", "--server", f"{host}:{port}", "--ca-file", ca_file(ca, tmp_path), "sts.test"]
    main(args)
    out = capsys.readouterr().out
    assert "MTA-STS: id 1, mode enforce, max_age 86400s, mx mx1.sts.test" in out
    assert "mx1.sts.test: STARTTLS with a certificate valid for mx1.sts.test (enforce)" in out
    assert "mx2.sts.test: NOT USED: matches no mx of the policy (enforce)" in out
    https.set_response("sts.test", 302, "text/plain", "", {"Location": "https://elsewhere.test/"})
    main(args + ["--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["mta_sts"]["id"] == "1" and doc["mta_sts"]["policy"] is None
    assert "redirects are not followed" in doc["mta_sts"]["error"]
    assert any("cannot be used" in w["text"] for w in doc["warnings"])
