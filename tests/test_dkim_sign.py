"""dkim_sign end to end: keys made by ``smtpgw dkim keygen``, their records served by dnsmasq, twistd
smtpgw relaying to a recording peer; every signature is checked with dkimpy on the test side against
the published record, never with the plugin's own code."""
from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import dkim
import dns.nameserver
import dns.resolver
import pytest

from gwprocess import REPO, base_config, maildir_messages, wait_until
from smtpgw_plugins.dkim_sign import relaxed
from smtpgw_plugins.dkim_sign.plugin import INLINE_SIZE, sign_message

GW, PEER, CLIENT, OUTSIDER = "127.0.0.120", "127.0.0.121", "127.0.0.122", "127.0.0.123"


def smtpgw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mta.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


def keygen(out: Path, domain: str, selector: str, algorithm: str = "rsa-sha256") -> tuple[str, str]:
    """Run the command; return (record name, record text) parsed from the zone line it prints."""
    done = smtpgw("dkim", "keygen", "--domain", domain, "--selector", selector, "--algorithm", algorithm,
                  "--out", str(out))
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if " IN TXT " in l)
    name, _, strings = line.partition(". IN TXT ")
    return name, "".join(re.findall(r'"([^"]*)"', strings))


def txt_lookup(server: tuple[str, int]):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(server[0], server[1])]

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(name.rstrip("."), "TXT", lifetime=timeout)
        except dns.resolver.NXDOMAIN:
            return None
        return b"".join(answer[0].strings)
    return dnsfunc


