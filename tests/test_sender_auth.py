"""sender_auth end to end: dnsmasq serves the test zones' SPF, DKIM and DMARC records, twistd smtpgw
delivers to a local Maildir, and the Authentication-Results header found there is read with authres;
signatures are made on the test side with dkimpy. Nothing here uses the plugin's own code."""
from __future__ import annotations

import base64
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import authres
import dns.nameserver
import dns.resolver
import authres.arc
import authres.dmarc
import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dnsfixture import DNSServer
from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until
from peers import SMTPPeer

GW, SILENT_GW, CLIENT, TRUSTED = "127.0.0.130", "127.0.0.136", "127.0.0.131", "127.0.0.133"
AUTHSERV = "gw.example.test"
PARSE = authres.FeatureContext(authres.dmarc, authres.arc)


def make_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


KEY, KEY_RECORD = make_key()
SEAL_KEY, SEAL_RECORD = make_key()           # the gateway's ARC sealing key
PEER = "127.0.0.137"                         # the smart host relayed mail goes to


def zones(dns: DNSServer) -> None:
    dns.add_txt("pass.test", f"v=spf1 ip4:{CLIENT} -all").add_txt("_dmarc.pass.test", "v=DMARC1; p=reject")
    dns.add_txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.add_txt("reject.test", "v=spf1 ip4:192.0.2.1 -all").add_txt("_dmarc.reject.test", "v=DMARC1; p=reject")
    dns.add_txt("quarantine.test", "v=spf1 ip4:192.0.2.1 -all")
    dns.add_txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
    dns.add_txt("signed.test", "v=spf1 -all").add_txt("_dmarc.signed.test", "v=DMARC1; p=reject")
    dns.add_txt("sel._domainkey.signed.test", KEY_RECORD)
    dns.add_txt("arc._domainkey.example.test", SEAL_RECORD)


def config(tmp: Path, listen: str, nameserver: str, **sender_auth) -> dict:
    cfg = base_config(tmp, listen=listen)
    cfg["gateway"]["dns"] = {"nameservers": [nameserver], "timeout": "1s"}
    cfg["plugins"]["enabled"].append("sender_auth")
    cfg["plugins"]["sender_auth"] = {"trusted_networks": [f"{TRUSTED}/32"], **sender_auth}
    return cfg


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sender_auth")
    dns = DNSServer(listen="127.0.0.134")
    zones(dns)
    dns.start()
    users = tmp / "users"
    done = subprocess.run([sys.executable, "-m", "mta.cli.main", "passwd", "-c", "--stdin", str(users), "alice"],
                          input="secret\n", text=True, capture_output=True, env=GatewayProcess(tmp, {}).env())
    assert done.returncode == 0, done.stderr
    (tmp / "seal.key").write_bytes(SEAL_KEY)
    cfg = config(tmp, f"{GW}:2525", f"{dns.listen}:{dns.port}", reject={"dmarc_reject": True},
                 arc={"verify": True, "seal": {"domain": "example.test", "selector": "arc", "key": str(tmp / "seal.key")}})
    cfg["virtual_servers"][0]["auth"] = {"users": str(users), "allow_plaintext": True}
    cfg["virtual_servers"][0]["relay"]["allow"] = [f"{CLIENT}/32"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    peer = SMTPPeer(host=PEER, port=25).start()
    gw = GatewayProcess(tmp, cfg).start()
    gw.peer, gw.dns = peer, dns
    yield gw, tmp
    gw.stop()
    peer.stop()
    dns.stop()


def message(sender_domain: str, subject: str, extra: str = "") -> bytes:
    return (f"From: Someone <someone@{sender_domain}>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@{sender_domain}>\r\n{extra}\r\nHello from {sender_domain}.\r\n").encode()


def signed(data: bytes) -> bytes:
    sig = dkim.sign(data, b"sel", b"signed.test", KEY, canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"message-id"])
    return sig + data


