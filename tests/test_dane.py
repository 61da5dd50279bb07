"""DANE for SMTP (RFC 7672), end to end on loopback: a small DNS server written here answers MX, A, TLSA
(and the MTA-STS TXT) with the AD bit set, as a validating resolver the gateway trusts would (and
without it, as an insecure zone); SMTP peers with STARTTLS present trustme certificates that match
the TLSA records or not. The gateway is the real twistd process."""
from __future__ import annotations

import hashlib
import json
import smtplib
import socket
import ssl
import threading
import uuid
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gwprocess import base_config, wait_until
from peers import DEFAULT_EXTENSIONS
from mta.delivery.nexthops import system_trusts_ad
from mta.smtp.client.dane import TLSA, check_chain

GW_HOST, GW_PORT = "127.0.0.10", 2525
DNS_HOST = "127.0.0.57"
HTTPS = "127.0.0.70"
MX1, MX2 = "127.0.0.71", "127.0.0.72"
DOMAIN = "dane.test"


class ValidatingResolver:
    """Answers from a table, with the AD bit when ``secure`` (what a validating resolver says of a
    signed zone); a name in ``servfail`` gets SERVFAIL (its answer would be bogus). UDP only."""

    def __init__(self, host: str, secure: bool = True) -> None:
        self.secure = secure
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, 53))
        except OSError:                     # not in a namespace of our own: any free port
            self.sock.bind((host, 0))
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def add(self, name: str, rdtype: str, *values: str) -> "ValidatingResolver":
        self.records.setdefault((name.lower().rstrip("."), rdtype), []).extend(values)
        return self

    def start(self) -> "ValidatingResolver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                wire, client = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(wire)
                self.sock.sendto(self._answer(query).to_wire(), client)
            except Exception:               # noqa: BLE001 - a test server ignores what it cannot parse
                continue

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if self.secure:
            response.flags |= dns.flags.AD
        if name in self.servfail:
            response.flags &= ~dns.flags.AD
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        owner = question.name
        for _ in range(8):                  # a CNAME chain, as a recursive resolver returns it
            target = self.records.get((name, "CNAME"))
            if rdtype == "CNAME" or not target or (name, rdtype) in self.records:
                break
            response.answer.append(dns.rrset.from_text_list(owner, 60, "IN", "CNAME", target))
            owner = dns.name.from_text(target[0])
            name = owner.to_text(omit_final_dot=True).lower()
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(owner, 60, "IN", rdtype, values))
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response


def spki_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def cert_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    return ctx


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def resolver():
    server = ValidatingResolver(DNS_HOST)
    server.add(DOMAIN, "MX", "10 mx1.dane.test.", "20 mx2.dane.test.")
    server.add("mx1.dane.test", "A", MX1).add("mx2.dane.test", "A", MX2)
    yield server.start()
    server.stop()


def tls_peer(peers, ip: str, leaf: trustme.LeafCert, *extra: str):
    return peers(ip, tls_context=context(leaf), extensions=(*DEFAULT_EXTENSIONS, "STARTTLS", *extra))


def config(tmp_path: Path, resolver: ValidatingResolver, **outbound) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    host, port = resolver.address
    cfg["gateway"]["dns"]["nameservers"] = [f"{host}:{port}"]
    cfg["connectors"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "plog")}
    if outbound:
        cfg["connectors"][0]["outbound"] = outbound
    return cfg


def send(subject: str, to: str = f"b@{DOMAIN}") -> None:
    msg = (f"From: a@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@sender.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("a@sender.test", [to], msg)


def delivered(gw, peer, subject: str) -> str:
    """Send ``subject``; the mail log's delivery line once ``peer`` has the message."""
    send(subject)
    assert peer.wait_for(1, timeout=20), gw.log()
    assert wait_until(lambda: sent_lines(gw), 10), gw.log()
    return sent_lines(gw)[0]


def sent_lines(gw) -> list[str]:
    return [line for line in gw.log().splitlines() if "status=sent" in line]


def deferred_lines(gw) -> list[str]:
    return [line for line in gw.log().splitlines() if "status=deferred" in line]


def protocol_log(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "plog").rglob("*.log"))