def signatures(data: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature, top first."""
    d = dkim.DKIM(data)
    return [dkim.util.parse_tag_value(v) for k, v in d.headers if k.lower() == b"dkim-signature"]


def verified(data: bytes, dnsfunc) -> list[bool]:
    d = dkim.DKIM(data)
    return [d.verify(idx=i, dnsfunc=dnsfunc) for i in range(len(signatures(data)))]


def sighup(gw) -> None:
    """SIGHUP once the gateway runs: its handler is set when the services start, so a session that
    got its banner and an answer to NOOP proves it is there."""
    with smtplib.SMTP(GW, 2525, timeout=30) as s:
        assert s.noop()[0] == 250
    gw.proc.send_signal(signal.SIGHUP)


def send(sender: str, rcpt: str, headers: str, body: str = "Hello.\r\n") -> None:
    with smtplib.SMTP(GW, 2525, timeout=30, source_address=(CLIENT, 0)) as s:
        s.sendmail(sender, [rcpt], (headers + "\r\n" + body).encode())


@pytest.fixture(scope="module")
def made_keys(tmp_path_factory):
    """The keys and their records, made once for the module (RSA generation is slow)."""
    keys = tmp_path_factory.mktemp("dkim")
    return keys, [keygen(keys, "example.test", "s2026"), keygen(keys, "example.test", "e2026", "ed25519-sha256")]


@pytest.fixture
def site(tmp_path, gateway, peers, dns_server, made_keys):
    keys = tmp_path / "dkim"
    shutil.copytree(made_keys[0], keys)        # a test may replace one
    for name, text in made_keys[1]:
        dns_server.add_txt(name, text)
    dns_server.restart()
    peer = peers(PEER)
    cfg = base_config(tmp_path, listen=f"{GW}:2525")
    cfg["gateway"]["dns"]["nameservers"] = [f"{dns_server.listen}:{dns_server.port}"]
    cfg["virtual_servers"][0]["relay"]["allow"] = [f"{CLIENT}/32"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    cfg["plugins"]["enabled"].append("dkim_sign")
    cfg["plugins"]["dkim_sign"] = {"keys": [
        {"domain": "example.test", "selector": "s2026", "key": str(keys / "example.test.s2026.key")},
        {"domain": "example.test", "selector": "e2026", "key": str(keys / "example.test.e2026.key"),
         "algorithm": "ed25519-sha256"}]}
    gw = gateway(cfg)
    return gw, peer, txt_lookup(dns_server.address), tmp_path


def test_keygen_writes_a_private_key_readable_by_its_owner_only(tmp_path):
    name, text = keygen(tmp_path / "k", "example.test", "s1")
    assert name == "s1._domainkey.example.test" and text.startswith("v=DKIM1; k=rsa; p=MII")
    assert os.stat(tmp_path / "k" / "example.test.s1.key").st_mode & 0o777 == 0o600
    again = smtpgw("dkim", "keygen", "--domain", "example.test", "--selector", "s1", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "exists" in again.stderr


def test_relayed_mail_carries_rsa_and_ed25519_signatures_that_verify(site):
    gw, peer, dnsfunc, _ = site
    send("alice@example.test", "bob@remote.test",
         "From: Alice <alice@mail.example.test>\r\nTo: bob@remote.test\r\nSubject: signed\r\n"
         "Message-ID: <1@example.test>\r\n")
    assert wait_until(lambda: len(peer.messages) == 1), gw.log()
    data = peer.messages[0].data
    sigs = signatures(data)
    assert sorted((s[b"s"], s[b"a"]) for s in sigs) == [(b"e2026", b"ed25519-sha256"), (b"s2026", b"rsa-sha256")]
    for s in sigs:
        assert s[b"d"] == b"example.test" and s[b"c"] == b"relaxed/relaxed"
        signed = [h.strip().lower() for h in s[b"h"].split(b":")]
        assert signed.count(b"from") == 2 and b"subject" in signed     # From oversigned
    assert verified(data, dnsfunc) == [True, True]
    # a From added on the way breaks them (that is what oversigning From is for)
    assert verified(b"From: mallory@evil.test\r\n" + data, dnsfunc) == [False, False]
    # a message too big to sign on the reactor thread is signed in a pool thread, just as well
    big = "".join(f"line {i}:  some\ttext, spaces  at the end  \r\n" for i in range(2000))
    send("alice@example.test", "bob@remote.test",
         "From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: big\r\n", big)
    assert wait_until(lambda: len(peer.messages) == 2), gw.log()
    data = peer.messages[1].data
    assert len(data) > 2 * INLINE_SIZE and len(signatures(data)) == 2
    assert verified(data, dnsfunc) == [True, True]


def test_local_mail_and_foreign_from_domains_are_not_signed(site):
    gw, peer, _, tmp = site
    send("alice@example.test", "bob@example.test", "From: alice@example.test\r\nSubject: local\r\n")
    send("carol@other.test", "dave@remote.test", "From: carol@other.test\r\nSubject: foreign\r\n")
    assert wait_until(lambda: maildir_messages(tmp / "mail", "bob") and peer.messages), gw.log()
    assert b"DKIM-Signature" not in maildir_messages(tmp / "mail", "bob")[0]    # sign: relayed
    assert b"DKIM-Signature" not in peer.messages[0].data


def test_sign_all_signs_local_mail_from_trusted_clients_only(site):
    gw, peer, dnsfunc, tmp = site
    gw.config["plugins"]["dkim_sign"]["sign"] = "all"
    gw.write_config()
    sighup(gw)
    assert wait_until(lambda: "SIGHUP: applied: plugins.dkim_sign.sign" in gw.log()
                      and gw.log().count("dkim_sign: 2 key(s)") == 2), gw.log()      # keys read again, then applied
    send("alice@example.test", "bob@example.test", "From: alice@example.test\r\nSubject: inside\r\n")
    with smtplib.SMTP(GW, 2525, timeout=30, source_address=(OUTSIDER, 0)) as s:     # not in relay.allow
        s.sendmail("mallory@evil.test", ["bob@example.test"], b"From: ceo@example.test\r\nSubject: spoof\r\n\r\nx\r\n")
    assert wait_until(lambda: len(maildir_messages(tmp / "mail", "bob")) == 2), gw.log()
    by_subject = {b"inside" if b"Subject: inside" in m else b"spoof": m for m in maildir_messages(tmp / "mail", "bob")}
    assert b"DKIM-Signature" in by_subject[b"inside"]
    assert b"DKIM-Signature" not in by_subject[b"spoof"]


def test_a_bounce_from_the_gateway_is_signed_for_its_domain(site):
    gw, peer, dnsfunc, _ = site
    peer.set_reply("rcpt", lambda rcpt: "550 5.1.1 no such user" if rcpt == "nobody@remote.test" else None)
    send("carol@remote.test", "nobody@remote.test", "From: carol@remote.test\r\nSubject: doomed\r\n")
    assert wait_until(lambda: any(m.sender == "" for m in peer.messages)), gw.log()
    dsn = next(m for m in peer.messages if m.sender == "").data
    assert b"MAILER-DAEMON@gw.example.test" in dsn.split(b"\r\n\r\n")[0]
    assert verified(dsn, dnsfunc) == [True, True]


def test_sighup_reads_the_keys_again(site):
    gw, peer, dnsfunc, tmp = site
    keys = tmp / "dkim"
    (keys / "example.test.s2026.key").unlink()
    keygen(keys, "example.test", "s2026")          # a rotated key under the same name, not yet in DNS
    sighup(gw)
    assert wait_until(lambda: gw.log().count("dkim_sign: 2 key(s)") == 2), gw.log()
    send("alice@example.test", "bob@remote.test", "From: alice@example.test\r\nSubject: rotated\r\n")
    assert wait_until(lambda: len(peer.messages) == 1), gw.log()
    # the RSA signature no longer matches the old record (the new key signed); Ed25519 still does
    by_selector = dict(zip([s[b"s"] for s in signatures(peer.messages[0].data)],
                           verified(peer.messages[0].data, dnsfunc)))
    assert by_selector == {b"s2026": False, b"e2026": True}
    check = smtpgw("dns-check", "-c", str(gw.config_path), "--dkim", "example.test:s2026", "--dkim", "example.test:e2026")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "WARN: s2026._domainkey.example.test: the published key is not" in check.stdout
    assert "OK: e2026._domainkey.example.test publishes the key" in check.stdout


def test_dns_check_dkim_confirms_the_published_records(site):
    gw, _, _, _ = site
    check = smtpgw("dns-check", "-c", str(gw.config_path), "--dkim", "example.test:s2026", "--dkim", "example.test:e2026")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("OK: ") == 2
    missing = smtpgw("dns-check", "-c", str(gw.config_path), "--dkim", "example.test:nope")
    assert missing.returncode == 1 and "no such key in plugins.dkim_sign.keys" in missing.stdout


def test_a_missing_key_is_a_configuration_error_naming_it(tmp_path):
    cfg = base_config(tmp_path)
    cfg["plugins"]["enabled"].append("dkim_sign")
    cfg["plugins"]["dkim_sign"] = {"keys": [{"domain": "example.test", "selector": "s1", "key": "nope.key"}]}
    import yaml
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
    done = smtpgw("check-config", "-c", str(tmp_path / "gw.yaml"), cwd=tmp_path)
    assert done.returncode == 2
    assert "plugins.dkim_sign.keys[0].key: cannot read 'nope.key'" in done.stderr
    assert "Traceback" not in done.stderr


def test_openssl_rsa_signs_exactly_as_dkimpy_would(made_keys):
    """dkim_sign hands dkimpy's RSA step to OpenSSL (openssl_rsa.py): the same bytes, far less time."""
    import hashlib

    import dkim.crypto
    from smtpgw_plugins.dkim_sign import openssl_rsa

    parsed = dkim.crypto.parse_pem_private_key((made_keys[0] / "example.test.s2026.key").read_bytes())
    for data in (b"", b"hello", b"x" * 5000):
        digest = hashlib.sha256(data)
        assert openssl_rsa.sign(digest.copy(), parsed) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest.copy(), parsed)


