"""REQUIRETLS (RFC 8689) end to end: the gateway offers it after STARTTLS, keeps it with the message,
and relays such mail only over validated TLS (here: the destination's MTA-STS policy in enforce mode)
to hops that offer REQUIRETLS; otherwise the sender gets a bounce with 5.7.10. ``TLS-Required: No``
lets a sender waive the destination's policy."""
from __future__ import annotations

import smtplib
import ssl
import uuid

import pytest

from gwprocess import maildir_messages, wait_until
from peers import DEFAULT_EXTENSIONS
from test_mta_sts import GW_HOST, GW_PORT, MX1, MX2, ca, config, dns, https, start, tls_peer  # noqa: F401
from httpsfixture import policy
from mta.smtp.client.requiretls import waives_policy


def inbound_tls(cfg: dict, ca, tmp_path) -> dict:
    cert = ca.issue_cert("gw.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "gw.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    cfg["virtual_servers"][0]["tls"] = {"certificate": str(tmp_path / "gw.pem"), "key": str(tmp_path / "gw.key")}
    return cfg


def client() -> smtplib.SMTP:
    s = smtplib.SMTP(GW_HOST, GW_PORT, timeout=30)
    s.ehlo("client.test")
    return s


def send_requiretls(subject: str, headers: str = "") -> None:
    msg = (f"From: alice@example.test\r\nTo: b@sts.test\r\nSubject: {subject}\r\n{headers}"
           f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello.\r\n")
    with client() as s:
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
        code, _ = s.mail("alice@example.test", ["REQUIRETLS"])
        assert code == 250
        assert s.rcpt("b@sts.test")[0] == 250
        assert s.data(msg)[0] == 250


def bounces(tmp_path) -> list[bytes]:
    return maildir_messages(tmp_path / "mail", "alice")


def test_waiver_header_is_found_in_the_header_section_only():
    assert waives_policy([b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n"])
    assert waives_policy([b"Subject: x\r\ntls-required:", b"  no\r\n\r\n"])
    assert not waives_policy([b"Subject: x\r\n\r\nTLS-Required: No\r\n"])
    assert not waives_policy([b"TLS-Required: Yes\r\n\r\n"])


def test_offered_only_after_starttls_and_refused_without_it(tmp_path, gateway, dns, https, ca):
    start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx1.sts.test"),
          inbound_tls(config(tmp_path, dns, ca), ca, tmp_path))
    with client() as s:
        assert not s.has_extn("requiretls")
        code, text = s.mail("alice@example.test", ["REQUIRETLS"])
        assert code == 555 and text.startswith(b"5.5.4")
        s.rset()
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
        assert s.has_extn("requiretls")
        assert s.mail("alice@example.test", ["REQUIRETLS"])[0] == 250


@pytest.mark.parametrize("mode", ["enforce", "testing"])     # testing counts as enforce (RFC 8689 4.2.1)
def test_relayed_over_mta_sts_validated_tls_to_a_hop_offering_requiretls(tmp_path, gateway, peers, dns, https,
                                                                         ca, mode):
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx1.extensions = (*mx1.extensions, "REQUIRETLS")
    gw = start(tmp_path, gateway, dns, https, ca, policy(mode, "mx1.sts.test"),
               inbound_tls(config(tmp_path, dns, ca), ca, tmp_path))
    send_requiretls("protected")
    assert mx1.wait_for(1, timeout=20), gw.log()
    assert mx1.messages[0].tls and "REQUIRETLS" in mx1.messages[0].mail_params


@pytest.mark.parametrize("case", ["hop-without-requiretls", "no-validated-tls"])
def test_bounced_with_5_7_10_without_validated_tls_or_requiretls_at_the_hop(tmp_path, gateway, peers, dns,
                                                                           https, ca, case):
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx1.sts.test"),
               inbound_tls(config(tmp_path, dns, ca), ca, tmp_path))
    if case == "no-validated-tls":          # the policy host answers 404: sts.test has no policy
        https.set_response("sts.test", 404, "text/plain", "")
    send_requiretls("must not leak")
    assert wait_until(lambda: bounces(tmp_path), 20), gw.log()
    bounce = bounces(tmp_path)[0]
    assert b"5.7.10" in bounce and b"REQUIRETLS" in bounce
    # RFC 8689 5: the report returns the headers, never the body the sender wanted protected
    assert b"text/rfc822-headers" in bounce and b"Subject: must not leak" in bounce and b"Hello." not in bounce
    assert b"sent with REQUIRETLS" in bounce
    assert not mx1.messages
    assert "dsn=5.7.10, status=bounced" in gw.log()


def test_a_hop_without_requiretls_is_left_for_the_next_mx_host(tmp_path, gateway, peers, dns, https, ca):
    """RFC 8689 4.2.1: mx1 validates but does not offer REQUIRETLS: it gets no MAIL, mx2 gets the message."""
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    mx2.extensions = (*mx2.extensions, "REQUIRETLS")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx1.sts.test", "mx2.sts.test"),
               inbound_tls(config(tmp_path, dns, ca), ca, tmp_path))
    send_requiretls("next hop")
    assert mx2.wait_for(1, timeout=20), gw.log()
    assert "REQUIRETLS" in mx2.messages[0].mail_params and mx2.messages[0].tls
    assert mx1.connections >= 1 and not mx1.messages
    assert "550 5.7.10 REQUIRETLS: mx1.sts.test[127.0.0.61]:25 does not offer REQUIRETLS" in gw.log()
    assert not bounces(tmp_path)


def test_tls_required_no_waives_the_destinations_policy(tmp_path, gateway, peers, dns, https, ca):
    mx1 = peers(MX1, extensions=DEFAULT_EXTENSIONS)              # no STARTTLS: enforce would refuse it
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx1.sts.test"))
    msg = ("From: alice@example.test\r\nTo: b@sts.test\r\nSubject: waived\r\nTLS-Required: No\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello.\r\n")
    with client() as s:
        s.sendmail("alice@example.test", ["b@sts.test"], msg)
    assert mx1.wait_for(1, timeout=20), gw.log()
    assert not mx1.messages[0].tls