def queued(tmp_path: Path) -> bool:
    root = tmp_path / "spool"
    return any(p.is_file() and p.parent.name not in ("tmp", "corrupt", "mta-sts") and p.suffix != ".sock"
               for p in root.rglob("*"))


# -- matching, without a gateway ---------------------------------------------------------------------

def test_records_match_per_rfc_7672():
    root = trustme.CA()
    inter = root.create_child_ca()
    leaf = inter.issue_cert("mx1.dane.test")
    chain = [load(p.bytes()) for p in leaf.cert_chain_pems]            # leaf, intermediate
    cert, ta = chain
    ee = lambda s, m, d: TLSA(3, s, m, bytes.fromhex(d) if m else d)   # noqa: E731
    assert check_chain(chain, [ee(1, 1, spki_sha256(cert))], "anything.test") is None      # names ignored
    assert check_chain(chain, [ee(0, 1, cert_sha256(cert))], "x") is None
    assert check_chain(chain, [TLSA(3, 0, 0, cert.public_bytes(Encoding.DER))], "x") is None
    sha512 = hashlib.sha512(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()
    assert check_chain(chain, [TLSA(3, 1, 2, sha512)], "x") is None
    # DANE-TA: the intermediate in the chain is the trust anchor; the leaf must name the MX host
    assert check_chain(chain, [TLSA(2, 0, 1, bytes.fromhex(cert_sha256(ta)))], "mx1.dane.test") is None
    assert check_chain(chain, [TLSA(2, 1, 1, bytes.fromhex(spki_sha256(ta)))], "mx1.dane.test") is None
    why = check_chain(chain, [TLSA(2, 0, 1, bytes.fromhex(cert_sha256(ta)))], "mx2.dane.test")
    assert why is not None and "does not name mx2.dane.test" in why
    # a DANE-TA record for the leaf itself is no trust anchor; other keys match nothing
    assert check_chain(chain, [TLSA(2, 0, 1, bytes.fromhex(cert_sha256(cert)))], "mx1.dane.test") is not None
    other = load(trustme.CA().issue_cert("mx1.dane.test").cert_chain_pems[0].bytes())
    why = check_chain(chain, [ee(1, 1, spki_sha256(other))], "mx1.dane.test")
    assert why.startswith("DANE: no TLSA record of mx1.dane.test (3 1 1) matches")
    # DANE-TA 2 0 0: the anchor is in the record; the server need not send it (only the leaf here)
    root_der = load(root.cert_pem.bytes()).public_bytes(Encoding.DER)
    inter_der = ta.public_bytes(Encoding.DER)
    assert check_chain(chain, [TLSA(2, 0, 0, root_der)], "mx1.dane.test") is None
    assert check_chain([cert], [TLSA(2, 0, 0, inter_der)], "mx1.dane.test") is None
    assert check_chain([cert], [TLSA(2, 0, 0, root_der)], "mx1.dane.test") is not None     # inter missing
    assert "does not name mx2.dane.test" in check_chain([cert], [TLSA(2, 0, 0, inter_der)], "mx2.dane.test")
    assert check_chain([cert], [TLSA(2, 0, 0, inter_der)], "mx2.dane.test", also=["mx1.dane.test"]) is None
    other_root = load(trustme.CA().cert_pem.bytes()).public_bytes(Encoding.DER)
    assert check_chain(chain, [TLSA(2, 0, 0, other_root)], "mx1.dane.test") is not None
    assert check_chain(chain, [TLSA(2, 0, 0, b"not a certificate")], "mx1.dane.test") is not None
    # usable for SMTP: DANE-TA/EE with known parameters and digests of the right length only
    assert not TLSA(1, 1, 1, bytes(32)).usable and not TLSA(0, 0, 1, bytes(32)).usable
    assert not TLSA(3, 1, 1, bytes(31)).usable and not TLSA(3, 2, 1, bytes(32)).usable
    assert TLSA(3, 1, 1, bytes(32)).usable and TLSA(2, 0, 2, bytes(64)).usable


def test_the_systems_resolvers_are_believed_only_with_trust_ad(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions edns0\n")
    assert not system_trusts_ad(str(conf))
    conf.write_text("nameserver 127.0.0.1\noptions edns0 trust-ad\n")
    assert system_trusts_ad(str(conf))
    assert not system_trusts_ad(str(tmp_path / "missing"))


# -- end to end ---------------------------------------------------------------------------------------

def test_matching_3_1_1_delivers_with_tls_dane(tmp_path, gateway, peers, resolver, ca):
    leaf = ca.issue_cert("not-the-mx-name.test")               # DANE-EE: names and the CA do not matter
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {spki_sha256(load(leaf.cert_chain_pems[0].bytes()))}")
    mx1 = tls_peer(peers, MX1, leaf)
    gw = gateway(config(tmp_path, resolver))
    assert "relay=mx1.dane.test[127.0.0.71]:25, tls=dane, " in delivered(gw, mx1, "dane")
    assert mx1.messages[0].tls
    assert wait_until(lambda: " TLS - +tls=dane 220 " in protocol_log(tmp_path), 10), protocol_log(tmp_path)


@pytest.mark.parametrize("mx1_offers", ["wrong-certificate", "no-starttls"])
def test_mismatching_certificate_keeps_the_mail_queued_with_dane_named(tmp_path, gateway, peers, resolver, ca,
                                                                       mx1_offers):
    right, wrong = ca.issue_cert("mx1.dane.test"), ca.issue_cert("mx1.dane.test")
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {spki_sha256(load(right.cert_chain_pems[0].bytes()))}")
    resolver.servfail.add("_25._tcp.mx2.dane.test")             # a bogus TLSA answer: mx2 is not used
    if mx1_offers == "no-starttls":
        mx1 = peers(MX1, extensions=DEFAULT_EXTENSIONS)
    else:
        mx1 = tls_peer(peers, MX1, wrong)
    mx2 = tls_peer(peers, MX2, right)
    gw = gateway(config(tmp_path, resolver))
    send("must wait")
    assert wait_until(lambda: deferred_lines(gw), 20), gw.log()
    text = gw.log()
    if mx1_offers == "no-starttls":
        assert ("TLS is required by the DANE TLSA records of _25._tcp.mx1.dane.test (tls: verify) but "
                "mx1.dane.test[127.0.0.71]:25 does not offer STARTTLS") in text
        assert "DANE: dane.test: mx1.dane.test: starttls-not-supported" in text
    else:
        assert "DANE check with mx1.dane.test[127.0.0.71]:25 failed (DANE: no TLSA record of mx1.dane.test" in text
        assert "DANE: dane.test: mx1.dane.test: tlsa-invalid" in text
    assert "DANE: the TLSA lookup of _25._tcp.mx2.dane.test failed" in text
    assert "DANE: dane.test: mx2.dane.test: dnssec-invalid" in text
    assert "DANE" in deferred_lines(gw)[0] and "dsn=4.7." in deferred_lines(gw)[0]
    assert mx1.connections >= 1 and not mx1.messages
    assert mx2.connections == 0
    assert queued(tmp_path)


def test_tlsa_without_the_ad_bit_is_ignored(tmp_path, gateway, peers, resolver, ca):
    resolver.secure = False
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {'00' * 32}")     # would match nothing
    mx1 = tls_peer(peers, MX1, ca.issue_cert("mx1.dane.test"))
    gw = gateway(config(tmp_path, resolver))
    assert "tls=opportunistic" in delivered(gw, mx1, "opportunistic")


UNUSABLE_ONLY = (f"1 1 1 {'00' * 32}", f"0 0 1 {'00' * 32}", f"3 2 1 {'00' * 32}")   # PKIX, a bad selector


@pytest.mark.parametrize("mx1_offers", ["starttls", "no-starttls"])
def test_unusable_tlsa_records_make_tls_mandatory_without_authentication(tmp_path, gateway, peers, resolver, ca,
                                                                         mx1_offers):
    """RFC 7672 2.2/3.1: a validated TLSA RRset with no usable record still says the host does TLS:
    any certificate is accepted, but no STARTTLS means no delivery (Postfix's "encrypt")."""
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", *UNUSABLE_ONLY)
    resolver.add("_25._tcp.mx2.dane.test", "TLSA", *UNUSABLE_ONLY)
    cfg = config(tmp_path, resolver)
    cfg["gateway"]["tls_rpt"] = {"enabled": True}
    if mx1_offers == "no-starttls":
        mx1 = peers(MX1, extensions=DEFAULT_EXTENSIONS)
        mx2 = peers(MX2, extensions=DEFAULT_EXTENSIONS)
        gw = gateway(cfg)
        send("must wait")
        assert wait_until(lambda: deferred_lines(gw), 20), gw.log()
        assert ("TLS is required by the DANE TLSA records of _25._tcp.mx1.dane.test (present, none usable) "
                "(tls: required) but mx1.dane.test[127.0.0.71]:25 does not offer STARTTLS") in gw.log()
        assert not mx1.messages and not mx2.messages and queued(tmp_path)
        return
    mx1 = tls_peer(peers, MX1, trustme.CA().issue_cert("someone-else.test"))     # nothing checks it
    gw = gateway(cfg)
    assert "tls=opportunistic" in delivered(gw, mx1, "encrypted")
    assert mx1.messages[0].tls
    assert "DANE: dane.test: mx1.dane.test: tlsa-invalid: no usable TLSA record at _25._tcp.mx1.dane.test" in gw.log()


def test_a_cname_mx_host_uses_the_tlsa_records_of_the_expanded_name(tmp_path, gateway, peers, resolver, ca):
    """RFC 7672 2.2.2: mx1.dane.test is an alias of mail.signed.test (validated chain): the TLSA base
    domain is the expanded name, whose records win over any at the alias."""
    right = ca.issue_cert("mail.signed.test")
    key = spki_sha256(load(right.cert_chain_pems[0].bytes()))
    resolver.records.pop(("mx1.dane.test", "A"))
    resolver.add("mx1.dane.test", "CNAME", "mail.signed.test.").add("mail.signed.test", "A", MX1)
    resolver.add("_25._tcp.mail.signed.test", "TLSA", f"3 1 1 {key}")
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {'00' * 32}")        # at the alias: not used
    mx1 = tls_peer(peers, MX1, right)
    gw = gateway(config(tmp_path, resolver))
    assert "relay=mx1.dane.test[127.0.0.71]:25, tls=dane, " in delivered(gw, mx1, "via an alias")


def test_a_cname_mx_host_falls_back_to_the_alias_records(tmp_path, gateway, peers, resolver, ca):
    """The expanded name has no TLSA records (a validated denial): those of the alias apply."""
    right = ca.issue_cert("mx1.dane.test")
    resolver.records.pop(("mx1.dane.test", "A"))
    resolver.add("mx1.dane.test", "CNAME", "mail.signed.test.").add("mail.signed.test", "A", MX1)
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {spki_sha256(load(right.cert_chain_pems[0].bytes()))}")
    wrong = tls_peer(peers, MX1, ca.issue_cert("mx1.dane.test"))
    gw = gateway(config(tmp_path, resolver))
    send("alias records")
    assert wait_until(lambda: deferred_lines(gw), 20), gw.log()
    assert "DANE check with mx1.dane.test[127.0.0.71]:25 failed (DANE: no TLSA record of mx1.dane.test" in gw.log()
    assert not wrong.messages


def test_dane_ta_2_0_1_delivers(tmp_path, gateway, peers, resolver, ca):
    inter = ca.create_child_ca()
    leaf = inter.issue_cert("mx1.dane.test")
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"2 0 1 {cert_sha256(load(leaf.cert_chain_pems[1].bytes()))}",
                 "1 1 1 " + "00" * 32)                         # a PKIX record beside it is unusable, ignored
    mx1 = tls_peer(peers, MX1, leaf)
    gw = gateway(config(tmp_path, resolver))
    assert "tls=dane" in delivered(gw, mx1, "trust anchor")


def leaf_only_context(leaf: trustme.LeafCert, tmp_path: Path) -> ssl.SSLContext:
    """A server that sends its own certificate and nothing above it."""
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
    (tmp_path / "leaf.key").write_bytes(leaf.private_key_pem.bytes())
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tmp_path / "leaf.pem"), str(tmp_path / "leaf.key"))
    return ctx