def test_each_key_parsed_once_as_dkimpy_parses_it(made_keys):
    """openssl_rsa.install() has dkimpy parse a PEM key once and reuse its own result."""
    import dkim.crypto
    from smtpgw_plugins.dkim_sign import openssl_rsa

    pem = (made_keys[0] / "example.test.s2026.key").read_bytes()
    first = openssl_rsa.parse_pem_private_key(pem)
    assert first == dkim.crypto.parse_pem_private_key(pem)
    assert openssl_rsa.parse_pem_private_key(pem) is first


def dkimpy_body(body: bytes) -> bytes:
    """dkimpy's own relaxed body canonicalization (its module functions: relaxed.install replaces
    only the class's methods)."""
    c = dkim.canonicalization
    return c.correct_empty_body(c.strip_trailing_lines(c.compress_whitespace(c.strip_trailing_whitespace(body))))


def dkimpy_headers(headers: list) -> list:
    c = dkim.canonicalization
    return [(x.lower().rstrip(), c.compress_whitespace(c.unfold_header_value(y)).strip() + b"\r\n")
            for x, y in headers]


ODD = [b"", b"\r\n", b"\r\n\r\n", b"a", b"a \r\n", b"a\t\r\n\r\n \r\n", b"  a  b\t\tc \t \r\n", b"x\n y\r\n",
       b"bare\rCR\r\n", b"\r\r\n\n", b" \t", b"end  ", b"line\r\n\r\n\t\r\n", b"\x00 \x0b\x0c  \r\n", b"one two\r\n"]