def send(data: bytes, sender: str, host: str = GW, source: str = CLIENT, helo: str = "client.test",
         login: bool = False, to: str = "bob@example.test") -> tuple:
    with smtplib.SMTP(host, 2525, timeout=30, source_address=(source, 0)) as s:
        s.ehlo(helo)
        if login:
            s.login("alice", "secret")
        try:
            s.sendmail(sender, [to], data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def delivered(tmp: Path, subject: str) -> bytes:
    """The message in bob's Maildir (stored with LF line ends: given back with CRLF, as it was sent)."""
    found: list[bytes] = []
    assert wait_until(lambda: found.extend(m.replace(b"\n", b"\r\n") for m in maildir_messages(tmp / "mail", "bob")
                                           if f"Subject: {subject}\n".encode() in m) or found)
    return found[0]


def header_fields(data: bytes, name: bytes) -> list[bytes]:
    return [v for k, v in dkim.DKIM(data).headers if k.lower() == name]


def results(data: bytes) -> dict[str, list]:
    """Our Authentication-Results header (on top of what arrived: only the Maildir delivery's
    Return-Path and Delivered-To come before it), parsed by authres."""
    fields = [k for k, _ in dkim.DKIM(data).headers if k not in (b"Return-Path", b"Delivered-To")]
    ours = header_fields(data, b"authentication-results")
    assert fields.index(b"Authentication-Results") == 0
    header = PARSE.parse("Authentication-Results: " + ours[0].decode().replace("\r\n", ""))
    assert header.authserv_id == AUTHSERV
    out: dict[str, list] = {}
    for r in header.results:
        out.setdefault(r.method, []).append(r)
    return out


def test_spf_pass_and_dmarc_pass(site):
    gw, tmp = site
    assert send(message("pass.test", "spfpass"), "someone@pass.test")[0] == 250
    got = results(delivered(tmp, "spfpass"))
    mailfrom = [r for r in got["spf"] if r.smtp_mailfrom]
    assert [(r.result, r.smtp_mailfrom) for r in mailfrom] == [("pass", "someone@pass.test")]
    assert [(r.result, r.header_from, r.policy) for r in got["dmarc"]] == [("pass", "pass.test", "reject")]
    assert [r.result for r in got["dkim"]] == ["none"]
    # the verdicts also go to the message's per-recipient delivery line
    assert wait_until(lambda: any("message delivered" in line and "auth=" in line and "dmarc=pass" in line
                                  for line in gw.log().splitlines())), gw.log()


def test_spf_fail_without_a_dmarc_policy_is_reported_not_refused(site):
    gw, tmp = site
    assert send(message("fail.test", "spffail"), "someone@fail.test")[0] == 250
    got = results(delivered(tmp, "spffail"))
    assert [r.result for r in got["spf"] if r.smtp_mailfrom] == ["fail"]
    assert [r.result for r in got["dmarc"]] == ["none"]


def test_a_valid_dkim_signature_passes_and_aligns(site):
    gw, tmp = site
    assert send(signed(message("signed.test", "dkimgood")), "someone@signed.test")[0] == 250
    got = results(delivered(tmp, "dkimgood"))
    assert [(r.result, r.header_d, r.header_s) for r in got["dkim"]] == [("pass", "signed.test", "sel")]
    assert [r.result for r in got["spf"] if r.smtp_mailfrom] == ["fail"]
    assert [r.result for r in got["dmarc"]] == ["pass"]       # aligned DKIM is enough


def test_a_broken_signature_fails_and_dmarc_reject_refuses_it(site):
    gw, tmp = site
    data = signed(message("signed.test", "dkimbroken")).replace(b"Hello from", b"Hello (edited) from")
    code, text = send(data, "someone@signed.test")
    assert code == 550 and text.startswith("5.7.1") and "DMARC" in text
    assert "sender_auth: message refused" in gw.log() and "dkim=fail" in gw.log()


def test_dmarc_quarantine_adds_the_verdict_only(site):
    gw, tmp = site
    assert send(message("quarantine.test", "quarantined"), "someone@quarantine.test")[0] == 250
    got = results(delivered(tmp, "quarantined"))
    assert [(r.result, r.policy) for r in got["dmarc"]] == [("fail", "quarantine")]


def test_forged_results_in_our_name_are_removed_others_kept(site):
    gw, tmp = site
    forged = (f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=pass.test;\r\n dmarc=pass\r\n"
              "Authentication-Results: other.example; spf=pass smtp.mailfrom=x@other.example\r\n")
    assert send(message("fail.test", "forged", forged), "someone@fail.test")[0] == 250
    data = delivered(tmp, "forged")
    fields = header_fields(data, b"authentication-results")
    assert len(fields) == 2 and b"other.example" in fields[1]
    assert [r.result for r in results(data)["spf"] if r.smtp_mailfrom] == ["fail"]
    assert "forged Authentication-Results removed" in gw.log()


def test_trusted_networks_are_not_checked(site):
    gw, tmp = site
    assert send(message("reject.test", "trusted"), "someone@reject.test", source=TRUSTED)[0] == 250
    assert b"Authentication-Results" not in delivered(tmp, "trusted")


def test_authenticated_submissions_are_not_checked(site):
    gw, tmp = site
    forged = f"Authentication-Results: {AUTHSERV}; dmarc=pass\r\n"
    assert send(message("reject.test", "submitted", forged), "someone@reject.test", login=True)[0] == 250
    assert b"Authentication-Results" not in delivered(tmp, "submitted")     # and the forged one is gone


def test_relayed_mail_is_sealed_with_an_arc_set_that_verifies(site):
    gw, tmp = site
    data = signed(message("signed.test", "sealed"))
    assert send(data, "someone@signed.test", to="carol@remote.test")[0] == 250
    assert wait_until(lambda: any(b"Subject: sealed" in m.data for m in gw.peer.messages)), gw.log()
    got = next(m.data for m in gw.peer.messages if b"Subject: sealed" in m.data)
    names = [k for k, _ in dkim.DKIM(got).headers]
    assert names[:4] == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results",
                         b"Authentication-Results"]
    aar = header_fields(got, b"arc-authentication-results")[0]
    assert b"i=1; gw.example.test" in aar and b"dkim=pass" in aar
    lookup = dns.resolver.Resolver(configure=False)
    lookup.nameservers = [dns.nameserver.Do53Nameserver(gw.dns.listen, gw.dns.port)]

    def dnsfunc(name, timeout=5):
        return b"".join(lookup.resolve(name.decode().rstrip("."), "TXT")[0].strings)
    cv, _, reason = dkim.arc_verify(got, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason
    # local mail is not sealed: ARC is for mail we pass on
    assert send(message("pass.test", "notsealed"), "someone@pass.test")[0] == 250
    assert b"ARC-Seal" not in delivered(tmp, "notsealed")


def test_reject_off_after_sighup_gives_the_verdict_only(site):
    gw, tmp = site
    assert send(message("reject.test", "refused"), "someone@reject.test")[0] == 550
    gw.config["plugins"]["sender_auth"]["reject"] = {"dmarc_reject": False}
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "read again and valid" in gw.log()
                      and "refusing on nothing" in gw.log())          # the plugin has applied it
    assert send(message("reject.test", "reportonly"), "someone@reject.test")[0] == 250
    got = results(delivered(tmp, "reportonly"))
    assert [(r.result, r.policy) for r in got["dmarc"]] == [("fail", "reject")]


def test_a_dns_timeout_gives_temperror_never_a_refusal(tmp_path):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)     # reads queries, never answers
    silent.bind(("127.0.0.135", 0))
    try:
        gw = GatewayProcess(tmp_path, config(tmp_path, f"{SILENT_GW}:2525",
                                             f"127.0.0.135:{silent.getsockname()[1]}",
                                             reject={"dmarc_reject": True, "spf_fail": True})).start()
        try:
            assert send(message("reject.test", "timeout"), "someone@reject.test", host=SILENT_GW)[0] == 250
            got = results(delivered(tmp_path, "timeout"))
        finally:
            gw.stop()
    finally:
        silent.close()
    assert {r.result for r in got["spf"]} == {"temperror"}
    assert [r.result for r in got["dmarc"]] == ["temperror"]