def test_dane_ta_2_0_0_supplies_a_trust_anchor_the_server_does_not_send(tmp_path, gateway, peers, resolver, ca):
    """RFC 7672 3.1.2: with a full-certificate DANE-TA record the server may leave the anchor out of
    its chain; the anchor is the certificate in the record."""
    leaf = ca.issue_cert("mx1.dane.test")
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"2 0 0 {der(ca).hex()}")
    mx1 = peers(MX1, tls_context=leaf_only_context(leaf, tmp_path),
                extensions=(*DEFAULT_EXTENSIONS, "STARTTLS"))
    gw = gateway(config(tmp_path, resolver))
    assert "tls=dane" in delivered(gw, mx1, "anchor from DNS")


def der(ca: trustme.CA) -> bytes:
    return load(ca.cert_pem.bytes()).public_bytes(Encoding.DER)


def test_dane_takes_precedence_over_mta_sts(tmp_path, gateway, peers, resolver, ca):
    from httpsfixture import PolicyServer, policy
    from tlsfixture import ca_file, server_context

    https = PolicyServer(HTTPS, server_context(ca, f"mta-sts.{DOMAIN}")).start()
    try:
        https.set_policy(DOMAIN, policy("enforce", "mx9.dane.test"))     # lists neither MX
        resolver.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=1"').add(f"mta-sts.{DOMAIN}", "A", HTTPS)
        leaf = trustme.CA().issue_cert("self.test")            # a CA MTA-STS would not trust
        resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {spki_sha256(load(leaf.cert_chain_pems[0].bytes()))}")
        mx1 = tls_peer(peers, MX1, leaf)
        cfg = config(tmp_path, resolver)
        cfg["gateway"]["mta_sts"] = {"ca_file": ca_file(ca, tmp_path)}
        gw = gateway(cfg)
        assert "tls=dane" in delivered(gw, mx1, "dane first")
        assert https.fetches(DOMAIN) == 1                    # the policy was in force, for mx2
    finally:
        https.stop()