def test_relaxed_canonicalization_is_dkimpys_byte_for_byte() -> None:
    """relaxed.install() replaces dkimpy's relaxed canonicalization (signing and verifying) with one
    that skips substitutions that change nothing: the same bytes on any input, odd or not."""
    texts = ODD + [a + b for a in ODD for b in ODD]
    for text in texts:
        assert relaxed.canonicalize_body(text) == dkimpy_body(text), text
        headers = [(b"Subject ", text), (b"X-A", b" " + text + b"\r\n"), (b"From", b"\r\n\t" + text)]
        assert relaxed.canonicalize_headers(headers) == dkimpy_headers(headers), text


def test_message_split_and_canonicalized_from_its_chunks_as_dkimpy_would() -> None:
    """sign_message hands dkimpy only the header section, and the body canonicalized from the
    chunks without joining them: the same header fields dkimpy parses from the whole message, the
    same canonical body, however the message is cut into chunks; anything else is left to dkimpy."""
    fields = [b"From: a@example.test\r\n", b"Subject: x  y\r\n", b"\tfolded \r\n", b"To: c@example.org\r\n"]
    lines = [b"line\r\n", b"\r\n", b"a  b \t\r\n", b".dot\r\n", b"x" * 90 + b"\r\n", b"\t \r\n"]
    for n in range(60):
        head = b"".join(fields[(n + i) % 4] for i in range(1 + n % 5))
        head = b"X: 1\r\n" + head if head.startswith(b"\t") else head
        data = head + b"\r\n" + b"".join(lines[(n * 7 + i) % 6] for i in range(n))
        headers, body = dkim.rfc822_parse(data)
        for step in (1, 2, 3, 5, 7, 64, len(data) or 1):
            chunks = [data[i:i + step] for i in range(0, len(data), step)]
            cut = relaxed.split_message(chunks)
            if any(c.endswith(b"\r") for c in chunks[:-1]):
                continue            # a CRLF cut in two: each chunk alone has a bare CR, left to dkimpy
            assert cut is not None, (data, step)
            assert dkim.rfc822_parse(cut[0]) == (headers, b""), (data, step)
            assert cut[1] == dkimpy_body(body), (data, step)
    for odd in (b"From: a@b\r\n\r\nbare\nLF\r\n", b"\r\nno headers\r\n", b"From: a@b\r\nno body"):
        assert relaxed.split_message([odd]) is None


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signatures_are_the_ones_dkimpy_makes_alone(made_keys, monkeypatch, algorithm) -> None:
    """With OpenSSL's RSA, the relaxed canonicalization installed and the message split from its
    chunks, sign_message returns exactly the fields dkimpy signing the joined message returns
    (RSA PKCS#1 v1.5 and Ed25519 signatures are deterministic; the clock is fixed for t=)."""
    import time

    from smtpgw_plugins.dkim_sign import openssl_rsa
    from smtpgw_plugins.dkim_sign.keys import read_keys

    selector = "s2026" if algorithm == "rsa-sha256" else "e2026"
    keys = read_keys([{"domain": "example.test", "selector": selector, "algorithm": algorithm,
                       "key": str(made_keys[0] / f"example.test.{selector}.key")}], "keys")
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    messages = [b"From: A <a@example.test>\r\nSubject:  two  spaces \r\n\tfolded\r\nTo: b@example.org\r\n\r\n"
                + b"".join(b"line %d \t with  runs\t\r\n" % i for i in range(300)) + b"\r\n\r\n",
                b"From: a@example.test\r\n\r\n", b"From: a@example.test\r\n\r\nbare\nLF\r\n"]
    wanted = ("from", "subject", "to")
    expected = []
    for data in messages:                   # dkimpy alone, the joined message
        signer = dkim.DKIM(data, signature_algorithm=algorithm.encode(), linesep=b"\r\n")
        signer.should_sign, signer.frozen_sign = {h.encode() for h in wanted}, {b"from"}
        expected.append(signer.sign(selector.encode(), b"example.test", keys[0].private,
                                    canonicalize=(b"relaxed", b"relaxed"), include_headers=signer.default_sign_headers()))
    for module, name in ((dkim, "RSASSA_PKCS1_v1_5_sign"), (dkim, "parse_pem_private_key"),
                         (dkim.canonicalization.Relaxed, "canonicalize_body"),
                         (dkim.canonicalization.Relaxed, "canonicalize_headers")):
        monkeypatch.setattr(module, name, vars(module)[name])      # put back after the test
    openssl_rsa.install()
    relaxed.install()
    for data, field in zip(messages, expected):
        chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
        assert sign_message(chunks, keys, wanted) == [field]