def test_a_smart_host_with_validated_tlsa_records_gets_dane(tmp_path, gateway, peers, resolver, ca):
    leaf = ca.issue_cert("relay.dane.test")
    resolver.add("relay.dane.test", "A", MX2)
    resolver.add("_25._tcp.relay.dane.test", "TLSA", f"3 1 1 {spki_sha256(load(leaf.cert_chain_pems[0].bytes()))}")
    relay = tls_peer(peers, MX2, leaf)
    cfg = config(tmp_path, resolver)
    cfg["connectors"][0]["smart_hosts"] = ["[relay.dane.test]"]
    gw = gateway(cfg)
    assert "relay=relay.dane.test[127.0.0.72]:25, tls=dane, " in delivered(gw, relay, "via the smart host")


def test_requiretls_message_is_relayed_over_dane(tmp_path, gateway, peers, resolver, ca):
    leaf = ca.issue_cert("mx1.dane.test")
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {spki_sha256(load(leaf.cert_chain_pems[0].bytes()))}")
    mx1 = tls_peer(peers, MX1, leaf, "REQUIRETLS")
    mx2 = tls_peer(peers, MX2, ca.issue_cert("mx2.dane.test"), "REQUIRETLS")     # no TLSA: never tried
    mx1.set_reply("mail", "451 4.3.0 try the next one")
    cfg = config(tmp_path, resolver)
    gwcert = ca.issue_cert("gw.example.test")
    gwcert.cert_chain_pems[0].write_to_path(str(tmp_path / "gw.pem"))
    gwcert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    cfg["virtual_servers"][0]["tls"] = {"certificate": str(tmp_path / "gw.pem"), "key": str(tmp_path / "gw.key")}
    gw = gateway(cfg)
    msg = (f"From: alice@example.test\r\nTo: b@{DOMAIN}\r\nSubject: protected\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
        assert s.mail("alice@example.test", ["REQUIRETLS"])[0] == 250
        assert s.rcpt(f"b@{DOMAIN}")[0] == 250
        assert s.data(msg)[0] == 250
    assert wait_until(lambda: deferred_lines(gw), 20), gw.log()
    assert mx2.connections == 0                               # only validated TLS for this message
    mx1.set_reply("mail", None)
    assert mx1.wait_for(1, timeout=20), gw.log()
    assert "REQUIRETLS" in mx1.messages[0].mail_params and mx1.messages[0].tls
    assert wait_until(lambda: sent_lines(gw), 10)
    assert "tls=dane" in sent_lines(gw)[0]


def test_dns_check_shows_tlsa_records_and_what_is_required(tmp_path, resolver, ca, capsys):
    from mta.cli.main import main
    leaf = ca.issue_cert("mx1.dane.test")
    digest = spki_sha256(load(leaf.cert_chain_pems[0].bytes()))
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {digest}")
    resolver.add("_25._tcp.mx2.dane.test", "TLSA", f"1 1 1 {digest}")
    host, port = resolver.address
    main(["dns-check", "--server", f"{host}:{port}", DOMAIN])
    out = capsys.readouterr().out
    assert f"_25._tcp.mx1.dane.test TLSA 3 1 1 {digest} (DNSSEC-validated)" in out
    assert "mx1.dane.test: DANE: STARTTLS with a certificate matching a TLSA record (takes precedence over MTA-STS)" in out
    assert ("mx2.dane.test: mandatory STARTTLS, certificate not checked: TLSA records present but none usable "
            "(PKIX usages 0/1 are not used for SMTP; RFC 7672 2.2)") in out


def test_dns_check_shows_the_tls_rpt_record_the_mta_sts_id_and_cname_mx_hosts(tmp_path, resolver, capsys):
    from mta.cli.main import main
    resolver.add(f"_smtp._tls.{DOMAIN}", "TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@dane.test,https://r.dane.test/x"')
    resolver.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=20261202"')
    resolver.records.pop(("mx1.dane.test", "A"))
    resolver.add("mx1.dane.test", "CNAME", "mail.signed.test.").add("mail.signed.test", "A", MX1)
    resolver.add("_25._tcp.mail.signed.test", "TLSA", f"3 1 1 {'ab' * 32}")
    host, port = resolver.address
    main(["dns-check", "--server", f"{host}:{port}", DOMAIN])
    out = capsys.readouterr().out
    assert 'TLS-RPT: _smtp._tls.dane.test TXT "v=TLSRPTv1; rua=mailto:tlsrpt@dane.test,https://r.dane.test/x"' in out
    assert "  reports go to mailto:tlsrpt@dane.test\n  reports go to https://r.dane.test/x" in out
    assert '_mta-sts.dane.test TXT "v=STSv1; id=20261202" (id 20261202)' in out
    assert "mx1.dane.test is a CNAME for mail.signed.test: TLSA base domain mail.signed.test" in out
    assert f"_25._tcp.mail.signed.test TLSA 3 1 1 {'ab' * 32} (DNSSEC-validated)" in out
    resolver.records[(f"_smtp._tls.{DOMAIN}", "TXT")] = ['"v=TLSRPTv1; rua=ftp://nowhere"']
    main(["dns-check", "--server", f"{host}:{port}", "--json", DOMAIN])
    doc = json.loads(capsys.readouterr().out)
    assert doc["tls_rpt"]["error"] == "no mailto: or https: address in rua" and doc["mta_sts"]["id"] == "20261202"
    assert any("_smtp._tls.dane.test" in w["text"] for w in doc["warnings"])


def test_dane_sessions_are_counted_for_tls_reporting(tmp_path, gateway, peers, resolver, ca):
    from test_tls_rpt import shown

    right, wrong = ca.issue_cert("mx1.dane.test"), ca.issue_cert("mx1.dane.test")
    key = spki_sha256(load(right.cert_chain_pems[0].bytes()))
    resolver.add("_25._tcp.mx1.dane.test", "TLSA", f"3 1 1 {key}").add("_25._tcp.mx2.dane.test", "TLSA", f"3 1 1 {key}")
    tls_peer(peers, MX1, wrong)
    mx2 = tls_peer(peers, MX2, right)
    cfg = config(tmp_path, resolver)
    cfg["gateway"]["tls_rpt"] = {"enabled": True}
    gw = gateway(cfg)
    assert "tls=dane" in delivered(gw, mx2, "counted")      # mx1's certificate matches no record

    def counted() -> list:
        return [(r["policy_type"], r["mx_host"], r["successful"], r["failed"], r["failures"]) for r in shown(gw)]

    assert wait_until(lambda: counted() == [("tlsa", ["mx1.dane.test"], 0, 1, {"tlsa-invalid": 1}),
                                            ("tlsa", ["mx2.dane.test"], 1, 0, {})], 10), counted()