def test_from_domain_read_off_plain_fields_as_the_email_parsers_read_it() -> None:
    """author.from_domain reads a plain From field itself and leaves the rest to the email package's
    parsers: the same answer as those parsers give, for plain fields, odd ones and odd headers."""
    import email.utils
    import itertools

    from mta.model.message import MessageData
    from smtpgw_plugins.dkim_sign import author

    def parsers(message: MessageData) -> str | None:
        values = message.headers.get_all("From") or []
        addresses = [a for _, a in email.utils.getaddresses([str(v) for v in values]) if a]
        if len(values) != 1 or len(addresses) != 1 or "@" not in addresses[0]:
            return None
        return addresses[0].rpartition("@")[2].strip().lower().rstrip(".") or None

    froms = [b"a@b.test", b"<a@B.Test>", b"Alice <a@b.test>", b'"Alice, B" <a@b.test>', b"  Al  Smith\t<a@b.test.>  ",
             b"a@b.test, c@d.test", b"Alice <a@b.test> (comment)", b"(c) a@b.test", b"<a@b.test", b"a@", b"@b", b"",
             b"Al.ice <a.b@c-d.test>", b'"" <a@b.test>', b'"x <y@z>" <a@b.test>', b"a@b.test\r\n c@d.test",
             b"Alice\r\n <a@b.test>", b"<a\r\n @b.test>", b"A <@route:a@b.test>", b"undisclosed-recipients:;",
             b"group: a@b.test;", b"a.@b.test", b".a@b.test", b"a..b@c.test", b"\xc3\xa9 <a@b.test>",
             b"=?utf-8?q?x?= <a@b.test>", b"a@[1.2.3.4]", b"<a@b.test> x", b"A B <a+tag@x.y.z>", b'"A\\"B" <a@b.test>',
             b"a@b .test", b"a@b.test\nbare"]
    others = [b"To: x@y\r\n", b"X-Long: a\r\n\tb\r\n", b"from: second@z.test\r\n", b"FROM : weird@z\r\n",
              b"Bad line\r\n", b" leading\r\n", b"From x@y Sat\r\n"]
    for value in (froms[0], froms[1], froms[2], froms[4], froms[12], froms[13]):     # plain: no parsers
        assert author._read_off(b"To: x@y\r\nFrom: " + value + b"\r\nX-Long: a\r\n\tb\r\n") is not author._UNKNOWN
    for value in froms:
        for before, after in itertools.product([b""] + others, repeat=2):
            block = before + b"From: " + value + b"\r\n" + after
            for data in (block + b"\r\nbody\r\n", block):
                assert author.from_domain(MessageData([data])) == parsers(MessageData([data])), data
